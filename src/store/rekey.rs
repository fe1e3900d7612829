//! Rekeying: every sealed value re-sealed under a new master key in one transaction.
//!
//! Order matters for crash safety: the new key is written to `<key>.new` (fsync) before the
//! transaction, and renamed over the key file after it commits. At start-up, a store whose key
//! check fails with the key file but opens with `<key>.new` finishes the rename; one that
//! opens with the key file drops a stale `<key>.new`.

use rusqlite::params;

use super::master_key::{self, KeySource};
use super::seal::{MasterKey, Place, Sealer};
use super::{KEY_CHECK, Store, StoreError, key_check_place};

/// Every sealed column: (table, column, the column holding the row's natural key).
const SEALED: &[(&str, &str, &str)] = &[
    ("locks", "pairing_key", "lock_id"),
    ("locks", "pseudonym_key", "lock_id"),
    ("users", "pseudonym_key", "public_key"),
    ("grants", "statement", "grant_id"),
    ("revocations", "statement", "revocation_id"),
    ("gateway", "claim_state", "id"),
];

/// The staged key of an interrupted rekey, if it is the one that opens the store; the rename
/// it was waiting for is done.
pub(super) fn staged_key_opening(source: &KeySource, key_check: &[u8]) -> Result<Option<MasterKey>, StoreError> {
    let KeySource::File(path) = source else { return Ok(None) };
    let staged = master_key::staged_path(path);
    if !staged.exists() {
        return Ok(None);
    }
    let key = master_key::read_key_file(&staged)?;
    if Sealer::new(&key).open(key_check_place(), key_check).is_err() {
        return Ok(None);
    }
    std::fs::rename(&staged, path).map_err(|source| StoreError::Io { path: path.clone(), source })?;
    tracing::info!(key = %path.display(), "finished an interrupted rekey");
    Ok(Some(key))
}

/// Drops the staged key of a rekey that never committed.
pub(super) fn discard_staged(source: &KeySource) {
    if let KeySource::File(path) = source {
        let _ = std::fs::remove_file(master_key::staged_path(path));
    }
}

fn row_key(value: &rusqlite::types::Value) -> Vec<u8> {
    use rusqlite::types::Value;
    match value {
        Value::Text(s) => s.as_bytes().to_vec(),
        Value::Blob(b) => b.clone(),
        Value::Integer(i) => i.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

impl Store {
    /// Re-seals every secret under a fresh master key, in one transaction, and replaces the
    /// key file. Refused when the key is a systemd credential (the store cannot replace it).
    pub fn rekey(&mut self) -> Result<usize, StoreError> {
        let KeySource::File(key_path) = self.key_source.clone() else {
            return Err(StoreError::CredentialKey(self.key_source.path().to_owned()));
        };
        let new_key = MasterKey::generate();
        let staged = master_key::staged_path(&key_path);
        let _ = std::fs::remove_file(&staged);
        master_key::write_key_file(&staged, &new_key, false)?;
        let new_sealer = Sealer::new(&new_key);
        let tx = self.conn.transaction()?;
        let mut count = 0;
        for (table, column, natural) in SEALED {
            let rows: Vec<(i64, rusqlite::types::Value, Vec<u8>)> = {
                let mut stmt =
                    tx.prepare(&format!("SELECT rowid, {natural}, {column} FROM {table} WHERE {column} IS NOT NULL"))?;
                stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect::<Result<_, _>>()?
            };
            for (rowid, natural_value, sealed) in rows {
                let row = row_key(&natural_value);
                let place = Place { table, column, row: &row };
                let plain = self.sealer.open(place, &sealed)?;
                let resealed = new_sealer.seal(place, &plain);
                tx.execute(&format!("UPDATE {table} SET {column} = ?1 WHERE rowid = ?2"), params![resealed, rowid])?;
                count += 1;
            }
        }
        tx.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'key_check'",
            [new_sealer.seal(key_check_place(), KEY_CHECK)],
        )?;
        tx.commit()?;
        std::fs::rename(&staged, &key_path).map_err(|source| StoreError::Io { path: key_path.clone(), source })?;
        self.sealer = new_sealer;
        // Old pages sealed under the old key go too.
        self.compact()?;
        Ok(count)
    }
}
