//! Reason codes: why the gateway refused (or could not carry out) something. The same words go
//! into the typed reply to the caller, the audit record and the logs.

use serde::{Deserialize, Serialize};

/// Why a statement or command was refused or failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Not a well-formed signed statement of a known type.
    Malformed,
    /// The signature does not verify.
    BadSignature,
    /// Addressed to another gateway.
    WrongGateway,
    /// The signer is neither the owner nor a granted user.
    UnknownKey,
    /// Past its expiry, or valid for longer than allowed.
    Expired,
    /// Issued in the future beyond the allowed clock skew, or not yet valid.
    NotYetValid,
    /// This id was seen before.
    Replayed,
    /// The grant was revoked.
    Revoked,
    /// No grant gives this operation on this lock.
    NotGranted,
    /// The grant's schedule does not cover now.
    OutsideSchedule,
    /// Remote operation is off for this lock (the owner turns it on).
    RemoteDisabled,
    /// Too many commands from this user in the window.
    RateLimited,
    /// Too many refusals: locked out for a while.
    LockedOut,
    /// Quiet hours: only the owner may operate remotely.
    QuietHours,
    /// The gateway's clock has never been synchronised: no remote command is safe to judge.
    ClockUnsynchronised,
    /// The lock is not paired with this gateway.
    UnknownLock,
    /// The lock could not be reached.
    LockUnreachable,
    /// The lock reports its bolt jammed.
    Jammed,
    /// Too many commands already queued for the lock.
    Overloaded,
    /// The lock refused or failed the operation.
    Failed,
    /// The gateway is not claimed yet (or already claimed, for a claim).
    ClaimState,
    /// The claim code is wrong.
    BadClaimCode,
}

impl Reason {
    /// The wire and audit form, e.g. `bad_signature`.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::BadSignature => "bad_signature",
            Reason::WrongGateway => "wrong_gateway",
            Reason::UnknownKey => "unknown_key",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::Replayed => "replayed",
            Reason::Revoked => "revoked",
            Reason::NotGranted => "not_granted",
            Reason::OutsideSchedule => "outside_schedule",
            Reason::RemoteDisabled => "remote_disabled",
            Reason::RateLimited => "rate_limited",
            Reason::LockedOut => "locked_out",
            Reason::QuietHours => "quiet_hours",
            Reason::ClockUnsynchronised => "clock_unsynchronised",
            Reason::UnknownLock => "unknown_lock",
            Reason::LockUnreachable => "lock_unreachable",
            Reason::Jammed => "jammed",
            Reason::Overloaded => "overloaded",
            Reason::Failed => "failed",
            Reason::ClaimState => "claim_state",
            Reason::BadClaimCode => "bad_claim_code",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_form_is_the_serde_form() {
        for reason in [Reason::Malformed, Reason::BadSignature, Reason::ClockUnsynchronised, Reason::BadClaimCode] {
            assert_eq!(serde_json::to_string(&reason).unwrap(), format!("\"{reason}\""));
        }
    }
}
