//! `lockhub`: the gateway daemon and its tools.
//!
//! - `run` is the daemon; `check-config` checks its configuration (the file and the files it
//!   names); `claim-code` shows the one-time code the owner claims the gateway with.
//! - `completions` and `man` print shell completions and the man page (the Debian package
//!   installs both).
//! - `demo` (built with the `devtools` feature, not in the Debian package) runs the whole
//!   system on this machine — the bundled broker with a fresh PKI, emulated locks on a private
//!   D-Bus bus, the gateway, the phone-app stand-in — and prints a transcript of a remote unlock
//!   and what the gateway refuses.

// Standard output and error go through `lockhub::standard_streams`: a reader gone is no panic.
#![deny(clippy::print_stdout, clippy::print_stderr)]

mod admin;
mod cli;
mod daemon;
#[cfg(feature = "devtools")]
mod demo;
mod doctor;
mod logging;
#[cfg(feature = "devtools")]
mod private_bus;
mod quiet;
mod service;
mod text_pages;

use anyhow::Result;
use clap::{CommandFactory, Parser};
use cli::{AdminArgs, Cli, Command};
use lockhub::control::protocol::Request;
use lockhub::outln;
use lockhub::standard_streams;

fn run_admin(admin: &AdminArgs, request: Request) -> Result<()> {
    let value = admin::call(&admin.socket, &request)?;
    print_answer(&request, &value, admin.json)
}

/// Prints an answer on standard output.
fn print_answer(request: &Request, value: &serde_json::Value, json: bool) -> Result<()> {
    standard_streams::write_with(|mut out| admin::show(request, value, json, &mut out))?;
    Ok(())
}

/// sysexits(3)'s "configuration error".
const EX_CONFIG: i32 = 78;

fn main() -> std::process::ExitCode {
    lockhub::error_report::exit_code(run())
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            logging::init("info");
            let result = daemon::run(&config);
            if let Err(e) = &result
                && let Some(config_error) = e.downcast_ref::<lockhub::config::ConfigError>()
            {
                // EX_CONFIG: the unit does not restart on it (RestartPreventExitStatus=78);
                // restarting cannot fix a configuration, and the log says what to change.
                tracing::error!("{config_error}");
                std::process::exit(EX_CONFIG);
            }
            result
        }
        Command::CheckConfig { config } => {
            let c = lockhub::config::Config::load(&config)?;
            c.check_files(&config)?;
            match &c.cloud {
                Some(cloud) => {
                    outln!("{}: ok (gateway {}, {} broker(s))", config.display(), c.gateway.id, cloud.brokers.len())?
                }
                None => outln!("{}: ok (gateway {}, no cloud: local only)", config.display(), c.gateway.id)?,
            };
            Ok(())
        }
        Command::ClaimCode { config } => {
            let c = lockhub::config::Config::load(&config)?;
            let mut store = lockhub::hub::open_store(&c)?;
            match lockhub::gateway::claim::claim_code(&mut store)? {
                Some(code) => outln!("{}", code.as_str())?,
                None => outln!("already claimed: the owner's key is pinned")?,
            };
            Ok(())
        }
        Command::Status { admin } => run_admin(&admin, Request::Status),
        Command::Locks { admin } => run_admin(&admin, Request::Locks),
        Command::Audit { verify, after, limit, admin } => {
            if verify {
                let value = admin::call(&admin.socket, &Request::AuditVerify)?;
                print_answer(&Request::AuditVerify, &value, admin.json)?;
                if value["intact"] != true {
                    std::process::exit(1);
                }
                Ok(())
            } else {
                run_admin(&admin, Request::Audit { after, limit })
            }
        }
        Command::Users { admin } => run_admin(&admin, Request::Users),
        Command::ForgetUser { key, yes, admin } => {
            if !yes {
                admin::confirm(&format!("Delete every record of user {key}? This cannot be undone"))?;
            }
            run_admin(&admin, Request::ForgetUser { key })
        }
        Command::Unbind { lock, yes, admin } => {
            if !yes {
                admin::confirm(&format!(
                    "Unbind lock {lock}? It forgets this hub, and the hub deletes its key, grants and codes"
                ))?;
            }
            run_admin(&admin, Request::Unbind { lock })
        }
        Command::Rekey { admin } => run_admin(&admin, Request::Rekey),
        Command::Scan { seconds, admin } => run_admin(&admin, Request::Scan { seconds }),
        Command::Pair { lock, setup, admin } => {
            let setup = match setup {
                Some(s) => s,
                None => {
                    lockhub::standard_streams::ask(format_args!("setup code (on the lock's label): "));
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim().to_owned()
                }
            };
            run_admin(&admin, Request::Pair { lock, setup })
        }
        Command::Doctor { config, admin } => doctor::run(&config, &admin.socket, admin.json),
        Command::HashCode => {
            let mut line = zeroize::Zeroizing::new(String::new());
            std::io::stdin().read_line(&mut line)?;
            let hash = lockhub::local::codes::hash_code(line.trim())?;
            outln!("{hash}")?;
            Ok(())
        }
        Command::Completions { shell } => {
            // Into memory first: the generator panics when a write fails.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "lockhub", &mut script);
            standard_streams::write_with(|out| out.write_all(&script))?;
            Ok(())
        }
        Command::Man => {
            standard_streams::write_with(|out| clap_mangen::Man::new(Cli::command()).render(out))?;
            Ok(())
        }
        #[cfg(feature = "devtools")]
        Command::Demo { locks, verbose } => {
            logging::init(if verbose { "info" } else { "error" });
            demo::run(locks)
        }
    }
}
