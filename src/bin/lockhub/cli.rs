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
                  (`journalctl -u lockhub`); LOCKHUB_LOG, or RUST_LOG, sets the level (e.g. debug)."
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
    /// Show the running daemon's health (through the control socket).
    Status {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the paired locks with their state.
    Locks {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show the audit log, or verify its chain.
    Audit {
        /// Verify the hash chain instead of listing records.
        #[arg(long)]
        verify: bool,
        /// Start after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: i64,
        /// How many records, 1 to 1000.
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List the known users (by public key).
    Users {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete a user's data on request: key, grants, passcodes; their audit records become
    /// unlinkable.
    ForgetUser {
        /// Their public key (base64url, as `lockhub users` shows it; it may begin with `-`).
        #[arg(allow_hyphen_values = true)]
        key: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Unbind a lock: it forgets this hub and the hub deletes everything about it.
    Unbind {
        /// The lock id (16 hex digits, as `lockhub locks` shows it).
        lock: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Scan for locks in range: a live count, then a table with signal strength.
    Scan {
        /// How long, 1 to 60 seconds.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=60))]
        seconds: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Pair a lock in pairing mode, with the setup code on its label (read from standard input
    /// when --setup is not given, so that it stays out of the process list).
    Pair {
        /// The lock id (16 hex digits, as `lockhub scan` shows it).
        lock: String,
        /// The setup code.
        #[arg(long)]
        setup: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Re-seal every secret in the store under a new master key.
    Rekey {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Check what the hub needs — configuration, certificates, clock, Bluetooth, brokers, store,
    /// daemon — and say how to fix what fails.
    Doctor {
        /// The configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[command(flatten)]
        admin: AdminArgs,
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

/// How the admin subcommands reach the daemon, and how they answer.
#[derive(clap::Args)]
pub struct AdminArgs {
    /// The daemon's control socket.
    #[arg(long, default_value = "/run/lockhub/control.sock")]
    pub socket: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn a_key_that_begins_with_a_hyphen_is_a_key() {
        // Public keys are base64url: one in 64 begins with `-`.
        let cli = Cli::try_parse_from(["lockhub", "forget-user", "-pQ1xKeyKeyKey", "--yes"]).unwrap();
        match cli.command {
            Command::ForgetUser { key, yes, .. } => assert_eq!((key.as_str(), yes), ("-pQ1xKeyKeyKey", true)),
            _ => panic!("not forget-user"),
        }
    }
}
