//! The audit chain: every decision and every change, each record hashing its predecessor.
//!
//! `hash = SHA-256(prev_hash || seq || at || action || outcome || actor || subject || detail)`
//! (integers big-endian, strings length-prefixed, absent ones as length 0xFFFFFFFF), starting
//! from 32 zero bytes. People and locks appear only as keyed pseudonyms (`user:…`, `lock:…`);
//! details must not name anyone. Pruning old records keeps the chain verifiable: the last
//! pruned record's sequence number and hash become the anchor it continues from.

use hmac::{Hmac, Mac};
use rusqlite::{OptionalExtension, params};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::audit_budget::{Admission, SUMMARY_ACTION};
use super::seal::{Place, Sealer};
use super::{Store, StoreError, Tx};
use crate::protocol::ids::LockId;

/// Who an audit record is about, before pseudonymisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditActor {
    /// The gateway itself.
    Hub,
    /// The hub's administrator at the control socket (root, the daemon's user or the admin
    /// group), or the hub acting on the administrator's configuration.
    Admin,
    /// The owner, by an owner-signed statement from the cloud (their key is pinned).
    Owner,
    /// A known user, by public key (stored as its pseudonym).
    User(Vec<u8>),
    /// Someone the gateway does not know (an unknown key, a bad signature).
    Unknown,
}

/// A record to append.
#[derive(Clone, Debug)]
pub struct AuditEntry<'a> {
    /// When (Unix seconds).
    pub at: i64,
    /// What was attempted, e.g. `command.unlock`, `lock.paired`, `lock.unbound`.
    pub action: &'a str,
    /// The decision or result: `allowed`, `ok`, or a reason code (`expired`, `replayed`, …).
    pub outcome: &'a str,
    /// Who.
    pub actor: AuditActor,
    /// Which lock, if any.
    pub lock: Option<LockId>,
    /// Anything else worth keeping, naming nobody.
    pub detail: &'a str,
}

/// A stored record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    /// Position in the chain.
    pub seq: i64,
    /// When.
    pub at: i64,
    /// What.
    pub action: String,
    /// Decision or result.
    pub outcome: String,
    /// Pseudonymous actor.
    pub actor: Option<String>,
    /// Pseudonymous subject (the lock).
    pub subject: Option<String>,
    /// Detail.
    pub detail: String,
}

/// The outcome of verifying the chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuditVerification {
    /// Every record checks out.
    Intact {
        /// Records checked.
        records: u64,
    },
    /// The first record that does not.
    Broken {
        /// Its sequence number.
        seq: i64,
        /// What is wrong with it.
        reason: &'static str,
    },
}

fn put_str(h: &mut Sha256, s: Option<&str>) {
    match s {
        Some(s) => {
            h.update((s.len() as u32).to_be_bytes());
            h.update(s.as_bytes());
        }
        None => h.update(u32::MAX.to_be_bytes()),
    }
}

fn record_hash(prev: &[u8], r: &AuditRecord) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(r.seq.to_be_bytes());
    h.update(r.at.to_be_bytes());
    put_str(&mut h, Some(&r.action));
    put_str(&mut h, Some(&r.outcome));
    put_str(&mut h, r.actor.as_deref());
    put_str(&mut h, r.subject.as_deref());
    put_str(&mut h, Some(&r.detail));
    h.finalize().into()
}

/// `prefix:` followed by 16 hex digits of HMAC-SHA256(key, id).
pub(super) fn pseudonym(prefix: &str, key: &[u8], id: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(id);
    let tag = mac.finalize().into_bytes();
    let mut s = String::with_capacity(prefix.len() + 17);
    s.push_str(prefix);
    s.push(':');
    for b in &tag[..8] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// A known user's pseudonym key: what names them in the audit chain, in the locks' logs and in
/// their remembered statement ids. forget-user deletes it, and with it every link to their key.
/// `None` for a key the gateway does not know.
pub(super) fn user_pseudonym_key(
    conn: &rusqlite::Connection,
    sealer: &Sealer,
    public_key: &[u8],
) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
    let sealed: Option<Vec<u8>> = conn
        .prepare_cached("SELECT pseudonym_key FROM users WHERE public_key = ?1")?
        .query_row([public_key], |r| r.get(0))
        .optional()?;
    let Some(sealed) = sealed else { return Ok(None) };
    Ok(Some(sealer.open(Place { table: "users", column: "pseudonym_key", row: public_key }, &sealed)?))
}

/// HMAC-SHA256 under `key` of `label` (which keeps each use of a key apart) and `data`.
pub(super) fn keyed_tag(key: &[u8], label: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(label);
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The columns [`record_from_row`] reads, in its order.
const RECORD_COLUMNS: &str = "seq, at, action, outcome, actor, subject, detail";

fn record_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRecord> {
    Ok(AuditRecord {
        seq: r.get(0)?,
        at: r.get(1)?,
        action: r.get(2)?,
        outcome: r.get(3)?,
        actor: r.get(4)?,
        subject: r.get(5)?,
        detail: r.get(6)?,
    })
}

fn anchor(tx: &rusqlite::Connection) -> Result<(i64, Vec<u8>), StoreError> {
    let a: Option<Vec<u8>> =
        tx.query_row("SELECT value FROM meta WHERE key = 'audit_anchor'", [], |r| r.get(0)).optional()?;
    match a {
        Some(v) if v.len() == 40 => Ok((i64::from_be_bytes(v[..8].try_into().expect("8 bytes")), v[8..].to_vec())),
        Some(_) => Err(StoreError::Invalid("audit anchor")),
        None => Ok((0, vec![0u8; 32])),
    }
}

impl Tx<'_> {
    /// [`user_pseudonym_key`] inside this transaction.
    pub(super) fn user_pseudonym_key(&self, public_key: &[u8]) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        user_pseudonym_key(&self.tx, self.sealer, public_key)
    }

    fn user_pseudonym(&self, public_key: &[u8]) -> Result<String, StoreError> {
        Ok(match self.user_pseudonym_key(public_key)? {
            Some(key) => pseudonym("user", &key, public_key),
            None => "user:unknown".into(),
        })
    }

    pub(super) fn lock_pseudonym(&self, lock: LockId) -> Result<String, StoreError> {
        let id = lock.to_string();
        let sealed: Option<Vec<u8>> = self
            .tx
            .prepare_cached("SELECT pseudonym_key FROM locks WHERE lock_id = ?1")?
            .query_row([&id], |r| r.get(0))
            .optional()?;
        let Some(sealed) = sealed else { return Ok("lock:unknown".into()) };
        let key = self.sealer.open(Place { table: "locks", column: "pseudonym_key", row: id.as_bytes() }, &sealed)?;
        Ok(pseudonym("lock", &key, id.as_bytes()))
    }

    /// Appends a record to the chain.
    ///
    /// A record attributed to nobody ([`AuditActor::Unknown`]) may be counted instead, within
    /// the [`audit_budget`](super::audit_budget); what was counted is written as one summary
    /// record before this one. Returns whether this record was written (else counted).
    pub fn audit(&mut self, entry: AuditEntry<'_>) -> Result<bool, StoreError> {
        if entry.actor == AuditActor::Unknown && self.audit_budget.admit(entry.outcome, entry.at) == Admission::Count {
            return Ok(false);
        }
        self.write_counted(entry.at)?;
        self.append_record(entry)?;
        Ok(true)
    }

    /// Writes what the audit budget counted since its last summary, as one record, if anything.
    pub fn write_counted(&mut self, now: i64) -> Result<(), StoreError> {
        let Some(detail) = self.audit_budget.take_summary() else { return Ok(()) };
        self.append_record(AuditEntry {
            at: now,
            action: SUMMARY_ACTION,
            outcome: "counted",
            actor: AuditActor::Unknown,
            lock: None,
            detail: &detail,
        })
        .map(|_| ())
    }

    fn append_record(&mut self, entry: AuditEntry<'_>) -> Result<i64, StoreError> {
        let actor = match &entry.actor {
            AuditActor::Hub => "hub".to_owned(),
            AuditActor::Admin => "admin".to_owned(),
            AuditActor::Owner => "owner".to_owned(),
            AuditActor::Unknown => "unknown".to_owned(),
            AuditActor::User(pk) => self.user_pseudonym(pk)?,
        };
        let subject = entry.lock.map(|l| self.lock_pseudonym(l)).transpose()?;
        let last: Option<(i64, Vec<u8>)> = self
            .tx
            .prepare_cached("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let (prev_seq, prev_hash) = match last {
            Some(l) => l,
            None => anchor(&self.tx)?,
        };
        let record = AuditRecord {
            seq: prev_seq + 1,
            at: entry.at,
            action: entry.action.to_owned(),
            outcome: entry.outcome.to_owned(),
            actor: Some(actor),
            subject,
            detail: entry.detail.to_owned(),
        };
        let hash = record_hash(&prev_hash, &record);
        self.tx
            .prepare_cached(
                "INSERT INTO audit (seq, at, action, outcome, actor, subject, detail, prev_hash, hash) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                record.seq,
                record.at,
                record.action,
                record.outcome,
                record.actor,
                record.subject,
                record.detail,
                prev_hash,
                hash.to_vec()
            ])?;
        Ok(record.seq)
    }
}

impl Store {
    /// Writes the audit budget's summary of counted refusals now, if it counted any: the
    /// hourly housekeeping and a stopping daemon call this; otherwise it goes in before the next
    /// record.
    pub fn write_counted_audit(&mut self, now: i64) -> Result<(), StoreError> {
        if !self.audit_budget.has_counted() {
            return Ok(());
        }
        self.transaction(|tx| tx.write_counted(now))
    }

    /// Checks every record against its predecessor, from the anchor on; names the first bad one.
    pub fn verify_audit(&self) -> Result<AuditVerification, StoreError> {
        let (mut prev_seq, mut prev_hash) = anchor(&self.conn)?;
        let mut stmt =
            self.conn.prepare(&format!("SELECT {RECORD_COLUMNS}, prev_hash, hash FROM audit ORDER BY seq"))?;
        let mut rows = stmt.query([])?;
        let mut count = 0;
        while let Some(row) = rows.next()? {
            let record = record_from_row(row)?;
            let stored_prev: Vec<u8> = row.get(7)?;
            let stored_hash: Vec<u8> = row.get(8)?;
            let broken = |reason| Ok(AuditVerification::Broken { seq: record.seq, reason });
            if record.seq != prev_seq + 1 {
                return broken("a record is missing before this one");
            }
            if stored_prev != prev_hash {
                return broken("does not link to the previous record");
            }
            let hash = record_hash(&prev_hash, &record);
            if stored_hash != hash {
                return broken("its contents do not match its hash");
            }
            prev_seq = record.seq;
            prev_hash = stored_hash;
            count += 1;
        }
        Ok(AuditVerification::Intact { records: count })
    }

    /// Audit records, oldest first, from `after_seq` on, at most `limit`.
    pub fn audit_records(&self, after_seq: i64, limit: u32) -> Result<Vec<AuditRecord>, StoreError> {
        let mut stmt =
            self.conn.prepare(&format!("SELECT {RECORD_COLUMNS} FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2"))?;
        let rows = stmt.query_map(params![after_seq, limit], record_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Prunes records older than the retention limit, moving the anchor; returns how many.
    pub fn prune_audit(&mut self, now: i64) -> Result<usize, StoreError> {
        let cutoff = now - i64::from(self.config.retention.audit_days) * 86_400;
        let tx = self.conn.transaction()?;
        let last: Option<(i64, Vec<u8>)> = tx
            .query_row("SELECT seq, hash FROM audit WHERE at < ?1 ORDER BY seq DESC LIMIT 1", [cutoff], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?;
        let Some((seq, hash)) = last else { return Ok(0) };
        let n = tx.execute("DELETE FROM audit WHERE seq <= ?1", [seq])?;
        let mut anchor = seq.to_be_bytes().to_vec();
        anchor.extend_from_slice(&hash);
        tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('audit_anchor', ?1)", [anchor])?;
        tx.commit()?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The chain's hash is the layout the module documents, pinned by two records computed
    /// outside this code (Python's hashlib over the documented bytes): a chain written by one
    /// version must verify under the next, so the layout may never drift. The second record
    /// links to the first and has no subject (length 0xFFFFFFFF), the first no lock.
    #[test]
    fn the_hash_is_the_documented_layout() {
        let first = AuditRecord {
            seq: 1,
            at: 1_700_000_000,
            action: "command.unlock".into(),
            outcome: "allowed".into(),
            actor: Some("user:0123456789abcdef".into()),
            subject: None,
            detail: "remote".into(),
        };
        let h1 = record_hash(&[0u8; 32], &first);
        assert_eq!(hex(&h1), "9a9b439bcde326573cf345516ea6263070117ec902a11f615422717348e84672");
        let second = AuditRecord {
            seq: 2,
            at: 1_700_000_060,
            action: "lock.unbound".into(),
            outcome: "ok".into(),
            actor: Some("admin".into()),
            subject: Some("lock:fedcba9876543210".into()),
            detail: String::new(),
        };
        assert_eq!(hex(&record_hash(&h1, &second)), "ea0c3dd960dc0d6b7ad803556676fcc8d2a5ab8c02bc71703bb7455c213e6224");
    }

    /// A pseudonym is the first 8 bytes of HMAC-SHA256(key, id) in hex after its prefix:
    /// RFC 4231's first test case (key 0x0b × 20, data "Hi There", b0344c61d8db3853…).
    #[test]
    fn pseudonyms_are_hmac_sha256_cut_to_sixteen_hex_digits() {
        assert_eq!(pseudonym("user", &[0x0b; 20], b"Hi There"), "user:b0344c61d8db3853");
        assert_eq!(pseudonym("lock", &[0x0b; 20], b"Hi There"), "lock:b0344c61d8db3853");
        assert_ne!(pseudonym("user", &[0x0c; 20], b"Hi There"), "user:b0344c61d8db3853", "another key, another name");
    }
}
