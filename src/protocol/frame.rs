//! LHP/1 frames: the unit the fragment layer carries.
//!
//! Every frame starts with the protocol version and a type byte. Handshake frames (pairing and
//! session hello) travel in clear because they carry nothing secret; after the hello, only
//! [`Frame::Sealed`] is accepted in either direction. Layouts are in `docs/protocol.md`.

use thiserror::Error;

use super::gatt::PROTOCOL_VERSION;
use super::ids::GatewayId;

/// SPAKE2 (Ed25519 group) message length: a side byte and a compressed point.
pub const SPAKE_MSG_LEN: usize = 33;
/// Pairing key-confirmation tag length (HMAC-SHA256).
pub const PAIR_CONFIRM_LEN: usize = 32;
/// Session nonce length, one from each side.
pub const NONCE_LEN: usize = 16;
/// Session hello confirmation tag length (truncated HMAC-SHA256).
pub const HELLO_CONFIRM_LEN: usize = 16;
/// Length of the authenticated header of a sealed frame: version, type, counter.
pub const SEALED_HEADER_LEN: usize = 10;
/// AES-GCM tag length.
pub const TAG_LEN: usize = 16;

/// Frame type bytes.
pub mod kind {
    /// Gateway → lock: start pairing.
    pub const PAIR_REQUEST: u8 = 0x01;
    /// Lock → gateway: SPAKE2 reply and the lock's confirmation.
    pub const PAIR_RESPONSE: u8 = 0x02;
    /// Gateway → lock: the gateway's confirmation.
    pub const PAIR_CONFIRM: u8 = 0x03;
    /// Lock → gateway: pairing stored.
    pub const PAIR_DONE: u8 = 0x04;
    /// Lock → gateway: pairing refused.
    pub const PAIR_REJECT: u8 = 0x05;
    /// Gateway → lock: open a session.
    pub const HELLO: u8 = 0x10;
    /// Lock → gateway: the lock's nonce and proof of the pairing key.
    pub const HELLO_REPLY: u8 = 0x11;
    /// Lock → gateway: no session possible.
    pub const HELLO_REJECT: u8 = 0x12;
    /// Either way: an AES-GCM sealed message.
    pub const SEALED: u8 = 0x20;
}

/// Why a lock refused to pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairRejectReason {
    /// The lock is not in pairing mode (press its pairing button, or factory-reset it).
    NotInPairingMode = 1,
    /// Key confirmation failed: the setup code was wrong, or the exchange was tampered with.
    ConfirmationFailed = 2,
    /// Too many failed attempts: the lock left pairing mode.
    AttemptsExhausted = 3,
    /// A frame arrived that does not belong in the pairing exchange.
    Unexpected = 4,
}

/// Why a lock refused a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelloRejectReason {
    /// The lock holds no pairing (never paired, unpaired, or factory reset).
    NotPaired = 1,
    /// A frame arrived that does not belong in the session handshake.
    Unexpected = 2,
}

/// A parsed frame.
#[derive(Clone, PartialEq, Eq)]
pub enum Frame {
    /// Gateway → lock: the gateway's id and its SPAKE2 message.
    PairRequest {
        /// Who is pairing; bound into the SPAKE2 transcript.
        gateway_id: GatewayId,
        /// SPAKE2 message of side A.
        spake: [u8; SPAKE_MSG_LEN],
    },
    /// Lock → gateway: SPAKE2 message of side B and the lock's key confirmation.
    PairResponse {
        /// SPAKE2 message of side B.
        spake: [u8; SPAKE_MSG_LEN],
        /// HMAC proving the lock derived the same key.
        confirm: [u8; PAIR_CONFIRM_LEN],
    },
    /// Gateway → lock: the gateway's key confirmation.
    PairConfirm {
        /// HMAC proving the gateway derived the same key.
        confirm: [u8; PAIR_CONFIRM_LEN],
    },
    /// Lock → gateway: the pairing key is stored; the lock has left pairing mode.
    PairDone,
    /// Lock → gateway: pairing refused.
    PairReject {
        /// Why.
        reason: PairRejectReason,
        /// Attempts left before the lock leaves pairing mode.
        attempts_left: u8,
    },
    /// Gateway → lock: open a session with this fresh nonce.
    Hello {
        /// The gateway's nonce.
        nonce: [u8; NONCE_LEN],
    },
    /// Lock → gateway: the lock's fresh nonce and a tag proving it holds the pairing key.
    HelloReply {
        /// The lock's nonce.
        nonce: [u8; NONCE_LEN],
        /// Truncated HMAC over both nonces under the session confirmation key.
        confirm: [u8; HELLO_CONFIRM_LEN],
    },
    /// Lock → gateway: no session.
    HelloReject {
        /// Why.
        reason: HelloRejectReason,
    },
    /// An encrypted message; `body` is ciphertext followed by the 16-byte tag.
    Sealed {
        /// Per-direction counter, also the AEAD nonce.
        counter: u64,
        /// Ciphertext and tag.
        body: Vec<u8>,
    },
}

impl std::fmt::Debug for Frame {
    // Handshake frames hold public values only, but a generic dump of a frame has no place
    // in logs: show the type and sizes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Frame::PairRequest { gateway_id, .. } => write!(f, "PairRequest({gateway_id})"),
            Frame::PairResponse { .. } => f.write_str("PairResponse"),
            Frame::PairConfirm { .. } => f.write_str("PairConfirm"),
            Frame::PairDone => f.write_str("PairDone"),
            Frame::PairReject { reason, attempts_left } => {
                write!(f, "PairReject({reason:?}, {attempts_left} left)")
            }
            Frame::Hello { .. } => f.write_str("Hello"),
            Frame::HelloReply { .. } => f.write_str("HelloReply"),
            Frame::HelloReject { reason } => write!(f, "HelloReject({reason:?})"),
            Frame::Sealed { counter, body } => write!(f, "Sealed(#{counter}, {} bytes)", body.len()),
        }
    }
}

/// Why bytes are not a valid frame.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// Shorter than a frame header.
    #[error("frame too short")]
    TooShort,
    /// A version other than LHP/1.
    #[error("unsupported protocol version {0} (no downgrade: LHP/1 only)")]
    Version(u8),
    /// An unknown type byte.
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    /// The body length does not match the frame type.
    #[error("frame type 0x{kind:02x} has a {got}-byte body, expected {expected}")]
    Length {
        /// Frame type.
        kind: u8,
        /// Expected body length (minimum for sealed frames).
        expected: usize,
        /// Body length received.
        got: usize,
    },
    /// A field holds a value LHP/1 does not define.
    #[error("invalid value in frame type 0x{0:02x}")]
    BadValue(u8),
}

fn array<const N: usize>(kind: u8, body: &[u8]) -> Result<[u8; N], FrameError> {
    body.try_into().map_err(|_| FrameError::Length { kind, expected: N, got: body.len() })
}

impl Frame {
    /// The type byte of this frame.
    pub fn kind(&self) -> u8 {
        match self {
            Frame::PairRequest { .. } => kind::PAIR_REQUEST,
            Frame::PairResponse { .. } => kind::PAIR_RESPONSE,
            Frame::PairConfirm { .. } => kind::PAIR_CONFIRM,
            Frame::PairDone => kind::PAIR_DONE,
            Frame::PairReject { .. } => kind::PAIR_REJECT,
            Frame::Hello { .. } => kind::HELLO,
            Frame::HelloReply { .. } => kind::HELLO_REPLY,
            Frame::HelloReject { .. } => kind::HELLO_REJECT,
            Frame::Sealed { .. } => kind::SEALED,
        }
    }

    /// Encodes the frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![PROTOCOL_VERSION, self.kind()];
        match self {
            Frame::PairRequest { gateway_id, spake } => {
                out.push(gateway_id.as_str().len() as u8);
                out.extend_from_slice(gateway_id.as_str().as_bytes());
                out.extend_from_slice(spake);
            }
            Frame::PairResponse { spake, confirm } => {
                out.extend_from_slice(spake);
                out.extend_from_slice(confirm);
            }
            Frame::PairConfirm { confirm } => out.extend_from_slice(confirm),
            Frame::PairDone => {}
            Frame::PairReject { reason, attempts_left } => {
                out.push(*reason as u8);
                out.push(*attempts_left);
            }
            Frame::Hello { nonce } => out.extend_from_slice(nonce),
            Frame::HelloReply { nonce, confirm } => {
                out.extend_from_slice(nonce);
                out.extend_from_slice(confirm);
            }
            Frame::HelloReject { reason } => out.push(*reason as u8),
            Frame::Sealed { counter, body } => {
                out.extend_from_slice(&counter.to_be_bytes());
                out.extend_from_slice(body);
            }
        }
        out
    }

    /// Parses a frame strictly: exact lengths, known types and values, version 1 only.
    pub fn parse(bytes: &[u8]) -> Result<Frame, FrameError> {
        let [version, kind, body @ ..] = bytes else {
            return Err(FrameError::TooShort);
        };
        if *version != PROTOCOL_VERSION {
            return Err(FrameError::Version(*version));
        }
        let kind = *kind;
        let len_err = |expected| FrameError::Length { kind, expected, got: body.len() };
        Ok(match kind {
            kind::PAIR_REQUEST => {
                let (&id_len, rest) = body.split_first().ok_or(len_err(1 + SPAKE_MSG_LEN))?;
                let id_len = usize::from(id_len);
                if rest.len() != id_len + SPAKE_MSG_LEN {
                    return Err(len_err(1 + id_len + SPAKE_MSG_LEN));
                }
                let id = std::str::from_utf8(&rest[..id_len]).map_err(|_| FrameError::BadValue(kind))?;
                Frame::PairRequest {
                    gateway_id: GatewayId::new(id).map_err(|_| FrameError::BadValue(kind))?,
                    spake: array(kind, &rest[id_len..])?,
                }
            }
            kind::PAIR_RESPONSE => {
                if body.len() != SPAKE_MSG_LEN + PAIR_CONFIRM_LEN {
                    return Err(len_err(SPAKE_MSG_LEN + PAIR_CONFIRM_LEN));
                }
                Frame::PairResponse {
                    spake: array(kind, &body[..SPAKE_MSG_LEN])?,
                    confirm: array(kind, &body[SPAKE_MSG_LEN..])?,
                }
            }
            kind::PAIR_CONFIRM => Frame::PairConfirm { confirm: array(kind, body)? },
            kind::PAIR_DONE if body.is_empty() => Frame::PairDone,
            kind::PAIR_DONE => return Err(len_err(0)),
            kind::PAIR_REJECT => {
                let [reason, attempts_left] = array(kind, body)?;
                let reason = match reason {
                    1 => PairRejectReason::NotInPairingMode,
                    2 => PairRejectReason::ConfirmationFailed,
                    3 => PairRejectReason::AttemptsExhausted,
                    4 => PairRejectReason::Unexpected,
                    _ => return Err(FrameError::BadValue(kind)),
                };
                Frame::PairReject { reason, attempts_left }
            }
            kind::HELLO => Frame::Hello { nonce: array(kind, body)? },
            kind::HELLO_REPLY => {
                if body.len() != NONCE_LEN + HELLO_CONFIRM_LEN {
                    return Err(len_err(NONCE_LEN + HELLO_CONFIRM_LEN));
                }
                Frame::HelloReply { nonce: array(kind, &body[..NONCE_LEN])?, confirm: array(kind, &body[NONCE_LEN..])? }
            }
            kind::HELLO_REJECT => {
                let [reason] = array(kind, body)?;
                let reason = match reason {
                    1 => HelloRejectReason::NotPaired,
                    2 => HelloRejectReason::Unexpected,
                    _ => return Err(FrameError::BadValue(kind)),
                };
                Frame::HelloReject { reason }
            }
            kind::SEALED => {
                if body.len() < 8 + TAG_LEN {
                    return Err(len_err(8 + TAG_LEN));
                }
                let counter = u64::from_be_bytes(array(kind, &body[..8])?);
                Frame::Sealed { counter, body: body[8..].to_vec() }
            }
            other => return Err(FrameError::UnknownType(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One frame of each type; the sealed one as short as a sealed frame may be (a tag and
    /// no ciphertext).
    fn one_of_each() -> Vec<Frame> {
        vec![
            Frame::PairRequest { gateway_id: GatewayId::new("gw-1").unwrap(), spake: [7; 33] },
            Frame::PairResponse { spake: [1; 33], confirm: [2; 32] },
            Frame::PairConfirm { confirm: [3; 32] },
            Frame::PairDone,
            Frame::PairReject { reason: PairRejectReason::AttemptsExhausted, attempts_left: 0 },
            Frame::Hello { nonce: [4; 16] },
            Frame::HelloReply { nonce: [5; 16], confirm: [6; 16] },
            Frame::HelloReject { reason: HelloRejectReason::NotPaired },
            Frame::Sealed { counter: 42, body: vec![9; TAG_LEN] },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in one_of_each().into_iter().chain([Frame::Sealed { counter: u64::MAX, body: vec![9; 200] }]) {
            assert_eq!(Frame::parse(&f.encode()).unwrap(), f);
        }
    }

    /// A frame one byte short, or one byte long where its length is fixed, is refused with
    /// the exact length its type wanted: the error says what to fix.
    #[test]
    fn a_wrong_length_names_the_length_wanted() {
        for f in one_of_each() {
            let bytes = f.encode();
            let body = bytes.len() - 2;
            if body == 0 {
                let long = [bytes.as_slice(), &[0]].concat();
                let want = FrameError::Length { kind: f.kind(), expected: 0, got: 1 };
                assert_eq!(Frame::parse(&long), Err(want), "{f:?}");
                continue;
            }
            let want = FrameError::Length { kind: f.kind(), expected: body, got: body - 1 };
            assert_eq!(Frame::parse(&bytes[..bytes.len() - 1]), Err(want), "{f:?}");
        }
        // A pairing request's length follows from its id's: with the id's length byte alone,
        // and with an id of four bytes announced but cut short.
        let want = |expected, got| Err(FrameError::Length { kind: kind::PAIR_REQUEST, expected, got });
        assert_eq!(Frame::parse(&[PROTOCOL_VERSION, kind::PAIR_REQUEST]), want(1 + SPAKE_MSG_LEN, 0));
        assert_eq!(Frame::parse(&[PROTOCOL_VERSION, kind::PAIR_REQUEST, 4, b'g']), want(1 + 4 + SPAKE_MSG_LEN, 2));
    }

    /// Every refusal reason LHP/1 defines survives the wire; a byte it does not define is a
    /// bad value, not some other reason.
    #[test]
    fn every_refusal_reason_round_trips_and_no_other() {
        use PairRejectReason as P;
        for reason in [P::NotInPairingMode, P::ConfirmationFailed, P::AttemptsExhausted, P::Unexpected] {
            let f = Frame::PairReject { reason, attempts_left: 2 };
            assert_eq!(Frame::parse(&f.encode()), Ok(f));
        }
        for reason in [HelloRejectReason::NotPaired, HelloRejectReason::Unexpected] {
            let f = Frame::HelloReject { reason };
            assert_eq!(Frame::parse(&f.encode()), Ok(f));
        }
        for byte in [0, 5, 0xff] {
            let pair = [PROTOCOL_VERSION, kind::PAIR_REJECT, byte, 0];
            assert_eq!(Frame::parse(&pair), Err(FrameError::BadValue(kind::PAIR_REJECT)), "{byte}");
        }
        for byte in [0, 3, 0xff] {
            let hello = [PROTOCOL_VERSION, kind::HELLO_REJECT, byte];
            assert_eq!(Frame::parse(&hello), Err(FrameError::BadValue(kind::HELLO_REJECT)), "{byte}");
        }
    }

    /// A frame's debug form shows its type and sizes, never the bytes it carries.
    #[test]
    fn debug_shows_the_type_and_sizes_only() {
        let shown: Vec<String> = one_of_each().iter().map(|f| format!("{f:?}")).collect();
        assert_eq!(
            shown,
            [
                "PairRequest(gw-1)",
                "PairResponse",
                "PairConfirm",
                "PairDone",
                "PairReject(AttemptsExhausted, 0 left)",
                "Hello",
                "HelloReply",
                "HelloReject(NotPaired)",
                "Sealed(#42, 16 bytes)",
            ]
        );
    }

    #[test]
    fn refuses_other_versions_and_trailing_bytes() {
        let mut hello = Frame::Hello { nonce: [0; 16] }.encode();
        hello[0] = 0;
        assert_eq!(Frame::parse(&hello), Err(FrameError::Version(0)));
        let mut done = Frame::PairDone.encode();
        done.push(0);
        assert!(matches!(Frame::parse(&done), Err(FrameError::Length { .. })));
        assert_eq!(Frame::parse(&[1, 0x99]), Err(FrameError::UnknownType(0x99)));
        assert_eq!(Frame::parse(&[1]), Err(FrameError::TooShort));
    }
}
