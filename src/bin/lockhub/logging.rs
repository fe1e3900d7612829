//! Where the logs go: the journal, natively and with structured fields, when systemd started
//! us with stderr connected to it; readable lines on stderr otherwise.
//!
//! systemd says stderr is the journal by setting `JOURNAL_STREAM` to that stream's
//! `device:inode`; comparing both (not just the variable's presence) keeps a shell started
//! from a unit, whose stderr was redirected, on plain lines.

use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Installs the global subscriber; `LOCKHUB_LOG`, else `RUST_LOG` (an `EnvFilter` directive)
/// overrides `default_filter` ([`lockhub::log_filter`]).
pub fn init(default_filter: &str) {
    let choice = lockhub::log_filter::choose(default_filter);
    install(choice.filter);
    if let Some(warning) = choice.warning {
        tracing::warn!("{warning}");
    }
}

fn install(filter: EnvFilter) {
    if stderr_is_journal() {
        // No field prefix: our field names (lock_id, command_id, decision, reason, ...) become
        // LOCK_ID, COMMAND_ID, DECISION, REASON, which `journalctl LOCK_ID=...` filters on.
        match tracing_journald::layer() {
            Ok(journal) => {
                let journal = journal.with_field_prefix(None).with_syslog_identifier("lockhub".into());
                tracing_subscriber::registry().with(filter).with(journal).init();
                return;
            }
            Err(e) => lockhub::errln!("lockhub: the journal's socket is unusable ({e}); logging to stderr"),
        }
    }
    // Colours only for a terminal: a pipe or a file (a container's log, `2> lockhub.log`)
    // would keep the escape codes as text.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    // A duplicate of the descriptor, to stat it without unsafe code.
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else { return false };
    std::fs::File::from(fd).metadata().is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}
