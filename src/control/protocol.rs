//! The control socket's wire format: one request line, then answer lines — zero or more
//! progress lines and one final line. Documented in `docs/control.md`.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest request line read, in bytes (a public key is the largest argument).
pub const MAX_REQUEST_BYTES: usize = 4 * 1024;

/// A request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The hub's health.
    Status,
    /// The paired locks, with their latest state.
    Locks,
    /// Audit records after `after`, at most `limit` (1 to 1000).
    Audit {
        /// Sequence number to start after (0: from the start).
        #[serde(default)]
        after: i64,
        /// How many.
        limit: u32,
    },
    /// Verify the audit chain.
    AuditVerify,
    /// The known users.
    Users,
    /// Delete a user's data (their key, grants, passcodes; their audit records become
    /// unlinkable).
    ForgetUser {
        /// Their public key, base64url.
        key: String,
    },
    /// Unbind a lock: it forgets the hub, the hub forgets it.
    Unbind {
        /// The lock id, 16 hex digits.
        lock: String,
    },
    /// Re-seal every secret in the store under a new master key.
    Rekey,
    /// Scan the radio for `seconds` (1 to 60), with progress each second.
    Scan {
        /// How long.
        seconds: u32,
    },
    /// Pair a lock with the setup code on its label.
    Pair {
        /// The lock id, 16 hex digits (as the scan shows it).
        lock: String,
        /// The setup code.
        setup: String,
    },
}

/// Why a request line is refused before it is acted on.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RequestError {
    /// Longer than [`MAX_REQUEST_BYTES`].
    #[error("a request is at most {MAX_REQUEST_BYTES} bytes")]
    TooBig,
    /// Not a request.
    #[error("not a request: {0}")]
    Malformed(String),
}

impl Request {
    /// Parses one request line (without its newline).
    pub fn parse(line: &[u8]) -> Result<Self, RequestError> {
        if line.len() > MAX_REQUEST_BYTES {
            return Err(RequestError::TooBig);
        }
        let malformed = |e: &dyn std::fmt::Display| RequestError::Malformed(e.to_string());
        let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| malformed(&e))?;
        // serde ignores extra fields beside the tag of a unit variant: the keys are checked
        // here, so that every command refuses what it does not know.
        let object = value.as_object().ok_or_else(|| malformed(&"a request is a JSON object"))?;
        let allowed: &[&str] = match object.get("cmd").and_then(|c| c.as_str()) {
            Some("status" | "locks" | "audit_verify" | "users" | "rekey") => &["cmd"],
            Some("audit") => &["cmd", "after", "limit"],
            Some("forget_user") => &["cmd", "key"],
            Some("unbind") => &["cmd", "lock"],
            Some("scan") => &["cmd", "seconds"],
            Some("pair") => &["cmd", "lock", "setup"],
            Some(other) => return Err(malformed(&format!("unknown command {other:?}"))),
            None => return Err(malformed(&"no \"cmd\"")),
        };
        if let Some(key) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(malformed(&format!("unknown field {key:?}")));
        }
        let request: Request = serde_json::from_value(value).map_err(|e| malformed(&e))?;
        if let Request::Audit { limit, .. } = &request
            && !(1..=1000).contains(limit)
        {
            return Err(RequestError::Malformed("audit limit is 1 to 1000".into()));
        }
        if let Request::Scan { seconds } = &request
            && !(1..=60).contains(seconds)
        {
            return Err(RequestError::Malformed("scan seconds are 1 to 60".into()));
        }
        Ok(request)
    }
}

/// An answer line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Answer {
    /// Work in progress (shown, not parsed).
    Progress(String),
    /// The result.
    Ok(serde_json::Value),
    /// The request failed.
    Error {
        /// Stable code: `unauthorised`, `malformed`, `not_found`, `failed`, `busy`.
        code: String,
        /// What went wrong and what to do.
        message: String,
    },
}

impl Answer {
    /// An error answer.
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Answer::Error { code: code.into(), message: message.into() }
    }

    /// The line to send (with its newline).
    pub fn line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).expect("answers serialise");
        line.push(b'\n');
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(Request::parse(br#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(Request::parse(br#"{"cmd":"audit","limit":10}"#), Ok(Request::Audit { after: 0, limit: 10 }));
        assert!(matches!(Request::parse(br#"{"cmd":"audit","limit":0}"#), Err(RequestError::Malformed(_))));
        assert!(matches!(Request::parse(br#"{"cmd":"status","x":1}"#), Err(RequestError::Malformed(_))));
        assert!(matches!(Request::parse(br#"{"cmd":"reboot"}"#), Err(RequestError::Malformed(_))));
        assert!(matches!(Request::parse(b"status"), Err(RequestError::Malformed(_))));
        assert_eq!(Request::parse(&[b' '; MAX_REQUEST_BYTES + 1]), Err(RequestError::TooBig));
    }

    #[test]
    fn answers_are_single_lines() {
        let line = Answer::Ok(serde_json::json!({"a": "b\nc"})).line();
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
    }
}
