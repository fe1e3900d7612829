//! The command line, in one place so the man page and the completions describe exactly what
//! the binary parses.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Where the Debian package puts the configuration.
const DEFAULT_CONFIG: &str = "/etc/lockhub/lockhub.toml";

#[derive(Parser)]
#[command(
    name = "lockhub",
    version,
    about = "Home-hub gateway for Bluetooth LE smart locks",
    long_about = "Home-hub gateway for Bluetooth LE smart locks: bridges locks reached through BlueZ \
                  to the vendor cloud over MQTT with mutual TLS, and decides every command itself \
                  against the owner's signed grants and the local policy.\n\n\
                  Configuration: /etc/lockhub/lockhub.toml (see `lockhub check-config`). State: \
                  /var/lib/lockhub. Logs go to the journal when started by systemd \
                  (`journalctl -u lockhub`); LOCKHUB_LOG sets the level (e.g. debug)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the gateway daemon (systemd starts it; SIGHUP reloads the configuration).
    Run {
        /// The configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check the configuration file and the files it names; say what is wrong and how to fix it.
    CheckConfig {
        /// The configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show the one-time claim code (until an owner has claimed the gateway).
    ClaimCode {
        /// The configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Hash a local code (read from standard input) for `[[local.codes]]` in the configuration.
    HashCode,
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff).
    #[command(hide = true)]
    Man,
    /// Run the whole system on this machine, with no hardware, broker install or root, and
    /// print what happens: claim, pair, grant, remote unlock, a keypad unlock reported by the
    /// lock, a refused replay and a refused expired command.
    #[cfg(feature = "devtools")]
    Demo {
        /// How many emulated locks.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=16))]
        locks: u8,
        /// Show the components' logs too.
        #[arg(long)]
        verbose: bool,
    },
}
