//! The reply payload: one per command or statement id, on `lockhub/v1/<gw>/reply`
//! (schema: `docs/schemas/reply.json`).

use serde::{Deserialize, Serialize};

use crate::auth::reason::Reason;

/// Longest `detail` sent, in characters.
pub const MAX_DETAIL_CHARS: usize = 200;

/// How it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Done.
    Ok,
    /// Refused by the gateway's checks; nothing happened.
    Refused,
    /// Allowed, but the lock could not do it.
    Failed,
}

impl Outcome {
    /// The wire name (`ok`, `refused`, `failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// A reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    /// The id of the command or statement answered.
    pub id: String,
    /// How it ended.
    pub result: Outcome,
    /// Why, unless `ok`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// A human-readable explanation (never a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// When the gateway decided (Unix seconds, its clock).
    pub at: i64,
    /// On a user's command that was carried out (or tried): how that user appears in the
    /// lock's log and in this gateway's events (`{"cloud":{"user":…}}`), 16 hex digits keyed by
    /// the gateway, so that an app learns which events are its user's. Never on an owner's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
}

impl Reply {
    /// A refusal.
    pub fn refused(id: &str, reason: Reason, detail: &str, at: i64) -> Self {
        Reply {
            id: id.to_owned(),
            result: Outcome::Refused,
            reason: Some(reason),
            detail: Some(detail.chars().take(MAX_DETAIL_CHARS).collect()),
            at,
            actor: None,
        }
    }

    /// The JSON payload.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("replies always serialise")
    }
}
