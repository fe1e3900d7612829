//! Claiming the gateway: the one-time claim code it shows, and the owner's signed claim that
//! pins the owner key.
//!
//! The code is ten random digits (`12345-67890`), kept sealed in the store so that the local
//! CLI can show it again. Only someone who read it from the gateway (its log, `lockhub
//! claim-code`) can claim: the claim statement carries it, and it is compared in constant time.
//! After five wrong codes the code is replaced, so guessing gets five tries per code shown.
//! Once an owner is pinned, no claim is accepted and no code exists.

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::auth::keys::PublicKey;
use crate::auth::reason::Reason;
use crate::auth::statement::Claim;
use crate::store::audit::AuditActor;
use crate::store::{AuditEntry, Store, StoreError, Tx};

/// Wrong codes accepted before the code is replaced.
pub const MAX_ATTEMPTS: u32 = 5;

/// Digits in a claim code.
const DIGITS: usize = 10;

/// The sealed claim state.
#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
struct ClaimState {
    code: String,
    attempts: u32,
}

/// A claim code, for showing to the owner. Redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct ClaimCode(String);

impl ClaimCode {
    /// The code as shown: `12345-67890`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ClaimCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClaimCode(<redacted>)")
    }
}

fn fresh_code() -> String {
    let mut digits = String::with_capacity(DIGITS + 1);
    while digits.len() < DIGITS + 1 {
        let mut byte = [0u8; 1];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut byte);
        // Rejection sampling: 250 is the largest multiple of 10 below 256, so every digit is
        // equally likely.
        if byte[0] < 250 {
            if digits.len() == DIGITS / 2 {
                digits.push('-');
            }
            digits.push(char::from(b'0' + byte[0] % 10));
        }
    }
    digits
}

/// Only the digits of what the owner typed: spaces and dashes are presentation.
fn digits_of(code: &str) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(code.bytes().filter(u8::is_ascii_digit).collect())
}

fn read_state(store: &Store) -> Result<Option<ClaimState>, StoreError> {
    let Some(bytes) = store.claim_state()? else { return Ok(None) };
    Ok(serde_json::from_slice(&bytes).ok())
}

fn write_state(tx: &mut Tx<'_>, state: &ClaimState) -> Result<(), StoreError> {
    let bytes = Zeroizing::new(serde_json::to_vec(state).expect("claim state serialises"));
    tx.set_claim_state(&bytes)
}

/// The current claim code, created if there is none; `None` once an owner is pinned.
pub fn claim_code(store: &mut Store) -> Result<Option<ClaimCode>, StoreError> {
    if !store.owner_keys()?.is_empty() {
        return Ok(None);
    }
    if let Some(state) = read_state(store)?
        && state.attempts < MAX_ATTEMPTS
    {
        return Ok(Some(ClaimCode(state.code.clone())));
    }
    let state = ClaimState { code: fresh_code(), attempts: 0 };
    store.transaction(|tx| write_state(tx, &state))?;
    Ok(Some(ClaimCode(state.code.clone())))
}

/// Judges a verified claim by `signer`: pins the owner key if the gateway is unclaimed and the
/// code is right. Every outcome is audited, in the same transaction as its effect.
pub fn claim(store: &mut Store, signer: &PublicKey, claim: &Claim, now: i64) -> Result<Result<(), Reason>, StoreError> {
    let owners = store.owner_keys()?;
    let state = read_state(store)?;
    let outcome = if !owners.is_empty() {
        Err(Reason::ClaimState)
    } else if claim.exp < now {
        Err(Reason::Expired)
    } else {
        match &state {
            Some(state) if state.attempts < MAX_ATTEMPTS => {
                let expected = digits_of(&state.code);
                let given = digits_of(&claim.code);
                if expected.len() == given.len() && bool::from(expected.ct_eq(&given)) {
                    Ok(())
                } else {
                    Err(Reason::BadClaimCode)
                }
            }
            // No code shown yet (or used up): nothing can match.
            _ => Err(Reason::BadClaimCode),
        }
    };
    store.transaction(|tx| {
        match outcome {
            Ok(()) => {
                tx.pin_owner(signer.as_bytes(), now)?;
                // The code is spent: nothing is left to guess.
                tx.set_claim_state(b"{}")?;
            }
            Err(Reason::BadClaimCode) => {
                if let Some(state) = &state {
                    let attempts = state.attempts + 1;
                    let next = if attempts >= MAX_ATTEMPTS {
                        tracing::warn!("too many wrong claim codes: a new code replaces the old one");
                        ClaimState { code: fresh_code(), attempts: 0 }
                    } else {
                        ClaimState { code: state.code.clone(), attempts }
                    };
                    write_state(tx, &next)?;
                }
            }
            Err(_) => {}
        }
        tx.audit(AuditEntry {
            at: now,
            action: "gateway.claim",
            outcome: outcome.err().map_or("ok", Reason::as_str),
            actor: if outcome.is_ok() { AuditActor::Owner } else { AuditActor::Unknown },
            lock: None,
            detail: "",
        })?;
        Ok(())
    })?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::statement::StatementId;
    use crate::protocol::ids::GatewayId;
    use crate::store::StoreConfig;

    fn store(dir: &std::path::Path) -> Store {
        let mut store = Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(dir) }).unwrap();
        store.transaction(|tx| tx.set_gateway_identity(&GatewayId::new("gw-a").unwrap(), 0)).unwrap();
        store
    }

    fn claim_with(code: &str) -> Claim {
        Claim {
            jti: StatementId::new("claim-1").unwrap(),
            gw: GatewayId::new("gw-a").unwrap(),
            code: code.into(),
            iat: 100,
            exp: 200,
        }
    }

    #[test]
    fn the_right_code_pins_the_owner_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store(dir.path());
        let code = claim_code(&mut store).unwrap().unwrap();
        assert_eq!(code.as_str().len(), 11);
        assert_eq!(claim_code(&mut store).unwrap(), Some(code.clone()), "the same code until used");
        let owner = PublicKey::from_bytes([1; 32]);
        let typed = code.as_str().replace('-', " ");
        assert_eq!(claim(&mut store, &owner, &claim_with(&typed), 150).unwrap(), Ok(()));
        assert_eq!(store.owner_keys().unwrap(), vec![owner.as_bytes().to_vec()]);
        assert_eq!(claim_code(&mut store).unwrap(), None, "no code once claimed");
        let thief = PublicKey::from_bytes([2; 32]);
        assert_eq!(claim(&mut store, &thief, &claim_with(code.as_str()), 150).unwrap(), Err(Reason::ClaimState));
        assert_eq!(store.owner_keys().unwrap().len(), 1);
    }

    #[test]
    fn wrong_codes_are_counted_and_the_code_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = store(dir.path());
        let code = claim_code(&mut store).unwrap().unwrap();
        let thief = PublicKey::from_bytes([2; 32]);
        let wrong = if code.as_str().starts_with('0') { "11111-11111" } else { "00000-00000" };
        for _ in 0..MAX_ATTEMPTS {
            assert_eq!(claim(&mut store, &thief, &claim_with(wrong), 150).unwrap(), Err(Reason::BadClaimCode));
        }
        let replaced = claim_code(&mut store).unwrap().unwrap();
        assert_ne!(replaced, code, "a new code after {MAX_ATTEMPTS} wrong ones");
        // The old code is worthless now; an expired claim is refused even with the right code.
        let owner = PublicKey::from_bytes([1; 32]);
        assert_eq!(claim(&mut store, &owner, &claim_with(code.as_str()), 150).unwrap(), Err(Reason::BadClaimCode));
        assert_eq!(claim(&mut store, &owner, &claim_with(replaced.as_str()), 201).unwrap(), Err(Reason::Expired));
        assert!(store.owner_keys().unwrap().is_empty());
        let outcomes: Vec<String> = store.audit_records(0, 100).unwrap().into_iter().map(|r| r.outcome).collect();
        assert_eq!(outcomes.len(), MAX_ATTEMPTS as usize + 2, "every attempt audited: {outcomes:?}");
        assert!(format!("{replaced:?}").contains("redacted"));
    }
}
