//! Pairing: SPAKE2 over the lock's setup code, with key confirmation in both directions.
//!
//! The setup code (8 digits, printed inside the lock's battery cover) is the only thing the two
//! sides share in advance. SPAKE2 turns it into a strong shared secret without revealing it:
//! a passive listener learns nothing, and an active attacker gets one online guess per attempt
//! (which is why the lock counts failed attempts). Both identities are bound into the
//! exchange, and each side proves it holds the key before the lock stores it.
//!
//! ```text
//! TH          = SHA-256("LHP1 pairing" || lock_id || len(gw_id) || gw_id || msg_a || msg_b)
//! okm         = HKDF-SHA256(salt = TH, ikm = SPAKE2 key, info = "LHP1 pair keys", 96 bytes)
//! kc_lock     = okm[0..32]    kc_gateway = okm[32..64]    pairing_key = okm[64..96]
//! confirm_lk  = HMAC-SHA256(kc_lock, "lock" || TH)
//! confirm_gw  = HMAC-SHA256(kc_gateway, "gateway" || TH)
//! ```

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use rand_core::{CryptoRng, RngCore};
use sha2::{Digest, Sha256};
use spake2::{Ed25519Group, Identity, Password, Spake2};
use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::frame::{Frame, PAIR_CONFIRM_LEN, SPAKE_MSG_LEN};
use super::ids::{GatewayId, LockId};

/// Failed pairing attempts after which a lock leaves pairing mode.
pub const MAX_PAIRING_ATTEMPTS: u8 = 5;

/// The 256-bit key a lock and its gateway share after pairing. Never leaves either side.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop, serde::Serialize, serde::Deserialize)]
pub struct PairingKey([u8; 32]);

impl PairingKey {
    /// Wraps key bytes (e.g. unsealed from the store).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PairingKey(bytes)
    }

    /// The key bytes, for sealing into storage.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for PairingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PairingKey(<redacted>)")
    }
}

/// A lock's setup code: exactly 8 decimal digits.
#[derive(Clone, Zeroize, ZeroizeOnDrop, serde::Serialize, serde::Deserialize)]
pub struct SetupCode(String);

impl SetupCode {
    /// Number of digits.
    pub const LEN: usize = 8;

    /// Validates a setup code. Spaces and dashes (as printed on labels) are ignored.
    pub fn parse(text: &str) -> Result<Self, PairingError> {
        let digits: Zeroizing<String> = Zeroizing::new(text.chars().filter(|c| *c != ' ' && *c != '-').collect());
        if digits.len() != Self::LEN || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PairingError::BadSetupCode);
        }
        Ok(SetupCode(digits.as_str().to_owned()))
    }

    /// A fresh random code, as a lock's factory would assign it.
    pub fn random(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let n = loop {
            // Rejection sampling keeps the 10^8 codes equally likely.
            let v = rng.next_u32();
            if v < u32::MAX - u32::MAX % 100_000_000 {
                break v % 100_000_000;
            }
        };
        SetupCode(format!("{n:08}"))
    }

    /// The digits, for showing to the person who set the lock up.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SetupCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SetupCode(<redacted>)")
    }
}

/// Why pairing failed. None of these says anything about the setup code itself.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PairingError {
    /// The text is not an 8-digit setup code.
    #[error("a setup code is 8 digits")]
    BadSetupCode,
    /// The peer's SPAKE2 message is malformed.
    #[error("malformed SPAKE2 message")]
    BadMessage,
    /// Key confirmation failed: the setup code is wrong or the exchange was tampered with.
    #[error("key confirmation failed: wrong setup code, or the exchange was tampered with")]
    ConfirmationFailed,
}

fn identities(gateway_id: &GatewayId, lock_id: LockId) -> (Identity, Identity) {
    let mut a = b"LHP1 gateway ".to_vec();
    a.extend_from_slice(gateway_id.as_str().as_bytes());
    let mut b = b"LHP1 lock ".to_vec();
    b.extend_from_slice(&lock_id.0);
    (Identity::new(&a), Identity::new(&b))
}

fn transcript_hash(gateway_id: &GatewayId, lock_id: LockId, msg_a: &[u8], msg_b: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"LHP1 pairing");
    h.update(lock_id.0);
    h.update([gateway_id.as_str().len() as u8]);
    h.update(gateway_id.as_str().as_bytes());
    h.update(msg_a);
    h.update(msg_b);
    h.finalize().into()
}

/// The keys derived from a finished SPAKE2 exchange.
struct Confirmed {
    th: [u8; 32],
    kc_lock: Zeroizing<[u8; 32]>,
    kc_gateway: Zeroizing<[u8; 32]>,
    pairing_key: PairingKey,
}

impl Confirmed {
    fn derive(spake_key: &[u8], th: [u8; 32]) -> Self {
        let hk = Hkdf::<Sha256>::new(Some(&th), spake_key);
        let mut okm = Zeroizing::new([0u8; 96]);
        hk.expand(b"LHP1 pair keys", okm.as_mut()).expect("96 bytes is a valid HKDF length");
        let mut kc_lock = Zeroizing::new([0u8; 32]);
        let mut kc_gateway = Zeroizing::new([0u8; 32]);
        let mut key = [0u8; 32];
        kc_lock.copy_from_slice(&okm[..32]);
        kc_gateway.copy_from_slice(&okm[32..64]);
        key.copy_from_slice(&okm[64..]);
        let pairing_key = PairingKey(key);
        key.zeroize();
        Confirmed { th, kc_lock, kc_gateway, pairing_key }
    }

    fn tag(key: &[u8; 32], label: &[u8], th: &[u8; 32]) -> [u8; PAIR_CONFIRM_LEN] {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(label);
        mac.update(th);
        mac.finalize().into_bytes().into()
    }

    fn lock_tag(&self) -> [u8; PAIR_CONFIRM_LEN] {
        Self::tag(&self.kc_lock, b"lock", &self.th)
    }

    fn gateway_tag(&self) -> [u8; PAIR_CONFIRM_LEN] {
        Self::tag(&self.kc_gateway, b"gateway", &self.th)
    }
}

fn finish(spake: Spake2<Ed25519Group>, peer_msg: &[u8]) -> Result<Zeroizing<Vec<u8>>, PairingError> {
    spake.finish(peer_msg).map(Zeroizing::new).map_err(|_| PairingError::BadMessage)
}

/// The gateway's side of pairing (SPAKE2 side A).
pub struct PairingInitiator {
    spake: Spake2<Ed25519Group>,
    msg_a: [u8; SPAKE_MSG_LEN],
    gateway_id: GatewayId,
    lock_id: LockId,
}

impl std::fmt::Debug for PairingInitiator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairingInitiator").field("lock_id", &self.lock_id).finish_non_exhaustive()
    }
}

impl PairingInitiator {
    /// Starts pairing; returns the state and the [`Frame::PairRequest`] to send.
    pub fn start(
        code: &SetupCode,
        gateway_id: GatewayId,
        lock_id: LockId,
        rng: &mut (impl RngCore + CryptoRng),
    ) -> (Self, Frame) {
        let (id_a, id_b) = identities(&gateway_id, lock_id);
        let (spake, msg) =
            Spake2::<Ed25519Group>::start_a_with_rng(&Password::new(code.expose().as_bytes()), &id_a, &id_b, rng);
        let msg_a: [u8; SPAKE_MSG_LEN] = msg.as_slice().try_into().expect("SPAKE2 message is 33 bytes");
        let frame = Frame::PairRequest { gateway_id: gateway_id.clone(), spake: msg_a };
        (PairingInitiator { spake, msg_a, gateway_id, lock_id }, frame)
    }

    /// Checks the lock's [`Frame::PairResponse`]; on success returns the pairing key and the
    /// [`Frame::PairConfirm`] to send. The key must not be used until the lock answers
    /// [`Frame::PairDone`].
    pub fn on_response(
        self,
        spake_b: &[u8; SPAKE_MSG_LEN],
        lock_confirm: &[u8; PAIR_CONFIRM_LEN],
    ) -> Result<(PairingKey, Frame), PairingError> {
        let key = finish(self.spake, spake_b)?;
        let th = transcript_hash(&self.gateway_id, self.lock_id, &self.msg_a, spake_b);
        let c = Confirmed::derive(&key, th);
        if !bool::from(c.lock_tag().ct_eq(lock_confirm)) {
            return Err(PairingError::ConfirmationFailed);
        }
        let frame = Frame::PairConfirm { confirm: c.gateway_tag() };
        Ok((c.pairing_key.clone(), frame))
    }
}

/// The lock's side of pairing (SPAKE2 side B), waiting for the gateway's confirmation.
pub struct PairingResponder {
    confirmed: Confirmed,
    gateway_id: GatewayId,
}

impl std::fmt::Debug for PairingResponder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairingResponder").field("gateway_id", &self.gateway_id).finish_non_exhaustive()
    }
}

impl PairingResponder {
    /// Answers a [`Frame::PairRequest`]: returns the state and the [`Frame::PairResponse`].
    pub fn respond(
        code: &SetupCode,
        lock_id: LockId,
        gateway_id: GatewayId,
        spake_a: &[u8; SPAKE_MSG_LEN],
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<(Self, Frame), PairingError> {
        let (id_a, id_b) = identities(&gateway_id, lock_id);
        let (spake, msg) =
            Spake2::<Ed25519Group>::start_b_with_rng(&Password::new(code.expose().as_bytes()), &id_a, &id_b, rng);
        let msg_b: [u8; SPAKE_MSG_LEN] = msg.as_slice().try_into().expect("SPAKE2 message is 33 bytes");
        let key = finish(spake, spake_a)?;
        let th = transcript_hash(&gateway_id, lock_id, spake_a, &msg_b);
        let confirmed = Confirmed::derive(&key, th);
        let frame = Frame::PairResponse { spake: msg_b, confirm: confirmed.lock_tag() };
        Ok((PairingResponder { confirmed, gateway_id }, frame))
    }

    /// Checks the gateway's confirmation; on success the lock stores the returned key.
    pub fn on_confirm(self, confirm: &[u8; PAIR_CONFIRM_LEN]) -> Result<(GatewayId, PairingKey), PairingError> {
        if !bool::from(self.confirmed.gateway_tag().ct_eq(confirm)) {
            return Err(PairingError::ConfirmationFailed);
        }
        Ok((self.gateway_id, self.confirmed.pairing_key.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_core::OsRng;

    fn run(gw_code: &str, lock_code: &str) -> Result<(PairingKey, PairingKey), PairingError> {
        let gw = GatewayId::new("gw").unwrap();
        let lock = LockId([1; 8]);
        let (init, req) = PairingInitiator::start(&SetupCode::parse(gw_code)?, gw, lock, &mut OsRng);
        let Frame::PairRequest { gateway_id, spake } = req else { unreachable!() };
        let (resp, reply) =
            PairingResponder::respond(&SetupCode::parse(lock_code)?, lock, gateway_id, &spake, &mut OsRng)?;
        let Frame::PairResponse { spake, confirm } = reply else { unreachable!() };
        let (gw_key, confirm) = init.on_response(&spake, &confirm)?;
        let Frame::PairConfirm { confirm } = confirm else { unreachable!() };
        let (_, lock_key) = resp.on_confirm(&confirm)?;
        Ok((gw_key, lock_key))
    }

    #[test]
    fn same_code_gives_same_fresh_key() {
        let (a, b) = run("1234-5678", "12345678").unwrap();
        assert_eq!(a, b);
        let (c, _) = run("12345678", "12345678").unwrap();
        assert_ne!(a, c, "every pairing yields a fresh key");
    }

    #[test]
    fn wrong_code_fails_confirmation() {
        assert_eq!(run("12345679", "12345678").unwrap_err(), PairingError::ConfirmationFailed);
    }

    /// Hands out the given `u32`s in turn: exactly the values the code under test draws.
    struct Draws(std::vec::IntoIter<u32>);

    impl RngCore for Draws {
        fn next_u32(&mut self) -> u32 {
            self.0.next().expect("no more draws scripted")
        }
        fn next_u64(&mut self) -> u64 {
            unreachable!("setup codes draw u32s")
        }
        fn fill_bytes(&mut self, _: &mut [u8]) {
            unreachable!("setup codes draw u32s")
        }
        fn try_fill_bytes(&mut self, _: &mut [u8]) -> Result<(), rand_core::Error> {
            unreachable!("setup codes draw u32s")
        }
    }

    impl CryptoRng for Draws {}

    /// A draw at or past the last whole multiple of 10^8 below 2^32 is drawn again (else the
    /// low codes would come up more often); one below it is the code, zero-padded to 8 digits.
    #[test]
    fn random_codes_reject_the_draws_that_would_bias_them() {
        let limit = u32::MAX - u32::MAX % 100_000_000;
        assert_eq!(limit, 4_200_000_000);
        let mut draws = Draws(vec![u32::MAX, limit, limit - 1, 123].into_iter());
        assert_eq!(SetupCode::random(&mut draws).expose(), "99999999");
        assert_eq!(SetupCode::random(&mut draws).expose(), "00000123");
    }

    /// A SPAKE2 message from the wrong side or not on the curve is refused as malformed, on
    /// either side, before any confirmation is computed.
    #[test]
    fn malformed_spake_messages_are_refused() {
        let code = SetupCode::parse("12345678").unwrap();
        let (gw, lock) = (GatewayId::new("gw").unwrap(), LockId([1; 8]));
        let (_, request) = PairingInitiator::start(&code, gw.clone(), lock, &mut OsRng);
        let Frame::PairRequest { spake: msg_a, .. } = request else { unreachable!() };
        // The side's letter right, but y = 2 is no point of the curve.
        let not_a_point = |side: u8| {
            let mut m = [0; SPAKE_MSG_LEN];
            (m[0], m[1]) = (side, 2);
            m
        };
        // The gateway's own message handed back as the lock's, and a point that is none.
        for spake_b in [msg_a, not_a_point(b'B')] {
            let (init, _) = PairingInitiator::start(&code, gw.clone(), lock, &mut OsRng);
            assert_eq!(init.on_response(&spake_b, &[0; PAIR_CONFIRM_LEN]).unwrap_err(), PairingError::BadMessage);
        }
        let (_, response) = PairingResponder::respond(&code, lock, gw.clone(), &msg_a, &mut OsRng).unwrap();
        let Frame::PairResponse { spake: msg_b, .. } = response else { unreachable!() };
        for spake_a in [msg_b, not_a_point(b'A')] {
            let refused = PairingResponder::respond(&code, lock, gw.clone(), &spake_a, &mut OsRng);
            assert_eq!(refused.unwrap_err(), PairingError::BadMessage);
        }
    }

    /// Neither the key nor the code shows in a debug print, and the states show whom they
    /// pair only; the key's bytes go out and come back as they are.
    #[test]
    fn secrets_never_print() {
        let key = PairingKey::from_bytes([7; 32]);
        assert_eq!(key.as_bytes(), &[7; 32]);
        assert_eq!(format!("{key:?}"), "PairingKey(<redacted>)");
        let code = SetupCode::parse("1234 5678").unwrap();
        assert_eq!((code.expose(), format!("{code:?}").as_str()), ("12345678", "SetupCode(<redacted>)"));
        let (gw, lock) = (GatewayId::new("gw").unwrap(), LockId([1; 8]));
        let (init, request) = PairingInitiator::start(&code, gw.clone(), lock, &mut OsRng);
        assert_eq!(format!("{init:?}"), format!("PairingInitiator {{ lock_id: {lock:?}, .. }}"));
        let Frame::PairRequest { spake, .. } = request else { unreachable!() };
        let (resp, _) = PairingResponder::respond(&code, lock, gw.clone(), &spake, &mut OsRng).unwrap();
        assert_eq!(format!("{resp:?}"), format!("PairingResponder {{ gateway_id: {gw:?}, .. }}"));
    }

    #[test]
    fn setup_codes_are_validated_and_redacted() {
        assert!(SetupCode::parse("1234567").is_err());
        assert!(SetupCode::parse("1234567a").is_err());
        let code = SetupCode::random(&mut OsRng);
        assert_eq!(code.expose().len(), 8);
        assert!(!format!("{code:?}").contains(code.expose()));
    }
}
