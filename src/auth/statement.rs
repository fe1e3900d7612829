//! The signed statements the gateway accepts on its command topic, and the strict opening of
//! an envelope into one of them.
//!
//! Every statement carries `jti` (its id, unique per signer; replies and deduplication use it),
//! `gw` (the gateway it is for), `iat` and `exp` (Unix seconds). The JWS header's `typ` says
//! which statement the payload is; payloads have no field beyond those documented (unknown
//! fields are refused, so that a signer never believes a constraint was honoured that the
//! gateway ignored). Who may sign what is decided later, by the policy.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::jws::Jws;
use super::keys::PublicKey;
use super::reason::Reason;
use crate::protocol::ids::{GatewayId, LockId};

/// The `typ` of each statement.
pub mod typ {
    /// The owner claims the gateway.
    pub const CLAIM: &str = "lockhub.claim";
    /// The owner pairs a lock.
    pub const PAIR: &str = "lockhub.pair";
    /// The owner grants a user permissions on a lock.
    pub const GRANT: &str = "lockhub.grant";
    /// The owner revokes a grant.
    pub const REVOKE: &str = "lockhub.revoke";
    /// The owner sets a lock's remote policy.
    pub const POLICY: &str = "lockhub.policy";
    /// A user operates a lock.
    pub const COMMAND: &str = "lockhub.command";
    /// The owner gives a user a local code for a lock.
    pub const LOCAL_CODE: &str = "lockhub.local_code";
}

/// Longest a command may be valid: `exp - iat` at most this many seconds.
pub const MAX_COMMAND_LIFETIME_S: i64 = 60;

/// The latest time a statement may name: the last second of the year 9999.
pub const MAX_TIME: i64 = 253_402_300_799;

/// A statement id: 1 to 64 characters of `[A-Za-z0-9._-]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StatementId(String);

/// A malformed statement id.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("statement id: 1 to 64 characters of letters, digits, '.', '_' or '-'")]
pub struct BadId;

impl StatementId {
    /// Validates an id.
    pub fn new(s: impl Into<String>) -> Result<Self, BadId> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if ok { Ok(StatementId(s)) } else { Err(BadId) }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for StatementId {
    type Error = BadId;
    fn try_from(s: String) -> Result<Self, BadId> {
        StatementId::new(s)
    }
}

impl From<StatementId> for String {
    fn from(id: StatementId) -> String {
        id.0
    }
}

impl std::fmt::Display for StatementId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lock ids in statements: exactly 16 lowercase or uppercase hex digits, nothing around them.
mod lock_hex {
    use super::LockId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(id: &LockId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&id.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<LockId, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        if text.len() != 16 {
            return Err(serde::de::Error::custom("a lock id is 16 hex digits"));
        }
        LockId::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// An operation on a lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// Throw the bolt.
    Lock,
    /// Retract the bolt.
    Unlock,
    /// Retract the bolt and pull the latch (the door opens).
    Unlatch,
}

impl Operation {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Lock => "lock",
            Operation::Unlock => "unlock",
            Operation::Unlatch => "unlatch",
        }
    }
}

/// What a grant allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// May lock.
    Lock,
    /// May unlock.
    Unlock,
    /// May unlatch.
    Unlatch,
    /// May do the above from the cloud (not only locally).
    Remote,
}

/// The owner claims the gateway with the one-time code it shows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claim {
    /// Statement id.
    pub jti: StatementId,
    /// The gateway.
    pub gw: GatewayId,
    /// The claim code the gateway shows.
    pub code: String,
    /// Issued at.
    pub iat: i64,
    /// Expires at.
    pub exp: i64,
}

/// The owner pairs a lock, with the setup code on its label.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pair {
    /// Statement id.
    pub jti: StatementId,
    /// The gateway.
    pub gw: GatewayId,
    /// The lock.
    #[serde(with = "lock_hex")]
    pub lock: LockId,
    /// The lock's setup code.
    pub setup: String,
    /// Issued at.
    pub iat: i64,
    /// Expires at.
    pub exp: i64,
}

/// A weekly schedule in a named time zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// IANA time zone name, e.g. `Europe/Berlin`.
    pub tz: String,
    /// Days of the week: `mon` … `sun`.
    pub days: Vec<String>,
    /// Start of the daily window, `HH:MM` local time.
    pub from: String,
    /// End of the daily window, `HH:MM` local time (before `from`: the window spans midnight).
    pub to: String,
}

/// The owner grants a user permissions on a lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Statement id (also the grant's id, which revocations name).
    pub jti: StatementId,
    /// The gateway.
    pub gw: GatewayId,
    /// The user's public key.
    pub sub: PublicKey,
    /// The lock.
    #[serde(with = "lock_hex")]
    pub lock: LockId,
    /// What the user may do.
    pub perms: Vec<Permission>,
    /// Valid from.
    pub nbf: i64,
    /// Issued at.
    pub iat: i64,
    /// Valid until.
    pub exp: i64,
    /// When in the week, if restricted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
}

/// The owner revokes a grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revoke {
    /// Statement id.
    pub jti: StatementId,
    /// The gateway.
    pub gw: GatewayId,
    /// The grant revoked.
    pub grant: StatementId,
    /// Issued at.
    pub iat: i64,
    /// Expires at (of the statement, not of the revocation, which is permanent).
    pub exp: i64,
}

/// The owner's remote policy for a lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Statement id.
    pub jti: StatementId,
    /// The gateway.
    pub gw: GatewayId,
    /// The lock.
    #[serde(with = "lock_hex")]
    pub lock: LockId,
    /// Whether remote unlock and unlatch are allowed at all.
    pub remote_unlock: bool,
    /// Daily quiet hours during which only the owner operates remotely.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiet_hours: Option<Schedule>,
    /// Issued at.
    pub iat: i64,
    /// Expires at (of the statement).
    pub exp: i64,
}

/// The owner gives a user a code for local control of a lock (Home Assistant, the local
/// broker). Only the code's Argon2id hash travels: the owner's app hashes it, so neither the
/// cloud nor the gateway ever sees the code. A newer local code for the same user and lock
/// replaces the older; a revocation naming this statement's id removes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalCode {
    /// Statement id (revocations name it).
    pub jti: StatementId,
    /// The gateway.
    pub gw: GatewayId,
    /// The user's public key.
    pub sub: PublicKey,
    /// The lock.
    #[serde(with = "lock_hex")]
    pub lock: LockId,
    /// The code's Argon2id hash, as a PHC string (`$argon2id$v=19$m=…,t=…,p=…$salt$hash`).
    pub hash: String,
    /// Valid from.
    pub nbf: i64,
    /// Issued at.
    pub iat: i64,
    /// Valid until.
    pub exp: i64,
}

/// A user operates a lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    /// Command id: replies name it; a second delivery gets the stored reply.
    pub jti: StatementId,
    /// The gateway.
    pub gw: GatewayId,
    /// The lock.
    #[serde(with = "lock_hex")]
    pub lock: LockId,
    /// The operation.
    pub op: Operation,
    /// Issued at.
    pub iat: i64,
    /// Expires at: at most [`MAX_COMMAND_LIFETIME_S`] after `iat`.
    pub exp: i64,
    /// Random, base64url, 16 to 64 characters: two commands never sign the same bytes.
    pub nonce: String,
}

/// Any statement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Statement {
    /// See [`Claim`].
    Claim(Claim),
    /// See [`Pair`].
    Pair(Pair),
    /// See [`Grant`].
    Grant(Grant),
    /// See [`Revoke`].
    Revoke(Revoke),
    /// See [`Policy`].
    Policy(Policy),
    /// See [`Command`].
    Command(Command),
    /// See [`LocalCode`].
    LocalCode(LocalCode),
}

impl Statement {
    /// Its id.
    pub fn id(&self) -> &StatementId {
        match self {
            Statement::Claim(s) => &s.jti,
            Statement::Pair(s) => &s.jti,
            Statement::Grant(s) => &s.jti,
            Statement::Revoke(s) => &s.jti,
            Statement::Policy(s) => &s.jti,
            Statement::Command(s) => &s.jti,
            Statement::LocalCode(s) => &s.jti,
        }
    }

    /// The gateway it is addressed to.
    pub fn gateway(&self) -> &GatewayId {
        match self {
            Statement::Claim(s) => &s.gw,
            Statement::Pair(s) => &s.gw,
            Statement::Grant(s) => &s.gw,
            Statement::Revoke(s) => &s.gw,
            Statement::Policy(s) => &s.gw,
            Statement::Command(s) => &s.gw,
            Statement::LocalCode(s) => &s.gw,
        }
    }

    /// Issued at and expires at.
    pub fn validity(&self) -> (i64, i64) {
        match self {
            Statement::Claim(s) => (s.iat, s.exp),
            Statement::Pair(s) => (s.iat, s.exp),
            Statement::Grant(s) => (s.iat, s.exp),
            Statement::Revoke(s) => (s.iat, s.exp),
            Statement::Policy(s) => (s.iat, s.exp),
            Statement::Command(s) => (s.iat, s.exp),
            Statement::LocalCode(s) => (s.iat, s.exp),
        }
    }

    /// Its `typ`.
    pub fn typ(&self) -> &'static str {
        match self {
            Statement::Claim(_) => typ::CLAIM,
            Statement::Pair(_) => typ::PAIR,
            Statement::Grant(_) => typ::GRANT,
            Statement::Revoke(_) => typ::REVOKE,
            Statement::Policy(_) => typ::POLICY,
            Statement::Command(_) => typ::COMMAND,
            Statement::LocalCode(_) => typ::LOCAL_CODE,
        }
    }

    /// The claims as JSON (what gets signed).
    pub fn to_json(&self) -> Vec<u8> {
        let json = match self {
            Statement::Claim(s) => serde_json::to_vec(s),
            Statement::Pair(s) => serde_json::to_vec(s),
            Statement::Grant(s) => serde_json::to_vec(s),
            Statement::Revoke(s) => serde_json::to_vec(s),
            Statement::Policy(s) => serde_json::to_vec(s),
            Statement::Command(s) => serde_json::to_vec(s),
            Statement::LocalCode(s) => serde_json::to_vec(s),
        };
        json.expect("statements always serialise")
    }

    /// Signs it: the JWS compact text to publish.
    pub fn sign(&self, key: &ed25519_dalek::SigningKey) -> String {
        super::jws::sign(self.typ(), &self.to_json(), key)
    }
}

/// A statement whose envelope parsed and whose signature verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signed {
    /// Who signed it.
    pub signer: PublicKey,
    /// What it says.
    pub statement: Statement,
}

/// Why an envelope was not opened, with the statement's id when it could be read (so that the
/// sender can be answered).
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{reason}: {detail}")]
pub struct Refusal {
    /// The statement's id, if readable.
    pub id: Option<StatementId>,
    /// The signer's key, if readable.
    pub signer: Option<PublicKey>,
    /// Why.
    pub reason: Reason,
    /// What exactly (no secrets: the envelope holds none).
    pub detail: String,
}

/// The `jti` of an envelope that does not parse, when its second part still reads as claims
/// naming one; nothing for one over the size bound.
fn readable_id(text: &str) -> Option<StatementId> {
    use base64::Engine;
    if text.len() > super::jws::MAX_JWS_LEN {
        return None;
    }
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text.split('.').nth(1)?).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&payload).ok()?;
    StatementId::new(claims.get("jti")?.as_str()?).ok()
}

/// The claims of a statement of type `typ`. serde's messages quote the input (an unknown field's
/// name, a value that is not a variant): the refusal says what kind of fault and where instead,
/// so that no reply, log line or audit record carries a sender's bytes.
fn claims<T: serde::de::DeserializeOwned>(typ: &str, payload: &[u8]) -> Result<T, String> {
    serde_json::from_slice(payload).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Io => "unreadable",
            serde_json::error::Category::Syntax => "not JSON",
            serde_json::error::Category::Eof => "cut short",
            serde_json::error::Category::Data => "not the claims its schema allows",
        };
        format!("the {typ} claims are {kind} (at byte {} of line {}); see docs/schemas", e.column(), e.line())
    })
}

/// Opens an envelope: parse, decode the claims its `typ` announces (strictly), check the
/// lifetime rules that do not depend on the clock, and verify the signature.
pub fn open(text: &str) -> Result<Signed, Refusal> {
    let refuse = |id, signer, reason, detail: String| Refusal { id, signer, reason, detail };
    // Parsing checks no signature (`verify` below does): whatever it refuses is malformed, and
    // answered when its claims still name an id (an `alg` other than EdDSA, say).
    let jws = Jws::parse(text).map_err(|e| refuse(readable_id(text), None, Reason::Malformed, e.to_string()))?;
    let signer = Some(jws.signer);
    let statement = match jws.header.typ.as_str() {
        typ::CLAIM => claims(typ::CLAIM, &jws.payload).map(Statement::Claim),
        typ::PAIR => claims(typ::PAIR, &jws.payload).map(Statement::Pair),
        typ::GRANT => claims(typ::GRANT, &jws.payload).map(Statement::Grant),
        typ::REVOKE => claims(typ::REVOKE, &jws.payload).map(Statement::Revoke),
        typ::POLICY => claims(typ::POLICY, &jws.payload).map(Statement::Policy),
        typ::COMMAND => claims(typ::COMMAND, &jws.payload).map(Statement::Command),
        typ::LOCAL_CODE => claims(typ::LOCAL_CODE, &jws.payload).map(Statement::LocalCode),
        _ => Err("an unknown statement type (docs/mqtt-api.md lists them)".to_owned()),
    };
    let statement = statement.map_err(|detail| {
        // The id, if the payload has a readable one, to address the refusal to.
        let id = serde_json::from_slice::<serde_json::Value>(&jws.payload)
            .ok()
            .and_then(|v| v.get("jti").and_then(|j| j.as_str()).and_then(|j| StatementId::new(j).ok()));
        refuse(id, signer, Reason::Malformed, detail)
    })?;
    let id = Some(statement.id().clone());
    let (iat, exp) = statement.validity();
    let nbf = match &statement {
        Statement::Grant(g) => Some(g.nbf),
        Statement::LocalCode(c) => Some(c.nbf),
        _ => None,
    };
    // Bounded before any arithmetic on them: at the ends of i64, `exp - iat` overflows.
    if [iat, exp].into_iter().chain(nbf).any(|t| !(0..=MAX_TIME).contains(&t)) {
        return Err(refuse(
            id,
            signer,
            Reason::Malformed,
            "times are seconds since 1970, before the year 10000".into(),
        ));
    }
    if exp < iat {
        return Err(refuse(id, signer, Reason::Malformed, "expires before it is issued".into()));
    }
    if let Statement::Command(c) = &statement {
        if c.exp - c.iat > MAX_COMMAND_LIFETIME_S {
            return Err(refuse(id, signer, Reason::Expired, format!("valid for more than {MAX_COMMAND_LIFETIME_S} s")));
        }
        let nonce_ok = (16..=64).contains(&c.nonce.len())
            && c.nonce.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !nonce_ok {
            return Err(refuse(id, signer, Reason::Malformed, "nonce: 16 to 64 base64url characters".into()));
        }
    }
    jws.verify().map_err(|e| refuse(id, signer, Reason::BadSignature, e.to_string()))?;
    Ok(Signed { signer: jws.signer, statement })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;

    fn command() -> Command {
        Command {
            jti: StatementId::new("c-1").unwrap(),
            gw: GatewayId::new("gw-a").unwrap(),
            lock: LockId([1, 2, 3, 4, 5, 6, 7, 8]),
            op: Operation::Unlock,
            iat: 1_000,
            exp: 1_030,
            nonce: "AAAAAAAAAAAAAAAAAAAAAA".into(),
        }
    }

    /// A refusal says what is wrong without quoting the sender: no field name, variant or type
    /// of theirs reaches the reply, the log or the audit record (serde's own messages did).
    #[test]
    fn refusals_quote_no_bytes_of_the_sender() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let evil = "\u{1b}[2J\nFAKE LOG LINE evil";
        let mut claims = serde_json::to_value(command()).unwrap();
        claims[evil] = serde_json::json!(1);
        let extra = super::super::jws::sign(typ::COMMAND, claims.to_string().as_bytes(), &key);
        let mut claims = serde_json::to_value(command()).unwrap();
        claims["op"] = serde_json::json!(evil);
        let variant = super::super::jws::sign(typ::COMMAND, claims.to_string().as_bytes(), &key);
        let typ = super::super::jws::sign(evil, b"{}", &key);
        for text in [extra, variant, typ] {
            let refusal = open(&text).unwrap_err();
            assert_eq!(refusal.reason, Reason::Malformed);
            assert!(
                !refusal.detail.contains("evil") && !refusal.detail.chars().any(char::is_control),
                "{}",
                refusal.detail
            );
        }
        let refusal = open(&super::super::jws::sign(typ::COMMAND, b"{\"jti\":", &key)).unwrap_err();
        assert!(refusal.detail.starts_with("the lockhub.command claims are cut short"), "{}", refusal.detail);
    }

    #[test]
    fn a_signed_command_opens_to_what_was_signed() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let text = Statement::Command(command()).sign(&key);
        let signed = open(&text).unwrap();
        assert_eq!(signed.statement, Statement::Command(command()));
        assert_eq!(signed.signer, PublicKey::from(key.verifying_key()));
    }

    /// One statement of each kind, in the order of [`Statement`]'s variants: the `i`th has id
    /// `s-i`, gateway `gw-a`, is issued at `1000 + i` and expires 100 s later (the command
    /// 30 s later); the grant and the local code are valid from 900.
    fn one_of_each_kind() -> [Statement; 7] {
        let (gw, lock) = (GatewayId::new("gw-a").unwrap(), LockId([1, 2, 3, 4, 5, 6, 7, 8]));
        let id = |s: &str| StatementId::new(s).unwrap();
        let sub = PublicKey::from(SigningKey::from_bytes(&[9; 32]).verifying_key());
        let hours =
            Schedule { tz: "Europe/Berlin".into(), days: vec!["mon".into()], from: "22:00".into(), to: "06:00".into() };
        [
            Statement::Claim(Claim { jti: id("s-0"), gw: gw.clone(), code: "123456".into(), iat: 1_000, exp: 1_100 }),
            Statement::Pair(Pair {
                jti: id("s-1"),
                gw: gw.clone(),
                lock,
                setup: "abcdef".into(),
                iat: 1_001,
                exp: 1_101,
            }),
            Statement::Grant(Grant {
                jti: id("s-2"),
                gw: gw.clone(),
                sub,
                lock,
                perms: vec![Permission::Unlock, Permission::Remote],
                nbf: 900,
                iat: 1_002,
                exp: 1_102,
                schedule: Some(hours.clone()),
            }),
            Statement::Revoke(Revoke { jti: id("s-3"), gw: gw.clone(), grant: id("s-2"), iat: 1_003, exp: 1_103 }),
            Statement::Policy(Policy {
                jti: id("s-4"),
                gw: gw.clone(),
                lock,
                remote_unlock: true,
                quiet_hours: Some(hours),
                iat: 1_004,
                exp: 1_104,
            }),
            Statement::Command(Command { jti: id("s-5"), iat: 1_005, exp: 1_035, ..command() }),
            Statement::LocalCode(LocalCode {
                jti: id("s-6"),
                gw: gw.clone(),
                sub,
                lock,
                hash: "argon2id-hash".into(),
                nbf: 900,
                iat: 1_006,
                exp: 1_106,
            }),
        ]
    }

    /// Every kind opens to what was signed (each `typ` decoded as its own claims) and
    /// answers for its own id, gateway, validity and type.
    #[test]
    fn every_kind_of_statement_opens_as_itself() {
        let (key, gw) = (SigningKey::from_bytes(&[7; 32]), GatewayId::new("gw-a").unwrap());
        let mut types = std::collections::HashSet::new();
        for (i, statement) in one_of_each_kind().iter().enumerate() {
            let signed = open(&statement.sign(&key)).unwrap_or_else(|r| panic!("{}: {r}", statement.typ()));
            assert_eq!(&signed.statement, statement);
            assert_eq!(signed.statement.id().as_str(), format!("s-{i}"));
            assert_eq!(signed.statement.gateway(), &gw);
            let iat = 1_000 + i as i64;
            assert_eq!(signed.statement.validity(), (iat, if i == 5 { iat + 30 } else { iat + 100 }));
            assert!(signed.statement.typ().starts_with("lockhub."), "{}", statement.typ());
            assert!(types.insert(signed.statement.typ()), "{} twice", statement.typ());
        }
    }

    /// A grant's and a local code's `nbf` is bounded as `iat` and `exp` are.
    #[test]
    fn a_not_before_outside_1970_to_9999_is_malformed() {
        let key = SigningKey::from_bytes(&[7; 32]);
        for nbf in [-1, MAX_TIME + 1] {
            for statement in one_of_each_kind() {
                let statement = match statement {
                    Statement::Grant(g) => Statement::Grant(Grant { nbf, ..g }),
                    Statement::LocalCode(c) => Statement::LocalCode(LocalCode { nbf, ..c }),
                    _ => continue,
                };
                let refusal = open(&statement.sign(&key)).unwrap_err();
                assert_eq!(refusal.reason, Reason::Malformed, "{} nbf {nbf}: {refusal}", statement.typ());
                assert!(refusal.detail.contains("year 10000"), "{refusal}");
            }
        }
    }

    /// A statement may expire the second it is issued, not before; a command may be valid
    /// for exactly [`MAX_COMMAND_LIFETIME_S`], not a second longer.
    #[test]
    fn lifetimes_are_checked_at_their_exact_bounds() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let (at_once, backwards) = (Command { exp: 1_000, ..command() }, Command { exp: 999, ..command() });
        assert!(open(&Statement::Command(at_once).sign(&key)).is_ok());
        let refusal = open(&Statement::Command(backwards).sign(&key)).unwrap_err();
        assert_eq!((refusal.reason, refusal.detail.as_str()), (Reason::Malformed, "expires before it is issued"));
        let longest = Command { exp: 1_000 + MAX_COMMAND_LIFETIME_S, ..command() };
        assert!(open(&Statement::Command(longest).sign(&key)).is_ok());
        let longer = Command { exp: 1_001 + MAX_COMMAND_LIFETIME_S, ..command() };
        assert_eq!(open(&Statement::Command(longer).sign(&key)).unwrap_err().reason, Reason::Expired);
    }

    #[test]
    fn nonces_are_16_to_64_base64url_characters() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let open_with = |nonce: String| open(&Statement::Command(Command { nonce, ..command() }).sign(&key));
        for nonce in ["A".repeat(16), "z".repeat(64), "0123456789-_abcDEF".into(), "________________".into()] {
            assert!(open_with(nonce.clone()).is_ok(), "{nonce}");
        }
        for nonce in [
            "A".repeat(15),
            "A".repeat(65),
            "AAAAAAAAAAAAAAA+".into(),
            "AAAAAAAAAAAAAAA/".into(),
            "AAAAAAAAAAAAAAA=".into(),
        ] {
            let refusal = open_with(nonce.clone()).unwrap_err();
            assert_eq!(refusal.reason, Reason::Malformed, "{nonce}: {refusal}");
        }
    }

    #[test]
    fn an_envelope_that_does_not_parse_is_malformed_with_no_id_or_signer() {
        for text in ["", "a.b", "a.b.c.d", "e30.e30.e30", "a".repeat(super::super::jws::MAX_JWS_LEN + 1).as_str()] {
            let refusal = open(text).unwrap_err();
            assert_eq!(refusal.reason, Reason::Malformed, "{text:.20}: {refusal}");
            assert_eq!((refusal.id, refusal.signer), (None, None));
        }
    }

    #[test]
    fn an_envelope_that_does_not_parse_but_names_its_id_is_answered_by_that_id() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let signed = Statement::Command(command()).sign(&key);
        let parts: Vec<&str> = signed.split('.').collect();
        let kid = PublicKey::from(key.verifying_key()).to_base64();
        let encode = |json: String| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, json);
        for alg in ["none", "HS256"] {
            let header = encode(format!(r#"{{"alg":"{alg}","typ":"lockhub.command","kid":"{kid}"}}"#));
            for signature in [parts[2], ""] {
                let refusal = open(&format!("{header}.{}.{signature}", parts[1])).unwrap_err();
                assert_eq!(refusal.reason, Reason::Malformed, "{alg}: {refusal}");
                assert_eq!(refusal.id.map(|id| id.as_str().to_owned()).as_deref(), Some("c-1"), "{alg}");
                assert_eq!(refusal.signer, None, "nothing vouches for the key it names");
            }
        }
    }

    #[test]
    fn a_statement_id_shows_as_itself() {
        assert_eq!(StatementId::new("c-1").unwrap().to_string(), "c-1");
    }

    /// `as_str` names the operation in audit actions and refusals: the wire form statements
    /// carry, not another spelling.
    #[test]
    fn an_operations_name_is_its_wire_form() {
        for op in [Operation::Lock, Operation::Unlock, Operation::Unlatch] {
            assert_eq!(serde_json::to_value(op).unwrap(), serde_json::Value::from(op.as_str()));
        }
    }

    #[test]
    fn wrong_schemas_are_malformed_and_name_the_id_when_they_can() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let sign = |typ: &str, json: &str| super::super::jws::sign(typ, json.as_bytes(), &key);
        let base = r#""jti":"c-9","gw":"gw-a","lock":"0102030405060708","op":"unlock","iat":1000,"exp":1030,"nonce":"AAAAAAAAAAAAAAAAAAAAAA""#;
        let cases = [
            (sign(typ::COMMAND, &format!("{{{base},\"extra\":1}}")), Some("c-9")),
            (sign(typ::COMMAND, &format!("{{{}}}", base.replace("\"unlock\"", "\"explode\""))), Some("c-9")),
            (sign(typ::COMMAND, &format!("{{{}}}", base.replace("0102030405060708", " 102030405060708"))), Some("c-9")),
            (sign(typ::COMMAND, &format!("{{{}}}", base.replace("\"exp\":1030", "\"exp\":1061"))), Some("c-9")),
            (sign(typ::COMMAND, &format!("{{{}}}", base.replace("AAAAAAAAAAAAAAAAAAAAAA", "short"))), Some("c-9")),
            (sign("lockhub.unknown", &format!("{{{base}}}")), Some("c-9")),
            (sign(typ::COMMAND, "[]"), None),
            (sign(typ::COMMAND, "not json"), None),
        ];
        for (text, id) in &cases {
            let refusal = open(text).unwrap_err();
            assert!(matches!(refusal.reason, Reason::Malformed | Reason::Expired), "{refusal}");
            if let Some(id) = id {
                assert_eq!(refusal.id.as_ref().map(StatementId::as_str), Some(*id), "{refusal}");
            }
        }
    }

    /// Times are seconds since 1970 before the year 10000 (RFC 7519's NumericDate, bounded):
    /// at the ends of i64, `exp - iat` overflowed — a panic in a debug build, before the
    /// signature was even checked, and in a release build a lifetime that wrapped below the
    /// 60 s bound and passed. Signed or forged, such a statement is malformed.
    #[test]
    fn times_beyond_the_year_9999_or_before_1970_are_malformed_not_arithmetic() {
        let key = SigningKey::from_bytes(&[7; 32]);
        for (iat, exp) in [(-1, i64::MAX), (i64::MIN, i64::MIN), (i64::MIN, 0), (0, MAX_TIME + 1), (-1, 10)] {
            let c = Command { iat, exp, ..command() };
            let signed = Statement::Command(c.clone()).sign(&key);
            let refusal = open(&signed).unwrap_err();
            assert_eq!(refusal.reason, Reason::Malformed, "iat {iat}, exp {exp}: {refusal}");
            assert!(refusal.detail.contains("year 10000"), "{refusal}");
            let forged = Statement::Command(c).sign(&SigningKey::from_bytes(&[8; 32]));
            let parts: Vec<&str> = forged.split('.').collect();
            let other: Vec<&str> = signed.split('.').collect();
            let refusal = open(&format!("{}.{}.{}", parts[0], parts[1], other[2])).unwrap_err();
            assert_eq!(refusal.reason, Reason::Malformed, "{refusal}");
        }
        let latest = Command { iat: MAX_TIME - 30, exp: MAX_TIME, ..command() };
        assert!(open(&Statement::Command(latest).sign(&key)).is_ok());
    }

    #[test]
    fn a_forged_command_is_a_bad_signature_with_its_id() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let text = Statement::Command(command()).sign(&key);
        let mut forged = command();
        forged.op = Operation::Unlatch;
        let forged_payload = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            serde_json::to_vec(&forged).unwrap(),
        );
        let parts: Vec<&str> = text.split('.').collect();
        let refusal = open(&format!("{}.{forged_payload}.{}", parts[0], parts[2])).unwrap_err();
        assert_eq!(refusal.reason, Reason::BadSignature);
        assert_eq!(refusal.id.unwrap().as_str(), "c-1");
    }
}
