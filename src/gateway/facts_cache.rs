//! What the policy engine needs from the store about a command's signer and lock — whether
//! the gateway knows the signer, their grants on the lock (signatures checked, revocations
//! applied), the lock's policy — and the owners' keys, kept in memory between commands.
//!
//! Reading them took a command five queries and an AES-GCM opening per grant of the lock, under
//! the store's lock, on the path of every remote unlock; yet only an owner's statement, an
//! unbinding or a deletion changes them. Everything the cache holds was read at one count of
//! the store's [`PrincipalsVersion`], and is forgotten as soon as that count moves, so a grant,
//! revocation or policy is in force for the first command after its commit, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::policy::{GrantFacts, LockPolicy};
use crate::protocol::ids::LockId;
use crate::protocol::message::UserRef;
use crate::store::{PrincipalsVersion, Store, StoreError};

/// Signer-and-lock entries kept at most; when full the memory is emptied (a miss only costs
/// the reads it saves).
const ENTRIES: usize = 256;

/// What the store says about one signer and one lock.
#[derive(Debug, Default)]
pub struct SignerFacts {
    /// Whether the gateway knows the signer (an owner granted them something once).
    pub known_user: bool,
    /// The signer's grants on the lock, each checked.
    pub grants: Vec<GrantFacts>,
    /// The lock's policy (the default when none was set).
    pub policy: LockPolicy,
    /// How the signer appears in the lock's log and in events, if known
    /// ([`crate::store::Store::user_lock_ref`]).
    pub lock_ref: Option<UserRef>,
}

/// The cache; see the module documentation.
#[derive(Debug)]
pub struct FactsCache {
    version: PrincipalsVersion,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The version every entry below was read at.
    read_at: u64,
    owners: Option<Arc<[Vec<u8>]>>,
    signers: HashMap<([u8; 32], LockId), Arc<SignerFacts>>,
}

impl Inner {
    /// Forgets everything read before `version`.
    fn at(&mut self, version: u64) {
        if self.read_at != version {
            *self = Inner { read_at: version, ..Inner::default() };
        }
    }
}

impl FactsCache {
    /// A cache over the store whose changes `version` counts.
    pub fn new(version: PrincipalsVersion) -> Self {
        FactsCache { version, inner: Mutex::new(Inner::default()) }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The owners' public keys.
    pub fn owners(&self, store: &Mutex<Store>) -> Result<Arc<[Vec<u8>]>, StoreError> {
        self.through(
            store,
            |inner| inner.owners.clone(),
            |store| Ok(Arc::from(store.owner_keys()?)),
            |inner, owners| inner.owners = Some(owners),
        )
    }

    /// What the store says about `signer` and `lock`; `load` reads it on a miss (called with
    /// the store locked).
    pub fn signer(
        &self,
        store: &Mutex<Store>,
        signer: &[u8; 32],
        lock: LockId,
        load: impl FnOnce(&Store) -> Result<SignerFacts, StoreError>,
    ) -> Result<Arc<SignerFacts>, StoreError> {
        let key = (*signer, lock);
        self.through(
            store,
            |inner| inner.signers.get(&key).cloned(),
            |store| Ok(Arc::new(load(store)?)),
            |inner, facts| {
                if inner.signers.len() >= ENTRIES {
                    inner.signers.clear();
                }
                inner.signers.insert(key, facts);
            },
        )
    }

    /// What `cached` finds at the current count; else what `read` reads with the store locked
    /// (so that no change lands between the count and the rows), handed to `keep` unless a
    /// newer read is already kept.
    fn through<T: Clone>(
        &self,
        store: &Mutex<Store>,
        cached: impl FnOnce(&Inner) -> Option<T>,
        read: impl FnOnce(&Store) -> Result<T, StoreError>,
        keep: impl FnOnce(&mut Inner, T),
    ) -> Result<T, StoreError> {
        {
            let mut inner = self.inner();
            inner.at(self.version.get());
            if let Some(hit) = cached(&inner) {
                return Ok(hit);
            }
        }
        let (version, value) = {
            let store = store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            (self.version.get(), read(&store)?)
        };
        let mut inner = self.inner();
        if inner.read_at <= version {
            inner.at(version);
            keep(&mut inner, value.clone());
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    fn store(dir: &std::path::Path) -> Mutex<Store> {
        Mutex::new(Store::open(StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(dir) }).unwrap())
    }

    fn lock_id(n: u8) -> LockId {
        LockId([n; 8])
    }

    /// Counts the loads, and says whether the signer is known as the store does.
    fn counting_load(
        loads: &std::cell::Cell<u32>,
        key: [u8; 32],
    ) -> impl FnOnce(&Store) -> Result<SignerFacts, StoreError> + '_ {
        move |store| {
            loads.set(loads.get() + 1);
            Ok(SignerFacts { known_user: store.user_known(&key)?, ..SignerFacts::default() })
        }
    }

    #[test]
    fn facts_are_read_once_until_a_principal_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let cache = FactsCache::new(store.lock().unwrap().principals_version());
        let (alice, lock) = ([7u8; 32], lock_id(1));
        let loads = std::cell::Cell::new(0);

        let first = cache.signer(&store, &alice, lock, counting_load(&loads, alice)).unwrap();
        let second = cache.signer(&store, &alice, lock, counting_load(&loads, alice)).unwrap();
        assert_eq!(loads.get(), 1, "the second command is answered from memory");
        assert!(!first.known_user && !second.known_user);

        // Something else written (the outbox, an audit record) keeps the entry.
        store.lock().unwrap().transaction(|tx| tx.append_outbox(None, "t", b"{}", false, 1)).unwrap();
        cache.signer(&store, &alice, lock, counting_load(&loads, alice)).unwrap();
        assert_eq!(loads.get(), 1, "writes elsewhere do not invalidate");

        // A new user (an owner's grant adds one) is seen by the next command.
        store.lock().unwrap().transaction(|tx| tx.add_user(&alice, 1)).unwrap();
        let after = cache.signer(&store, &alice, lock, counting_load(&loads, alice)).unwrap();
        assert_eq!(loads.get(), 2);
        assert!(after.known_user, "the change is in force for the next command");
    }

    #[test]
    fn a_rolled_back_change_only_costs_a_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let cache = FactsCache::new(store.lock().unwrap().principals_version());
        let (alice, lock) = ([7u8; 32], lock_id(1));
        let loads = std::cell::Cell::new(0);
        cache.signer(&store, &alice, lock, counting_load(&loads, alice)).unwrap();
        let failed: Result<(), StoreError> = store.lock().unwrap().transaction(|tx| {
            tx.add_user(&alice, 1)?;
            Err(StoreError::Invalid("test"))
        });
        assert!(failed.is_err());
        let after = cache.signer(&store, &alice, lock, counting_load(&loads, alice)).unwrap();
        assert_eq!(loads.get(), 2);
        assert!(!after.known_user, "the rolled-back user is not there");
    }

    #[test]
    fn owners_are_reread_after_a_claim() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let cache = FactsCache::new(store.lock().unwrap().principals_version());
        assert!(cache.owners(&store).unwrap().is_empty());
        store.lock().unwrap().transaction(|tx| tx.pin_owner(&[9u8; 32], 1)).unwrap();
        assert_eq!(&*cache.owners(&store).unwrap(), &[vec![9u8; 32]]);
    }
}
