//! Commands from the local broker (Home Assistant's lock entity, or anyone allowed to publish
//! on the command topic), strictly parsed.
//!
//! Two forms: the bare payloads of Home Assistant's MQTT lock (`LOCK`, `UNLOCK`, `OPEN`), and
//! the JSON its `command_template` renders when a code is asked for,
//! `{"action":"UNLOCK","code":"2468"}`. Anything else is refused before a code is looked at.

use serde::Deserialize;
use thiserror::Error;
use zeroize::Zeroizing;

use super::config::LocalOperation;

/// Largest command payload read.
pub const MAX_LOCAL_COMMAND_BYTES: usize = 256;

/// A parsed local command.
#[derive(Debug)]
pub struct LocalCommand {
    /// What to do.
    pub operation: LocalOperation,
    /// The code, if one came (zeroized on drop).
    pub code: Option<Zeroizing<String>>,
}

/// Why a payload is not a command.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LocalCommandError {
    /// Bigger than [`MAX_LOCAL_COMMAND_BYTES`].
    #[error("{0} bytes; a local command is at most {MAX_LOCAL_COMMAND_BYTES}")]
    TooBig(usize),
    /// Neither form.
    #[error("not a command: expected LOCK, UNLOCK, OPEN or {{\"action\":...,\"code\":...}}")]
    Malformed,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    action: String,
    #[serde(default)]
    code: Option<String>,
}

fn operation(action: &str) -> Option<LocalOperation> {
    match action {
        "LOCK" => Some(LocalOperation::Lock),
        "UNLOCK" => Some(LocalOperation::Unlock),
        "OPEN" => Some(LocalOperation::Unlatch),
        _ => None,
    }
}

impl LocalCommand {
    /// Parses a payload.
    pub fn parse(payload: &[u8]) -> Result<Self, LocalCommandError> {
        if payload.len() > MAX_LOCAL_COMMAND_BYTES {
            return Err(LocalCommandError::TooBig(payload.len()));
        }
        if let Some(operation) = std::str::from_utf8(payload).ok().and_then(operation) {
            return Ok(LocalCommand { operation, code: None });
        }
        let wire: Wire = serde_json::from_slice(payload).map_err(|_| LocalCommandError::Malformed)?;
        let code = wire.code.map(Zeroizing::new);
        let operation = operation(&wire.action).ok_or(LocalCommandError::Malformed)?;
        // Home Assistant renders an empty code when none was typed.
        let code = code.filter(|c| !c.is_empty());
        Ok(LocalCommand { operation, code })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_parse_and_nothing_else_does() {
        let c = LocalCommand::parse(b"LOCK").unwrap();
        assert_eq!((c.operation, c.code.is_none()), (LocalOperation::Lock, true));
        let c = LocalCommand::parse(br#"{"action":"OPEN","code":"2468"}"#).unwrap();
        assert_eq!((c.operation, c.code.as_deref().map(String::as_str)), (LocalOperation::Unlatch, Some("2468")));
        let c = LocalCommand::parse(br#"{"action":"UNLOCK","code":""}"#).unwrap();
        assert!(c.code.is_none());
        for bad in [
            &b"lock"[..],
            b"UNLOCK ",
            b"",
            br#"{"action":"UNLOCK","code":"1","x":1}"#,
            br#"{"action":"OPEN_ALL"}"#,
            b"\xff",
        ] {
            assert_eq!(LocalCommand::parse(bad).unwrap_err(), LocalCommandError::Malformed, "{bad:?}");
        }
        assert_eq!(LocalCommand::parse(&[b'x'; 300]).unwrap_err(), LocalCommandError::TooBig(300));
    }
}
