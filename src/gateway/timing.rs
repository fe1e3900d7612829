//! Where a command's time goes inside the gateway: the moment each stage ended, from the link
//! taking the command off the broker, logged once per command at debug level under the
//! `lockhub::timing` target. The remote-unlock benchmark turns these records into a median
//! per stage beside its end-to-end figures; a running hub logs nothing of it by default. The
//! moment of receipt is also given on the wall clock, which other processes on the machine
//! share, so that the benchmark can tell the way in from the way back.

use std::time::{Duration, Instant, SystemTime};

/// The stages of a command, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Parsed and its signature checked (the intake).
    Opened,
    /// Its id noted durably (the one commit before the lock moves).
    Noted,
    /// The policy decided.
    Decided,
    /// The lock's task took it from the lock's queue.
    Taken,
    /// The lock's answer reached the lock's task.
    LockAnswered,
    /// The command's task has the lock's answer (or the command failed on the way to it).
    Answered,
    /// The reply handed to the link.
    Replied,
    /// The outcome committed.
    Committed,
}

const STAGES: usize = 8;

/// The end of each stage of one command, since the link received it.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    received: Instant,
    ended: [Option<Duration>; STAGES],
}

impl Timing {
    /// Timing a command the link received at `received`.
    pub fn starting(received: Instant) -> Self {
        Timing { received, ended: [None; STAGES] }
    }

    /// Notes that `stage` ended now.
    pub fn mark(&mut self, stage: Stage) {
        self.ended[stage as usize] = Some(self.received.elapsed());
    }

    /// Notes that `stage` ended at `at` (another task saw it end).
    pub fn mark_at(&mut self, stage: Stage, at: Instant) {
        self.ended[stage as usize] = Some(at.saturating_duration_since(self.received));
    }

    /// Logs the record of command `id` (µs since it was received; absent: not reached), and
    /// when it was received (µs since the Unix epoch).
    pub fn log(&self, id: &str) {
        // The clock reads below are for this record only: none while nobody asked for it.
        if !tracing::enabled!(target: "lockhub::timing", tracing::Level::DEBUG) {
            return;
        }
        let us = |stage: Stage| self.ended[stage as usize].map(|d| d.as_micros() as u64);
        let received = SystemTime::now()
            .checked_sub(self.received.elapsed())
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map(|d| d.as_micros() as u64);
        tracing::debug!(
            target: "lockhub::timing",
            command_id = id,
            received_unix_us = received,
            opened_us = us(Stage::Opened),
            noted_us = us(Stage::Noted),
            decided_us = us(Stage::Decided),
            taken_us = us(Stage::Taken),
            lock_answered_us = us(Stage::LockAnswered),
            answered_us = us(Stage::Answered),
            replied_us = us(Stage::Replied),
            committed_us = us(Stage::Committed),
            "command stages"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The remote-unlock benchmark reads these lines off the daemon's stderr (plain lines, as
    /// `lockhub run` writes them when not under systemd): the message, `command_id`,
    /// `received_unix_us` and one `<stage>_us` field per stage reached.
    #[test]
    fn a_commands_record_is_one_line_the_benchmark_can_read() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("lockhub::timing=debug")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let mut timing = Timing::starting(Instant::now());
        for stage in [Stage::Opened, Stage::Noted, Stage::Decided, Stage::Taken, Stage::LockAnswered, Stage::Answered] {
            timing.mark(stage);
        }
        tracing::subscriber::with_default(subscriber, || timing.log("c-1"));
        let out = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 1, "{out}");
        let line = lines[0];
        assert!(line.contains("command stages") && line.contains("command_id=\"c-1\""), "{line}");
        let field = |name: &str| {
            line.split_whitespace().find_map(|f| f.strip_prefix(&format!("{name}=")[..])).map(|v| v.parse::<u64>())
        };
        assert!(matches!(field("received_unix_us"), Some(Ok(_))), "{line}");
        // The names benches/remote_unlock.rs knows (its STAGES), in order.
        for name in ["opened", "noted", "decided", "taken", "lock_answered", "answered"] {
            assert!(matches!(field(&format!("{name}_us")), Some(Ok(_))), "{name}: {line}");
        }
        // Stages not reached are left out, not written as zero.
        assert!(field("replied_us").is_none() && field("committed_us").is_none(), "{line}");
    }
}
