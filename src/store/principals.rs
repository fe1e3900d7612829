//! Who the gateway knows and what they may do: its own identity, the pinned owner keys, users
//! (public keys with their pseudonym keys), signed grants and revocations (sealed), keypad
//! passcode metadata (Argon2id hashes only), policies, and the command ids already seen.

use rusqlite::{OptionalExtension, params};
use zeroize::Zeroizing;

use super::seal::Place;
use super::{Store, StoreError, Tx};
use crate::auth::keys::PublicKey;
use crate::protocol::ids::{GatewayId, LockId};

/// A grant as stored: its id, whom it is for, and the signed statement, unsealed.
#[derive(Debug)]
pub struct StoredGrant {
    /// The statement's id.
    pub grant_id: String,
    /// The user's public key.
    pub user_public_key: Vec<u8>,
    /// The owner-signed statement.
    pub statement: Zeroizing<Vec<u8>>,
}

/// What [`Tx::note_command`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandSeen {
    /// First time.
    New,
    /// The same bytes again: the stored reply, if it was answered yet.
    Duplicate(Option<Vec<u8>>),
    /// The same id with other bytes.
    Conflict,
}

/// Longest signed statement stored (a JWS of a grant is a few hundred bytes).
pub const MAX_STATEMENT: usize = 8 * 1024;

impl Tx<'_> {
    /// Sets the gateway's identity (once; later calls keep the first).
    pub fn set_gateway_identity(&mut self, gateway_id: &GatewayId, now: i64) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT OR IGNORE INTO gateway (id, gateway_id, created_at) VALUES (1, ?1, ?2)",
            params![gateway_id.as_str(), now],
        )?;
        Ok(())
    }

    /// Seals and stores the claim state (the one-time claim code's verifier, or the claim).
    pub fn set_claim_state(&mut self, state: &[u8]) -> Result<(), StoreError> {
        let sealed = self.sealer.seal(Place { table: "gateway", column: "claim_state", row: b"1" }, state);
        let n = self.tx.execute("UPDATE gateway SET claim_state = ?1 WHERE id = 1", [sealed])?;
        if n == 0 { Err(StoreError::NotFound("gateway identity".into())) } else { Ok(()) }
    }

    /// Pins an owner key.
    pub fn pin_owner(&mut self, public_key: &[u8], now: i64) -> Result<(), StoreError> {
        self.tx.execute(
            "INSERT OR IGNORE INTO owners (public_key, pinned_at) VALUES (?1, ?2)",
            params![public_key, now],
        )?;
        Ok(())
    }

    /// Registers a user's public key (with a fresh pseudonym key) if not yet known.
    pub fn add_user(&mut self, public_key: &[u8], now: i64) -> Result<(), StoreError> {
        if public_key.is_empty() || public_key.len() > 64 {
            return Err(StoreError::Invalid("user public key"));
        }
        let exists: bool =
            self.tx.query_row("SELECT count(*) FROM users WHERE public_key = ?1", [public_key], |r| r.get(0))?;
        if exists {
            return Ok(());
        }
        let mut key = Zeroizing::new([0u8; 32]);
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, key.as_mut());
        let sealed = self.sealer.seal(Place { table: "users", column: "pseudonym_key", row: public_key }, key.as_ref());
        self.tx.execute(
            "INSERT INTO users (public_key, pseudonym_key, created_at) VALUES (?1, ?2, ?3)",
            params![public_key, sealed, now],
        )?;
        Ok(())
    }

    /// The row of a known user.
    fn user_rowid(&self, public_key: &[u8]) -> Result<i64, StoreError> {
        self.tx
            .query_row("SELECT id FROM users WHERE public_key = ?1", [public_key], |r| r.get(0))
            .optional()?
            .ok_or_else(|| StoreError::NotFound("user".into()))
    }

    /// Stores an owner-signed grant (sealed) for a known user and a paired lock.
    pub fn put_grant(
        &mut self,
        grant_id: &str,
        lock: LockId,
        user_public_key: &[u8],
        statement: &[u8],
        valid_until: Option<i64>,
    ) -> Result<(), StoreError> {
        if statement.len() > MAX_STATEMENT || grant_id.is_empty() || grant_id.len() > 128 {
            return Err(StoreError::Invalid("grant (id or statement size)"));
        }
        let lock_row = self.lock_rowid(lock)?;
        let user_row = self.user_rowid(user_public_key)?;
        let sealed =
            self.sealer.seal(Place { table: "grants", column: "statement", row: grant_id.as_bytes() }, statement);
        self.tx.execute(
            "INSERT INTO grants (grant_id, lock, user, statement, valid_until) VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (grant_id) DO UPDATE SET statement = ?4, valid_until = ?5",
            params![grant_id, lock_row, user_row, sealed, valid_until],
        )?;
        Ok(())
    }

    /// Stores an owner-signed revocation (sealed).
    pub fn put_revocation(
        &mut self,
        revocation_id: &str,
        lock: Option<LockId>,
        statement: &[u8],
        now: i64,
    ) -> Result<(), StoreError> {
        if statement.len() > MAX_STATEMENT || revocation_id.is_empty() || revocation_id.len() > 128 {
            return Err(StoreError::Invalid("revocation (id or statement size)"));
        }
        let lock_row = lock.map(|l| self.lock_rowid(l)).transpose()?;
        let sealed = self
            .sealer
            .seal(Place { table: "revocations", column: "statement", row: revocation_id.as_bytes() }, statement);
        self.tx.execute(
            "INSERT OR IGNORE INTO revocations (revocation_id, lock, statement, revoked_at) VALUES (?1, ?2, ?3, ?4)",
            params![revocation_id, lock_row, sealed, now],
        )?;
        Ok(())
    }

    /// Stores a keypad passcode's metadata: its Argon2id hash (never the code) and window.
    pub fn put_passcode(
        &mut self,
        lock: LockId,
        user_public_key: Option<&[u8]>,
        slot: Option<u16>,
        argon2id_hash: &str,
        valid_from: Option<i64>,
        valid_until: Option<i64>,
    ) -> Result<(), StoreError> {
        if !argon2id_hash.starts_with("$argon2id$") || argon2id_hash.len() > 256 {
            return Err(StoreError::Invalid("passcode hash (an Argon2id PHC string is required)"));
        }
        let lock_row = self.lock_rowid(lock)?;
        let user_row: Option<i64> = match user_public_key {
            Some(pk) => Some(self.user_rowid(pk)?),
            None => None,
        };
        self.tx.execute(
            "INSERT INTO passcodes (lock, user, slot, hash, valid_from, valid_until) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![lock_row, user_row, slot, argon2id_hash, valid_from, valid_until],
        )?;
        Ok(())
    }

    /// Stores a local code an owner-signed statement gave `user_public_key` for `lock`: its
    /// Argon2id hash (never the code) and window, under the statement's id. It replaces the
    /// user's earlier local code for the lock. The user must be known.
    pub fn put_local_code(
        &mut self,
        code_id: &str,
        lock: LockId,
        user_public_key: &[u8],
        argon2id_hash: &str,
        valid_from: i64,
        valid_until: i64,
    ) -> Result<(), StoreError> {
        if code_id.len() > 64 || !argon2id_hash.starts_with("$argon2id$") || argon2id_hash.len() > 256 {
            return Err(StoreError::Invalid("local code (id size, or not an Argon2id PHC string)"));
        }
        let lock_row = self.lock_rowid(lock)?;
        let user_row = self.user_rowid(user_public_key)?;
        self.tx.execute(
            "DELETE FROM passcodes WHERE lock = ?1 AND user = ?2 AND code_id IS NOT NULL",
            params![lock_row, user_row],
        )?;
        self.tx.execute(
            "INSERT INTO passcodes (lock, user, hash, valid_from, valid_until, code_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT (code_id) DO NOTHING",
            params![lock_row, user_row, argon2id_hash, valid_from, valid_until, code_id],
        )?;
        Ok(())
    }

    /// Removes the local code a statement gave (a revocation naming it); returns whether
    /// there was one.
    pub fn remove_local_code(&mut self, code_id: &str) -> Result<bool, StoreError> {
        Ok(self.tx.execute("DELETE FROM passcodes WHERE code_id = ?1", [code_id])? > 0)
    }

    /// Sets a policy document (JSON) for `scope`: `global`, or a lock's id.
    pub fn set_policy(&mut self, lock: Option<LockId>, policy_json: &str) -> Result<(), StoreError> {
        if policy_json.len() > 16 * 1024 {
            return Err(StoreError::Invalid("policy (too large)"));
        }
        let (scope, lock_row) = match lock {
            Some(l) => (l.to_string(), Some(self.lock_rowid(l)?)),
            None => ("global".to_owned(), None),
        };
        self.tx.execute(
            "INSERT INTO policies (scope, lock, policy) VALUES (?1, ?2, ?3) \
             ON CONFLICT (scope) DO UPDATE SET policy = ?3",
            params![scope, lock_row, policy_json],
        )?;
        Ok(())
    }

    /// Remembers a command id until `expires_at`; returns the stored reply if it was seen
    /// before (a duplicate delivery), `None` if it is new.
    pub fn remember_command(
        &mut self,
        command_id: &str,
        lock: Option<LockId>,
        expires_at: i64,
    ) -> Result<Option<Option<Vec<u8>>>, StoreError> {
        if command_id.is_empty() || command_id.len() > 128 {
            return Err(StoreError::Invalid("command id"));
        }
        let seen: Option<Option<Vec<u8>>> = self
            .tx
            .query_row("SELECT reply FROM seen_commands WHERE command_id = ?1", [command_id], |r| r.get(0))
            .optional()?;
        if seen.is_some() {
            return Ok(seen);
        }
        let lock_row = lock.map(|l| self.lock_rowid(l)).transpose()?;
        self.tx.execute(
            "INSERT INTO seen_commands (command_id, lock, expires_at) VALUES (?1, ?2, ?3)",
            params![command_id, lock_row, expires_at],
        )?;
        Ok(None)
    }

    /// The id a statement is remembered by, and its digest as stored. For a known user both
    /// are keyed with their pseudonym key — the id is their audit pseudonym and the statement's
    /// `jti`, the digest an HMAC of it — so that once forget-user has deleted that key, nothing
    /// remembered names their public key or lets anyone who holds it confirm a row is theirs.
    /// Anyone else (an owner, the first claimant) is remembered by their key in base64, which
    /// the owners table holds anyway.
    pub fn seen_key(&self, signer: &PublicKey, jti: &str, digest: &[u8]) -> Result<(String, Vec<u8>), StoreError> {
        match self.user_pseudonym_key(signer.as_bytes())? {
            Some(key) => {
                let id = format!("{}:{jti}", super::audit::pseudonym("user", &key, signer.as_bytes()));
                Ok((id, super::audit::keyed_tag(&key, b"lockhub seen statement digest\0", digest).to_vec()))
            }
            None => Ok((format!("{signer}:{jti}"), digest.to_vec())),
        }
    }

    /// Notes a command (or statement) id with a digest of its bytes: `New` the first time;
    /// `Duplicate` with the stored reply (if any yet) when the same bytes come again;
    /// `Conflict` when the id comes again with other bytes (a replay attempt).
    pub fn note_command(
        &mut self,
        command_id: &str,
        lock: Option<LockId>,
        expires_at: i64,
        digest: &[u8],
    ) -> Result<CommandSeen, StoreError> {
        if command_id.is_empty() || command_id.len() > 128 || digest.len() > 64 {
            return Err(StoreError::Invalid("command id or digest"));
        }
        // (reply, digest)
        type Row = (Option<Vec<u8>>, Option<Vec<u8>>);
        // Every command passes here: statements prepared once, kept in the connection's cache.
        let seen: Option<Row> = self
            .tx
            .prepare_cached("SELECT reply, digest FROM seen_commands WHERE command_id = ?1")?
            .query_row([command_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((reply, stored)) = seen {
            let same = stored.is_some_and(|d| bool::from(subtle::ConstantTimeEq::ct_eq(d.as_slice(), digest)));
            return Ok(if same { CommandSeen::Duplicate(reply) } else { CommandSeen::Conflict });
        }
        let lock_row = match lock {
            Some(l) => self.lock_rowid(l).ok(),
            None => None,
        };
        self.tx
            .prepare_cached("INSERT INTO seen_commands (command_id, lock, expires_at, digest) VALUES (?1, ?2, ?3, ?4)")?
            .execute(params![command_id, lock_row, expires_at, digest])?;
        Ok(CommandSeen::New)
    }

    /// Stores the reply given to a command, for duplicate deliveries.
    pub fn set_command_reply(&mut self, command_id: &str, reply: &[u8]) -> Result<(), StoreError> {
        self.tx
            .prepare_cached("UPDATE seen_commands SET reply = ?2 WHERE command_id = ?1")?
            .execute(params![command_id, reply])?;
        Ok(())
    }
}

impl Store {
    /// The gateway's identity, if set.
    pub fn gateway_identity(&self) -> Result<Option<GatewayId>, StoreError> {
        let id: Option<String> =
            self.conn.query_row("SELECT gateway_id FROM gateway WHERE id = 1", [], |r| r.get(0)).optional()?;
        id.map(|s| GatewayId::new(s).map_err(|_| StoreError::Invalid("gateway id in the database"))).transpose()
    }

    /// The claim state, unsealed.
    pub fn claim_state(&self) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let sealed: Option<Option<Vec<u8>>> =
            self.conn.query_row("SELECT claim_state FROM gateway WHERE id = 1", [], |r| r.get(0)).optional()?;
        match sealed.flatten() {
            Some(s) => Ok(Some(self.sealer.open(Place { table: "gateway", column: "claim_state", row: b"1" }, &s)?)),
            None => Ok(None),
        }
    }

    /// The pinned owner keys.
    pub fn owner_keys(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT public_key FROM owners ORDER BY id")?;
        Ok(stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?)
    }

    /// The grants stored for a lock, unsealed.
    pub fn grants_for(&self, lock: LockId) -> Result<Vec<StoredGrant>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT g.grant_id, u.public_key, g.statement FROM grants g \
             JOIN locks l ON l.id = g.lock JOIN users u ON u.id = g.user WHERE l.lock_id = ?1 ORDER BY g.id",
        )?;
        let rows =
            stmt.query_map([lock.to_string()], |r| Ok((r.get::<_, String>(0)?, r.get(1)?, r.get::<_, Vec<u8>>(2)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, pk, sealed) = row?;
            let statement =
                self.sealer.open(Place { table: "grants", column: "statement", row: id.as_bytes() }, &sealed)?;
            out.push(StoredGrant { grant_id: id, user_public_key: pk, statement });
        }
        Ok(out)
    }

    /// The local codes statements gave for `lock` that are valid at `now`: the user's public
    /// key and the Argon2id hash.
    pub fn local_codes(&self, lock: LockId, now: i64) -> Result<Vec<(Vec<u8>, String)>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT u.public_key, p.hash FROM passcodes p JOIN locks l ON l.id = p.lock \
             JOIN users u ON u.id = p.user \
             WHERE l.lock_id = ?1 AND p.code_id IS NOT NULL AND p.valid_from <= ?2 AND p.valid_until >= ?2 \
             ORDER BY p.id",
        )?;
        let rows = stmt.query_map(params![lock.to_string(), now], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The known users: public key, when first seen, and how many grants they hold (owners
    /// are not users unless granted).
    pub fn users(&self) -> Result<Vec<(Vec<u8>, i64, u64)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT u.public_key, u.created_at, (SELECT COUNT(*) FROM grants g WHERE g.user = u.id) \
             FROM users u ORDER BY u.created_at, u.id",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Forgets a user: deletes their key, grants and passcodes, and their pseudonym key, which
    /// makes every audit record about them unlinkable (the chain still verifies). Returns
    /// whether the user existed.
    pub fn forget_user(&mut self, public_key: &[u8], now: i64) -> Result<bool, StoreError> {
        let existed = self.transaction(|tx| {
            tx.audit(super::AuditEntry {
                at: now,
                action: "user.forgotten",
                outcome: "ok",
                actor: super::audit::AuditActor::User(public_key.to_vec()),
                lock: None,
                detail: "",
            })?;
            Ok(tx.tx.execute("DELETE FROM users WHERE public_key = ?1", [public_key])? > 0)
        })?;
        self.compact()?;
        Ok(existed)
    }

    /// Ids of commands noted but never answered (the gateway stopped while they ran).
    pub fn unanswered_commands(&self) -> Result<Vec<String>, StoreError> {
        let mut stmt = self.conn.prepare("SELECT command_id FROM seen_commands WHERE reply IS NULL")?;
        Ok(stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?)
    }

    /// How a known user appears in a lock's own log and in the events the gateway publishes:
    /// 8 bytes of HMAC-SHA256 under their pseudonym key, which forget-user deletes. Anyone
    /// holding their public key cannot compute it, and after forget-user nobody can link it to
    /// them. `None` for a key the gateway does not know.
    pub fn user_lock_ref(&self, public_key: &[u8]) -> Result<Option<[u8; 8]>, StoreError> {
        let Some(key) = super::audit::user_pseudonym_key(&self.conn, &self.sealer, public_key)? else {
            return Ok(None);
        };
        let tag = super::audit::keyed_tag(&key, b"lockhub lock log user reference\0", public_key);
        Ok(Some(tag[..8].try_into().expect("8 bytes")))
    }

    /// Whether a user key is known (has been granted something).
    pub fn user_known(&self, public_key: &[u8]) -> Result<bool, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT count(*) FROM users WHERE public_key = ?1")?
            .query_row([public_key], |r| r.get(0))?)
    }

    /// The ids of revoked grants (a revocation's id is the id of the grant it revokes).
    pub fn revoked_grant_ids(&self) -> Result<std::collections::HashSet<String>, StoreError> {
        let mut stmt = self.conn.prepare_cached("SELECT revocation_id FROM revocations")?;
        Ok(stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?)
    }

    /// The policy document of `lock` (or the global one), if set.
    pub fn policy(&self, lock: Option<LockId>) -> Result<Option<String>, StoreError> {
        let scope = lock.map_or_else(|| "global".to_owned(), |l| l.to_string());
        Ok(self
            .conn
            .prepare_cached("SELECT policy FROM policies WHERE scope = ?1")?
            .query_row([scope], |r| r.get(0))
            .optional()?)
    }

    /// Deletes remembered command ids past their expiry; returns how many.
    pub fn expire_commands(&mut self, now: i64) -> Result<usize, StoreError> {
        Ok(self.conn.execute("DELETE FROM seen_commands WHERE expires_at < ?1", [now])?)
    }
}
