//! Session keys and the sealed channel.
//!
//! Each BLE connection opens a new session: the gateway sends a fresh 16-byte nonce, the lock
//! answers with its own and a tag proving it holds the pairing key. Then
//!
//! ```text
//! okm       = HKDF-SHA256(salt = gw_nonce || lock_nonce, ikm = pairing_key,
//!                         info = "LHP1 session" || lock_id, 96 bytes)
//! k_g2l     = okm[0..32]   (gateway → lock, AES-256-GCM)
//! k_l2g     = okm[32..64]  (lock → gateway, AES-256-GCM)
//! k_confirm = okm[64..96]
//! hello tag = HMAC-SHA256(k_confirm, "lock hello" || gw_nonce || lock_nonce)[0..16]
//! ```
//!
//! A sealed frame is `01 20 <counter: u64 BE> <ciphertext> <tag>`; the AEAD nonce is four zero
//! bytes followed by the counter, the associated data is the 10-byte header. Each direction's
//! counter starts at 0 and must increase by exactly one per frame: BLE delivers in order, so
//! any other counter is a replay or a reorder. The first error poisons the channel for good.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::Zeroizing;

use super::fragment::MAX_FRAME_LEN;
use super::frame::{Frame, FrameError, HELLO_CONFIRM_LEN, NONCE_LEN, SEALED_HEADER_LEN, TAG_LEN, kind};
use super::gatt::PROTOCOL_VERSION;
use super::ids::LockId;
use super::pairing::PairingKey;

/// Largest plaintext one sealed frame carries.
pub const MAX_PLAINTEXT_LEN: usize = MAX_FRAME_LEN - SEALED_HEADER_LEN - TAG_LEN;

/// Which end of the link a channel belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The hub.
    Gateway,
    /// The lock.
    Lock,
}

/// The three keys of one session. Zeroized on drop.
pub struct SessionKeys {
    gateway_to_lock: Zeroizing<[u8; 32]>,
    lock_to_gateway: Zeroizing<[u8; 32]>,
    confirm: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(<redacted>)")
    }
}

impl SessionKeys {
    /// Derives the session keys from the pairing key and both nonces.
    pub fn derive(
        pairing_key: &PairingKey,
        lock_id: LockId,
        gateway_nonce: &[u8; NONCE_LEN],
        lock_nonce: &[u8; NONCE_LEN],
    ) -> Self {
        let mut salt = [0u8; 2 * NONCE_LEN];
        salt[..NONCE_LEN].copy_from_slice(gateway_nonce);
        salt[NONCE_LEN..].copy_from_slice(lock_nonce);
        let hk = Hkdf::<Sha256>::new(Some(&salt), pairing_key.as_bytes());
        let mut okm = Zeroizing::new([0u8; 96]);
        hk.expand_multi_info(&[b"LHP1 session", &lock_id.0], okm.as_mut()).expect("96 bytes is a valid HKDF length");
        let part = |i: usize| {
            let mut k = Zeroizing::new([0u8; 32]);
            k.copy_from_slice(&okm[32 * i..32 * (i + 1)]);
            k
        };
        SessionKeys { gateway_to_lock: part(0), lock_to_gateway: part(1), confirm: part(2) }
    }

    /// The lock's hello tag over both nonces.
    pub fn hello_tag(&self, gateway_nonce: &[u8; NONCE_LEN], lock_nonce: &[u8; NONCE_LEN]) -> [u8; HELLO_CONFIRM_LEN] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.confirm.as_ref()).expect("HMAC takes any key length");
        mac.update(b"lock hello");
        mac.update(gateway_nonce);
        mac.update(lock_nonce);
        let full = mac.finalize().into_bytes();
        let mut tag = [0u8; HELLO_CONFIRM_LEN];
        tag.copy_from_slice(&full[..HELLO_CONFIRM_LEN]);
        tag
    }

    /// Checks a hello tag in constant time.
    pub fn verify_hello_tag(
        &self,
        gateway_nonce: &[u8; NONCE_LEN],
        lock_nonce: &[u8; NONCE_LEN],
        tag: &[u8; HELLO_CONFIRM_LEN],
    ) -> bool {
        self.hello_tag(gateway_nonce, lock_nonce).ct_eq(tag).into()
    }

    /// The gateway → lock key bytes (exposed for the published test vectors).
    pub fn gateway_to_lock(&self) -> &[u8; 32] {
        &self.gateway_to_lock
    }

    /// The lock → gateway key bytes (exposed for the published test vectors).
    pub fn lock_to_gateway(&self) -> &[u8; 32] {
        &self.lock_to_gateway
    }
}

/// Why a sealed frame was refused. Every one of these ends the session.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// A frame with a counter already used: a replay.
    #[error("replayed frame (counter {got}, expected {expected})")]
    Replayed {
        /// The counter that was due.
        expected: u64,
        /// The counter received.
        got: u64,
    },
    /// A frame with a counter from the future: frames were reordered or dropped.
    #[error("reordered frame (counter {got}, expected {expected})")]
    Reordered {
        /// The counter that was due.
        expected: u64,
        /// The counter received.
        got: u64,
    },
    /// The tag did not verify: the frame was altered, truncated or sealed under another key.
    #[error("frame failed authentication (tampered, truncated or wrong key)")]
    Tampered,
    /// A plaintext frame arrived inside a session.
    #[error("plaintext frame type 0x{0:02x} refused inside a session")]
    Plaintext(u8),
    /// The bytes are not a frame at all.
    #[error("malformed frame: {0}")]
    Malformed(#[from] FrameError),
    /// The message is too large for one frame.
    #[error("message of {0} bytes exceeds one frame")]
    TooLarge(usize),
    /// The channel was closed by an earlier error.
    #[error("session closed by an earlier error")]
    Closed,
}

/// One direction-split AES-256-GCM channel with strict counters.
pub struct SecureChannel {
    seal_key: Aes256Gcm,
    open_key: Aes256Gcm,
    send_counter: u64,
    recv_counter: u64,
    closed: bool,
}

impl std::fmt::Debug for SecureChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecureChannel")
            .field("send_counter", &self.send_counter)
            .field("recv_counter", &self.recv_counter)
            .field("closed", &self.closed)
            .finish_non_exhaustive()
    }
}

fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    n
}

fn header(counter: u64) -> [u8; SEALED_HEADER_LEN] {
    let mut h = [0u8; SEALED_HEADER_LEN];
    h[0] = PROTOCOL_VERSION;
    h[1] = kind::SEALED;
    h[2..].copy_from_slice(&counter.to_be_bytes());
    h
}

impl SecureChannel {
    /// Opens the channel for `role` under `keys`.
    pub fn new(keys: &SessionKeys, role: Role) -> Self {
        let g2l = Aes256Gcm::new(keys.gateway_to_lock.as_ref().into());
        let l2g = Aes256Gcm::new(keys.lock_to_gateway.as_ref().into());
        let (seal_key, open_key) = match role {
            Role::Gateway => (g2l, l2g),
            Role::Lock => (l2g, g2l),
        };
        SecureChannel { seal_key, open_key, send_counter: 0, recv_counter: 0, closed: false }
    }

    /// Whether an error has closed the channel.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Seals `plaintext` into a complete frame.
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Vec<u8>, SessionError> {
        if self.closed {
            return Err(SessionError::Closed);
        }
        if plaintext.len() > MAX_PLAINTEXT_LEN {
            return Err(SessionError::TooLarge(plaintext.len()));
        }
        let counter = self.send_counter;
        let aad = header(counter);
        let body = self
            .seal_key
            .encrypt(Nonce::from_slice(&nonce(counter)), Payload { msg: plaintext, aad: &aad })
            .expect("AES-GCM sealing of a bounded message cannot fail");
        // 2^64 frames on one BLE connection cannot happen; saturating keeps nonce reuse impossible
        // even so, because the next seal then fails the counter check on the other side.
        self.send_counter = self.send_counter.checked_add(1).ok_or(SessionError::Closed)?;
        let mut frame = Vec::with_capacity(SEALED_HEADER_LEN + body.len());
        frame.extend_from_slice(&aad);
        frame.extend_from_slice(&body);
        Ok(frame)
    }

    /// Opens a complete frame; any failure closes the channel.
    pub fn open(&mut self, frame: &[u8]) -> Result<Zeroizing<Vec<u8>>, SessionError> {
        if self.closed {
            return Err(SessionError::Closed);
        }
        let result = self.open_inner(frame);
        if result.is_err() {
            self.closed = true;
        }
        result
    }

    fn open_inner(&mut self, frame: &[u8]) -> Result<Zeroizing<Vec<u8>>, SessionError> {
        let (counter, body) = match Frame::parse(frame)? {
            Frame::Sealed { counter, body } => (counter, body),
            other => return Err(SessionError::Plaintext(other.kind())),
        };
        let expected = self.recv_counter;
        if counter < expected {
            return Err(SessionError::Replayed { expected, got: counter });
        }
        if counter > expected {
            return Err(SessionError::Reordered { expected, got: counter });
        }
        let aad = header(counter);
        let plain = self
            .open_key
            .decrypt(Nonce::from_slice(&nonce(counter)), Payload { msg: &body, aad: &aad })
            .map_err(|_| SessionError::Tampered)?;
        self.recv_counter += 1;
        Ok(Zeroizing::new(plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (SecureChannel, SecureChannel) {
        let keys = SessionKeys::derive(&PairingKey::from_bytes([7; 32]), LockId([1; 8]), &[2; 16], &[3; 16]);
        (SecureChannel::new(&keys, Role::Gateway), SecureChannel::new(&keys, Role::Lock))
    }

    #[test]
    fn seal_open_both_directions() {
        let (mut gw, mut lock) = pair();
        let f = gw.seal(b"unlock").unwrap();
        assert_eq!(&lock.open(&f).unwrap()[..], b"unlock");
        let r = lock.seal(b"ok").unwrap();
        assert_eq!(&gw.open(&r).unwrap()[..], b"ok");
        // A frame sealed for one direction does not open in the other.
        let (mut gw2, _) = pair();
        let own = gw2.seal(b"x").unwrap();
        assert_eq!(gw2.open(&own), Err(SessionError::Tampered));
    }

    type Attack = Box<dyn Fn(&mut SecureChannel, &mut SecureChannel) -> SessionError>;

    #[test]
    fn replay_reorder_tamper_truncate_and_plaintext_close_the_channel() {
        let cases: Vec<(&str, Attack)> = vec![
            (
                "replay",
                Box::new(|gw, lock| {
                    let f = gw.seal(b"a").unwrap();
                    lock.open(&f).unwrap();
                    lock.open(&f).unwrap_err()
                }),
            ),
            (
                "reorder",
                Box::new(|gw, lock| {
                    let _first = gw.seal(b"a").unwrap();
                    let second = gw.seal(b"b").unwrap();
                    lock.open(&second).unwrap_err()
                }),
            ),
            (
                "tamper",
                Box::new(|gw, lock| {
                    let mut f = gw.seal(b"abc").unwrap();
                    f[SEALED_HEADER_LEN] ^= 1;
                    lock.open(&f).unwrap_err()
                }),
            ),
            (
                "tampered header",
                Box::new(|gw, lock| {
                    let mut f = gw.seal(b"abc").unwrap();
                    f[1] = 0x21;
                    lock.open(&f).unwrap_err()
                }),
            ),
            (
                "truncate",
                Box::new(|gw, lock| {
                    let f = gw.seal(b"abcdef").unwrap();
                    lock.open(&f[..f.len() - 1]).unwrap_err()
                }),
            ),
            ("plaintext", Box::new(|_gw, lock| lock.open(&Frame::Hello { nonce: [0; 16] }.encode()).unwrap_err())),
        ];
        for (name, case) in cases {
            let (mut gw, mut lock) = pair();
            let err = case(&mut gw, &mut lock);
            match name {
                "replay" => assert_eq!(err, SessionError::Replayed { expected: 1, got: 0 }),
                "reorder" => assert_eq!(err, SessionError::Reordered { expected: 0, got: 1 }),
                "tamper" | "truncate" => assert_eq!(err, SessionError::Tampered),
                "tampered header" => assert!(matches!(err, SessionError::Malformed(_))),
                "plaintext" => assert_eq!(err, SessionError::Plaintext(kind::HELLO)),
                _ => unreachable!(),
            }
            assert!(lock.is_closed(), "{name} must close the session");
            let next = gw.seal(b"later").unwrap();
            assert_eq!(lock.open(&next), Err(SessionError::Closed), "{name}");
        }
    }

    #[test]
    fn a_full_frame_carries_998_bytes_and_not_one_more() {
        // docs/protocol.md: 1024 − 10 − 16.
        assert_eq!(MAX_PLAINTEXT_LEN, 998);
        let (mut gw, mut lock) = pair();
        let full = gw.seal(&[0x5a; MAX_PLAINTEXT_LEN]).unwrap();
        assert_eq!(full.len(), MAX_FRAME_LEN);
        assert_eq!(&lock.open(&full).unwrap()[..], &[0x5a; MAX_PLAINTEXT_LEN][..]);
        assert_eq!(gw.seal(&[0; MAX_PLAINTEXT_LEN + 1]), Err(SessionError::TooLarge(MAX_PLAINTEXT_LEN + 1)));
        // Refusing to seal is not an error of the channel: the next frame still goes out.
        assert!(!gw.is_closed());
        assert_eq!(&lock.open(&gw.seal(b"next").unwrap()).unwrap()[..], b"next");
        assert!(!lock.is_closed());
    }

    #[test]
    fn no_key_is_ever_printed() {
        let keys = SessionKeys::derive(&PairingKey::from_bytes([7; 32]), LockId([1; 8]), &[2; 16], &[3; 16]);
        assert_eq!(format!("{keys:?}"), "SessionKeys(<redacted>)");
        let (gw, _) = pair();
        assert_eq!(format!("{gw:?}"), "SecureChannel { send_counter: 0, recv_counter: 0, closed: false, .. }");
    }

    #[test]
    fn each_frame_has_its_own_nonce() {
        // AES-GCM under one key must never see a nonce twice: the same plaintext sealed again
        // must not give the same ciphertext (and tag).
        let (mut gw, _) = pair();
        let bodies: Vec<Vec<u8>> = (0..3).map(|_| gw.seal(b"unlock").unwrap()[SEALED_HEADER_LEN..].to_vec()).collect();
        assert!(bodies[0] != bodies[1] && bodies[1] != bodies[2] && bodies[0] != bodies[2], "{bodies:?}");
        assert_eq!(nonce(0x0102_0304_0506_0708), [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
    }
}
