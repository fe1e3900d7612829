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

mod cli;
mod daemon;
#[cfg(feature = "devtools")]
mod demo;
mod logging;
mod service;

use anyhow::Result;
use clap::{CommandFactory, Parser};
use cli::{Cli, Command};

/// sysexits(3)'s "configuration error".
const EX_CONFIG: i32 = 78;

fn main() -> Result<()> {
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
            println!("{}: ok (gateway {}, {} broker(s))", config.display(), c.gateway.id, c.cloud.brokers.len());
            Ok(())
        }
        Command::ClaimCode { config } => {
            let c = lockhub::config::Config::load(&config)?;
            let mut store = daemon::open_store(&c)?;
            match lockhub::gateway::claim::claim_code(&mut store)? {
                Some(code) => println!("{}", code.as_str()),
                None => println!("already claimed: the owner's key is pinned"),
            }
            Ok(())
        }
        Command::HashCode => {
            let mut line = zeroize::Zeroizing::new(String::new());
            std::io::stdin().read_line(&mut line)?;
            let hash = lockhub::local::codes::hash_code(line.trim())?;
            println!("{hash}");
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lockhub", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
        #[cfg(feature = "devtools")]
        Command::Demo { locks, verbose } => {
            logging::init(if verbose { "info" } else { "error" });
            demo::run(locks)
        }
    }
}
