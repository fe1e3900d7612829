//! The signed envelope: JWS compact serialization with EdDSA over Ed25519 (RFC 7515, RFC 8037),
//! so that any JOSE library can produce what the gateway accepts.
//!
//! `BASE64URL(header) "." BASE64URL(payload) "." BASE64URL(signature)`, unpadded. The header is
//! exactly `{"alg":"EdDSA","typ":<statement type>,"kid":<signer's public key, base64url>}`:
//! the key travels with the statement, and the signature proves its holder signed; whether that
//! key may do anything is the policy's question, not the envelope's. Parsing is strict: a
//! size cap, canonical unpadded base64url, no unknown header fields, no algorithm but EdDSA
//! (`none` and HMAC confusion are impossible by construction), and `verify_strict` (no small-order
//! keys, no malleable signatures).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::keys::PublicKey;

/// Largest envelope accepted, in bytes (the cloud link's command cap).
pub const MAX_JWS_LEN: usize = 16 * 1024;

/// Largest header accepted, in bytes (encoded).
const MAX_HEADER_LEN: usize = 512;

/// Why an envelope was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum JwsError {
    /// Not three base64url parts, too long, or a header that is not ours.
    #[error("malformed envelope: {0}")]
    Malformed(&'static str),
    /// An algorithm other than EdDSA.
    #[error("unsupported algorithm (only EdDSA is accepted)")]
    Algorithm,
    /// The signature does not verify with the key in the header.
    #[error("bad signature")]
    BadSignature,
}

/// The protected header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Always `EdDSA`.
    pub alg: String,
    /// The statement type, e.g. `lockhub.command`.
    pub typ: String,
    /// The signer's Ed25519 public key, base64url.
    pub kid: String,
}

/// A parsed, not yet verified envelope.
#[derive(Clone, Debug)]
pub struct Jws<'a> {
    /// The header.
    pub header: Header,
    /// The signer's key, from `kid`.
    pub signer: PublicKey,
    /// The decoded payload (JSON claims).
    pub payload: Vec<u8>,
    signing_input: &'a str,
    signature: Signature,
}

fn decode(part: &str, what: &'static str) -> Result<Vec<u8>, JwsError> {
    URL_SAFE_NO_PAD.decode(part).map_err(|_| JwsError::Malformed(what))
}

impl<'a> Jws<'a> {
    /// Parses an envelope without verifying it (so that a refusal can still name the
    /// statement's id).
    pub fn parse(text: &'a str) -> Result<Self, JwsError> {
        if text.len() > MAX_JWS_LEN {
            return Err(JwsError::Malformed("too long"));
        }
        let mut parts = text.split('.');
        let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(JwsError::Malformed("expected three dot-separated parts"));
        };
        if h.is_empty() || p.is_empty() || s.is_empty() || h.len() > MAX_HEADER_LEN {
            return Err(JwsError::Malformed("empty or oversized part"));
        }
        let header: Header = serde_json::from_slice(&decode(h, "header is not base64url")?)
            .map_err(|_| JwsError::Malformed("header is not {alg, typ, kid}"))?;
        if header.alg != "EdDSA" {
            return Err(JwsError::Algorithm);
        }
        let signer = PublicKey::from_base64(&header.kid).map_err(|_| JwsError::Malformed("kid is not a public key"))?;
        let payload = decode(p, "payload is not base64url")?;
        let signature: [u8; 64] =
            decode(s, "signature is not base64url")?.try_into().map_err(|_| JwsError::Malformed("signature length"))?;
        Ok(Jws { header, signer, payload, signing_input: &text[..h.len() + 1 + p.len()], signature: signature.into() })
    }

    /// Verifies the signature with the key the header names.
    pub fn verify(&self) -> Result<(), JwsError> {
        let key = VerifyingKey::from_bytes(self.signer.as_bytes()).map_err(|_| JwsError::BadSignature)?;
        key.verify_strict(self.signing_input.as_bytes(), &self.signature).map_err(|_| JwsError::BadSignature)
    }
}

/// Signs `payload` as a statement of type `typ`.
pub fn sign(typ: &str, payload: &[u8], key: &SigningKey) -> String {
    let header = Header { alg: "EdDSA".into(), typ: typ.into(), kid: PublicKey::from(key.verifying_key()).to_base64() };
    let header = serde_json::to_vec(&header).expect("a header always serialises");
    let mut out = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
    let signature = key.sign(out.as_bytes());
    out.push('.');
    out.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    #[test]
    fn a_signed_envelope_parses_and_verifies() {
        let text = sign("lockhub.command", br#"{"a":1}"#, &key(1));
        let jws = Jws::parse(&text).unwrap();
        assert_eq!(jws.header.typ, "lockhub.command");
        assert_eq!(jws.payload, br#"{"a":1}"#);
        assert_eq!(jws.signer, PublicKey::from(key(1).verifying_key()));
        jws.verify().unwrap();
    }

    #[test]
    fn tampering_breaks_the_signature() {
        let text = sign("lockhub.command", br#"{"op":"lock"}"#, &key(1));
        let parts: Vec<&str> = text.split('.').collect();
        let forged_payload = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(br#"{"op":"unlock"}"#), parts[2]);
        assert_eq!(Jws::parse(&forged_payload).unwrap().verify(), Err(JwsError::BadSignature));
        // Another key in the header: the signature is not that key's.
        let other = sign("lockhub.command", br#"{"op":"lock"}"#, &key(2));
        let swapped = format!("{}.{}.{}", other.split('.').next().unwrap(), parts[1], parts[2]);
        assert_eq!(Jws::parse(&swapped).unwrap().verify(), Err(JwsError::BadSignature));
    }

    /// A signed envelope of exactly `len` bytes. Unpadded base64url of n bytes is ⌈4n / 3⌉
    /// characters, which skips every length ≡ 1 (mod 4): a longer `typ` (a longer header)
    /// covers those.
    fn envelope_of(len: usize) -> String {
        for typ in ["t", "tt", "ttt"] {
            let header = sign(typ, b"", &key(1)).split('.').next().unwrap().len();
            // header "." payload "." signature (64 bytes: 86 characters)
            if let Some(n) = (0..len).find(|n| header + 1 + (4 * n).div_ceil(3) + 1 + 86 == len) {
                let text = sign(typ, &vec![b' '; n], &key(1));
                assert_eq!(text.len(), len);
                return text;
            }
        }
        panic!("no envelope of {len} bytes")
    }

    #[test]
    fn the_size_caps_are_exact() {
        // The whole envelope: the cloud link's command cap, so that nothing the link takes in
        // is refused as too long here; at the cap accepted, a byte over refused before any
        // decoding.
        assert_eq!(MAX_JWS_LEN, crate::cloud::link::MAX_COMMAND_BYTES);
        Jws::parse(&envelope_of(MAX_JWS_LEN)).unwrap().verify().unwrap();
        assert_eq!(Jws::parse(&envelope_of(MAX_JWS_LEN + 1)).unwrap_err(), JwsError::Malformed("too long"));

        // The header: 512 encoded bytes accepted, 513 refused (a longer `typ` grows it).
        let header_of = |typ_len: usize| {
            let text = sign(&"t".repeat(typ_len), b"{}", &key(1));
            let header_len = text.split('.').next().unwrap().len();
            (header_len, text)
        };
        let fits = (1..600).map(header_of).filter(|(h, _)| *h <= MAX_HEADER_LEN).max_by_key(|(h, _)| *h).unwrap();
        let too_long = (1..600).map(header_of).find(|(h, _)| *h > MAX_HEADER_LEN).unwrap();
        assert!(fits.0 > MAX_HEADER_LEN - 2 && too_long.0 <= MAX_HEADER_LEN + 2, "{} {}", fits.0, too_long.0);
        Jws::parse(&fits.1).unwrap().verify().unwrap();
        assert_eq!(Jws::parse(&too_long.1).unwrap_err(), JwsError::Malformed("empty or oversized part"));
    }

    #[test]
    fn an_empty_part_is_refused_as_such() {
        let good = sign("t", b"{}", &key(1));
        let parts: Vec<&str> = good.split('.').collect();
        for case in [
            format!(".{}.{}", parts[1], parts[2]),
            format!("{}..{}", parts[0], parts[2]),
            format!("{}.{}.", parts[0], parts[1]),
        ] {
            assert_eq!(Jws::parse(&case).unwrap_err(), JwsError::Malformed("empty or oversized part"), "{case}");
        }
    }

    #[test]
    fn anything_but_our_compact_eddsa_form_is_refused() {
        let good = sign("t", b"{}", &key(1));
        let parts: Vec<&str> = good.split('.').collect();
        let header = |json: &str| URL_SAFE_NO_PAD.encode(json);
        let kid = PublicKey::from(key(1).verifying_key()).to_base64();
        let cases = [
            format!("{}.{}", parts[0], parts[1]),
            format!("{good}.x"),
            format!("{}.{}.{}", header(&format!(r#"{{"alg":"none","typ":"t","kid":"{kid}"}}"#)), parts[1], parts[2]),
            format!("{}.{}.{}", header(&format!(r#"{{"alg":"HS256","typ":"t","kid":"{kid}"}}"#)), parts[1], parts[2]),
            format!(
                "{}.{}.{}",
                header(&format!(r#"{{"alg":"EdDSA","typ":"t","kid":"{kid}","crit":["x"]}}"#)),
                parts[1],
                parts[2]
            ),
            format!("{}.{}.{}", header(r#"{"alg":"EdDSA","typ":"t","kid":"short"}"#), parts[1], parts[2]),
            format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
            format!("{}.{}.{}", parts[0], parts[1], &parts[2][..40]),
            format!("{}.{}+.{}", parts[0], parts[1], parts[2]),
            "x".repeat(MAX_JWS_LEN + 1),
            String::new(),
        ];
        for case in cases {
            assert!(Jws::parse(&case).is_err(), "accepted {case:?}");
        }
        assert_eq!(
            Jws::parse(&format!(
                "{}.{}.{}",
                header(&format!(r#"{{"alg":"none","typ":"t","kid":"{kid}"}}"#)),
                parts[1],
                parts[2]
            ))
            .unwrap_err(),
            JwsError::Algorithm
        );
    }
}
