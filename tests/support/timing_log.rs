//! The daemon's `lockhub::timing` log lines, read back: one command's stages, parsed from its
//! `command stages` line (colour codes and all), for the benchmarks and the real-BlueZ tier.

/// A command's stages, in the order they end.
pub const STAGES: [&str; 8] =
    ["opened", "noted", "decided", "taken", "lock_answered", "answered", "replied", "committed"];

/// One command's record from `lockhub::timing`.
#[derive(Clone, Debug, Default)]
pub struct StageRecord {
    /// The command's id.
    pub id: String,
    /// When the link received it, µs since the Unix epoch.
    pub received_unix_us: Option<u64>,
    /// When each of [`STAGES`] ended, µs since then.
    pub ended: [Option<u64>; STAGES.len()],
}

impl StageRecord {
    /// The record a log line holds, if it is a `command stages` line.
    pub fn parse(line: &str) -> Option<StageRecord> {
        let line = strip_ansi(line);
        if !line.contains("command stages") {
            return None;
        }
        let mut record = StageRecord::default();
        for (key, value) in line.split_whitespace().filter_map(|f| f.split_once('=')) {
            match key {
                // A string field is printed quoted.
                "command_id" => record.id = value.trim_matches('"').to_owned(),
                "received_unix_us" => record.received_unix_us = value.parse().ok(),
                _ => {
                    if let Some(i) = key.strip_suffix("_us").and_then(|k| STAGES.iter().position(|s| *s == k)) {
                        record.ended[i] = value.parse().ok();
                    }
                }
            }
        }
        Some(record)
    }

    /// When `stage` ended, µs after the command was received.
    pub fn ended(&self, stage: &str) -> Option<u64> {
        self.ended[STAGES.iter().position(|s| *s == stage)?]
    }
}

/// `line` without its terminal colour codes (the daemon's log lines carry them).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ended by a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
