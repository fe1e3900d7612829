//! `lockhub`: the gateway daemon and its tools.
//!
//! - `run` is the daemon; `check-config` checks its configuration; `claim-code` shows the
//!   one-time code the owner claims the gateway with.
//! - `demo` runs the whole system on this machine — the bundled broker with a fresh PKI,
//!   emulated locks on a private D-Bus bus, the gateway, the phone-app stand-in — and prints
//!   a transcript of a remote unlock and what the gateway refuses.

mod daemon;
mod demo;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "lockhub", version, about = "Home-hub gateway for Bluetooth LE smart locks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway daemon.
    Run {
        /// The configuration file.
        #[arg(long, default_value = "/etc/lockhub/lockhub.toml")]
        config: PathBuf,
    },
    /// Check the configuration file and say what is wrong, with line and column.
    CheckConfig {
        /// The configuration file.
        #[arg(long, default_value = "/etc/lockhub/lockhub.toml")]
        config: PathBuf,
    },
    /// Show the one-time claim code (until an owner has claimed the gateway).
    ClaimCode {
        /// The configuration file.
        #[arg(long, default_value = "/etc/lockhub/lockhub.toml")]
        config: PathBuf,
    },
    /// Run the whole system on this machine, with no hardware, broker install or root, and
    /// print what happens: claim, pair, grant, remote unlock, a keypad unlock reported by the
    /// lock, a refused replay and a refused expired command.
    Demo {
        /// How many emulated locks.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=16))]
        locks: u8,
        /// Show the components' logs too.
        #[arg(long)]
        verbose: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("LOCKHUB_LOG").unwrap_or_else(|_| "info".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            daemon::run(&config)
        }
        Command::CheckConfig { config } => {
            let c = lockhub::config::Config::load(&config)?;
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
        Command::Demo { locks, verbose } => {
            let filter = if verbose { "info" } else { "error" };
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("LOCKHUB_LOG").unwrap_or_else(|_| filter.into()),
                )
                .with_writer(std::io::stderr)
                .init();
            demo::run(locks)
        }
    }
}
