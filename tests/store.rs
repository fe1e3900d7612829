//! The encrypted store on disk: sealing, unbinding without remnants, tamper evidence, crash
//! safety, key handling, forgetting users, retention.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::protocol::pairing::PairingKey;
use lockhub::store::audit::AuditActor;
use lockhub::store::checkpoint::{Checkpointer, Checkpoints};
use lockhub::store::{AuditEntry, AuditVerification, Store, StoreConfig, StoreError};
use rand_core::{OsRng, RngCore};

fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("lockhub-store-").tempdir().unwrap()
}

fn config(dir: &Path) -> StoreConfig {
    StoreConfig { credentials_dir: None, ..StoreConfig::in_dir(dir) }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    OsRng.fill_bytes(&mut b);
    b
}

/// Every file of the store's directory except the key file, concatenated.
fn store_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap() != "master.key")
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

fn assert_absent(dir: &Path, needle: &[u8], what: &str) {
    for (path, bytes) in store_files(dir) {
        assert!(!bytes.windows(needle.len()).any(|w| w == needle), "{what} found in {}", path.display());
    }
}

fn audit(tx: &mut lockhub::store::Tx<'_>, action: &str, lock: Option<LockId>, actor: AuditActor) {
    tx.audit(AuditEntry { at: 1_700_000_000, action, outcome: "ok", actor, lock, detail: "" }).unwrap();
}

#[test]
fn sealed_secrets_never_reach_the_files() {
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let key = random_bytes::<32>();
    let statement = format!("grant-statement-{}", hex::encode(random_bytes::<8>()));
    let claim = format!("claim-state-{}", hex::encode(random_bytes::<8>()));
    let lock = LockId(random_bytes());
    let user = random_bytes::<32>();
    store
        .transaction(|tx| {
            tx.set_gateway_identity(&GatewayId::new("hub-1").unwrap(), 1)?;
            tx.set_claim_state(claim.as_bytes())?;
            tx.add_lock(lock, "C0:11:22:33:44:55", "Back door", &PairingKey::from_bytes(key), 1)?;
            tx.add_user(&user, 1)?;
            tx.put_grant("g1", lock, &user, statement.as_bytes(), None)
        })
        .unwrap();
    for (secret, what) in
        [(&key[..], "pairing key"), (statement.as_bytes(), "grant"), (claim.as_bytes(), "claim state")]
    {
        assert_absent(dir.path(), secret, what);
    }
    // …and they come back out.
    assert_eq!(store.pairing_key(lock).unwrap().as_bytes(), &key);
    assert_eq!(&store.grants_for(lock).unwrap()[0].statement[..], statement.as_bytes());
    assert_eq!(&store.claim_state().unwrap().unwrap()[..], claim.as_bytes());
    for (_, mode) in store_modes(dir.path()) {
        assert_eq!(mode, 0o600);
    }
}

fn store_modes(dir: &Path) -> Vec<(PathBuf, u32)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            let m = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            (p, m)
        })
        .collect()
}

#[test]
fn unbinding_leaves_no_byte_of_the_lock_in_any_file() {
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let lock = LockId(random_bytes());
    let other = LockId(random_bytes());
    let key = random_bytes::<32>();
    let address = "C0:5A:17:E0:99:01";
    let name = format!("Garden gate {}", hex::encode(random_bytes::<4>()));
    let user = random_bytes::<32>();
    let id = lock.to_string();
    store
        .transaction(|tx| {
            tx.add_lock(lock, address, &name, &PairingKey::from_bytes(key), 1)?;
            tx.add_lock(other, "C0:00:00:00:00:02", "Kept", &PairingKey::from_bytes([9; 32]), 1)?;
            tx.add_user(&user, 1)?;
            tx.put_grant("grant-1", lock, &user, format!("grant for {id}").as_bytes(), None)?;
            tx.put_passcode(lock, Some(&user), Some(3), "$argon2id$v=19$m=256,t=2,p=1$c2FsdA$aGFzaA", None, None)?;
            tx.set_policy(Some(lock), r#"{"remote_unlock": true}"#)?;
            tx.remember_command("cmd-1", Some(lock), 10)?;
            let topic = format!("lockhub/v1/hub-1/lock/{id}/state");
            tx.note_retained_topic(lock, &topic)?;
            tx.append_outbox(Some(lock), &topic, format!(r#"{{"lock":"{id}","state":"locked"}}"#).as_bytes(), true, 1)?;
            tx.append_outbox(None, "lockhub/v1/hub-1/status", b"online", true, 1)?;
            for _ in 0..50 {
                audit(tx, "command.unlock", Some(lock), AuditActor::User(user.to_vec()));
            }
            Ok(())
        })
        .unwrap();
    for _ in 0..200 {
        store.transaction(|tx| tx.set_last_event_seq(lock, 7)).unwrap();
    }
    let report = store.unbind(lock, AuditActor::Admin, 2).unwrap();
    assert_eq!(report.retained_topics, vec![format!("lockhub/v1/hub-1/lock/{id}/state")]);

    for (needle, what) in [
        (id.as_bytes(), "lock id"),
        (id.to_uppercase().as_bytes(), "lock id (upper case)"),
        (address.as_bytes(), "address"),
        (name.as_bytes(), "name"),
        (&key[..], "pairing key"),
        (&lock.0[..], "raw lock id"),
    ] {
        assert_absent(dir.path(), needle, what);
    }
    // Everything else is intact.
    assert_eq!(store.locks().unwrap().len(), 1);
    assert_eq!(store.outbox_len().unwrap(), 1);
    assert_eq!(store.verify_audit().unwrap(), AuditVerification::Intact { records: 51 });
    store.integrity_check().unwrap();
    assert!(matches!(store.pairing_key(lock), Err(StoreError::NotFound(_))));
}

/// A lock with its name and address in the store.
fn paired_lock(store: &mut Store) -> (LockId, String, String) {
    let lock = LockId(random_bytes());
    let (address, name) = ("C0:5A:17:E0:99:03".to_owned(), format!("Shed {}", hex::encode(random_bytes::<4>())));
    store.transaction(|tx| tx.add_lock(lock, &address, &name, &PairingKey::from_bytes(random_bytes()), 1)).unwrap();
    (lock, address, name)
}

#[test]
fn unbinding_beside_a_checkpointing_connection_still_leaves_no_byte_of_the_lock() {
    // The daemon checkpoints from a connection of its own, and the unbinding's VACUUM asks it
    // to: SQLite answers the unbinding's own checkpoint (the one that empties the log) with
    // "busy" while that one runs. Here it runs all the time.
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let (lock, address, name) = paired_lock(&mut store);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (started, running) = std::sync::mpsc::channel();
    let checkpointing = {
        let (stop, mut checkpointer) = (stop.clone(), Checkpointer::open(store.database_path()).unwrap());
        std::thread::spawn(move || {
            let mut runs = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                checkpointer.checkpoint().unwrap();
                runs += 1;
                if runs == 1 {
                    let _ = started.send(());
                }
            }
            runs
        })
    };
    // On a busy machine the thread may not have run yet: the unbinding must meet it running.
    running.recv().unwrap();
    for _ in 0..20 {
        store.transaction(|tx| tx.set_last_event_seq(lock, 7)).unwrap();
    }
    store.unbind(lock, AuditActor::Admin, 2).expect("unbound, the log emptied once the checkpoint let go");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(checkpointing.join().unwrap() > 0);
    for (needle, what) in [(address.as_bytes(), "address"), (name.as_bytes(), "name"), (&lock.0[..], "raw lock id")] {
        assert_absent(dir.path(), needle, what);
    }
}

#[test]
fn unbinding_while_a_reader_holds_an_old_snapshot_says_the_log_still_holds_the_lock() {
    // A reader that never lets go (a tool left open on the database): the log cannot be
    // emptied, and the unbinding says so rather than report a clean slate.
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let (lock, ..) = paired_lock(&mut store);
    let reader = raw(dir.path());
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader.query_row("SELECT count(*) FROM locks", [], |r| r.get(0)).unwrap();
    let err = store.unbind(lock, AuditActor::Admin, 2).unwrap_err();
    assert!(matches!(err, StoreError::LogInUse { emptied_later: false, .. }), "{err}");
    assert!(err.to_string().starts_with("deleted, but"), "{err}");
    // The deletion itself stands; once the reader lets go, the next compaction empties the log.
    assert!(matches!(store.pairing_key(lock), Err(StoreError::NotFound(_))));
    reader.execute_batch("COMMIT").unwrap();
    store.compact().unwrap();
    assert_eq!(std::fs::metadata(dir.path().join("lockhub.db-wal")).unwrap().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_rows_a_reader_kept_in_the_log_leave_the_files_once_it_lets_go() {
    // As the daemon runs it: its checkpointer takes the log's checkpoints, and finishes the
    // compactions other connections got in the way of.
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let checkpoints = Checkpoints::hand_off(&mut store).unwrap();
    let mut debt = checkpoints.debt();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(checkpoints.run(stopped));
    let (lock, address, name) = paired_lock(&mut store);
    let reader = raw(dir.path());
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader.query_row("SELECT count(*) FROM locks", [], |r| r.get(0)).unwrap();
    let (store, err) = tokio::task::spawn_blocking(move || {
        let err = store.unbind(lock, AuditActor::Admin, 2).unwrap_err();
        (store, err)
    })
    .await
    .unwrap();
    assert!(matches!(err, StoreError::LogInUse { emptied_later: true, .. }), "{err}");
    assert!(err.to_string().ends_with("it is emptied as soon as they let go"), "{err}");
    assert!(debt.borrow_and_update().outstanding());
    let in_files =
        |needle: &[u8]| store_files(dir.path()).iter().any(|(_, b)| b.windows(needle.len()).any(|w| w == needle));
    assert!(in_files(address.as_bytes()), "what is owed: the lock's rows, still in the log");

    reader.execute_batch("COMMIT").unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(60), debt.wait_for(|d| !d.outstanding()))
        .await
        .expect("the log was never emptied after the reader let go")
        .unwrap();
    for (needle, what) in [(address.as_bytes(), "address"), (name.as_bytes(), "name"), (&lock.0[..], "raw lock id")] {
        assert_absent(dir.path(), needle, what);
    }
    assert!(matches!(store.pairing_key(lock), Err(StoreError::NotFound(_))));
    stop.send(true).unwrap();
    task.await.unwrap();
}

fn raw(dir: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(dir.join("lockhub.db")).unwrap()
}

#[test]
fn a_flipped_bit_or_a_moved_sealed_value_is_an_error_never_wrong_data() {
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let (a, b) = (LockId([1; 8]), LockId([2; 8]));
    store
        .transaction(|tx| {
            tx.add_lock(a, "C0:00:00:00:00:01", "A", &PairingKey::from_bytes([0xa; 32]), 1)?;
            tx.add_lock(b, "C0:00:00:00:00:02", "B", &PairingKey::from_bytes([0xb; 32]), 1)
        })
        .unwrap();
    let db = raw(dir.path());
    db.execute(
        "UPDATE locks SET pairing_key = (SELECT pairing_key FROM locks WHERE lock_id = ?2) WHERE lock_id = ?1",
        [a.to_string(), b.to_string()],
    )
    .unwrap();
    assert!(matches!(store.pairing_key(a), Err(StoreError::Seal(_))), "moved from another row");
    assert_eq!(store.pairing_key(b).unwrap().as_bytes(), &[0xb; 32]);
    let mut sealed: Vec<u8> =
        db.query_row("SELECT pairing_key FROM locks WHERE lock_id = ?1", [b.to_string()], |r| r.get(0)).unwrap();
    sealed[25] ^= 0x10;
    db.execute("UPDATE locks SET pairing_key = ?1 WHERE lock_id = ?2", rusqlite::params![sealed, b.to_string()])
        .unwrap();
    let err = store.pairing_key(b).unwrap_err();
    assert!(matches!(err, StoreError::Seal(_)), "{err}");
    assert!(err.to_string().contains("locks.pairing_key"), "the error says where: {err}");
}

#[test]
fn verify_names_the_first_tampered_audit_record() {
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    store
        .transaction(|tx| {
            for i in 0..10 {
                tx.audit(AuditEntry {
                    at: 1_700_000_000 + i,
                    action: "command.unlock",
                    outcome: if i % 3 == 0 { "expired" } else { "allowed" },
                    actor: AuditActor::Hub,
                    lock: None,
                    detail: "",
                })?;
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(store.verify_audit().unwrap(), AuditVerification::Intact { records: 10 });
    let db = raw(dir.path());
    db.execute("UPDATE audit SET outcome = 'allowed' WHERE seq = 4", []).unwrap();
    assert!(matches!(store.verify_audit().unwrap(), AuditVerification::Broken { seq: 4, .. }));
    db.execute("UPDATE audit SET outcome = 'expired' WHERE seq = 4", []).unwrap();
    assert_eq!(store.verify_audit().unwrap(), AuditVerification::Intact { records: 10 });
    db.execute("DELETE FROM audit WHERE seq = 7", []).unwrap();
    assert!(matches!(store.verify_audit().unwrap(), AuditVerification::Broken { seq: 8, .. }));
}

/// Every column of a record is covered: changing any one of them (the time, the action, the
/// outcome, the pseudonyms, the detail) breaks the record's own hash; a changed link says so;
/// a missing record is named by the one after it; and an anchor that is not a sequence number
/// and a hash is an error, not an intact chain.
#[test]
fn every_column_of_an_audit_record_is_in_its_hash_and_each_break_says_what_it_is() {
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let lock = LockId::parse("4c48000000000042").unwrap();
    store
        .transaction(|tx| {
            for i in 0..3 {
                tx.audit(AuditEntry {
                    at: 1_700_000_000 + i,
                    action: "command.unlock",
                    outcome: "allowed",
                    actor: AuditActor::User(vec![7; 32]),
                    lock: Some(lock),
                    detail: "remote",
                })?;
            }
            Ok(())
        })
        .unwrap();
    assert_eq!(store.verify_audit().unwrap(), AuditVerification::Intact { records: 3 });
    let db = raw(dir.path());
    let contents = "its contents do not match its hash";
    for (column, changed) in [
        ("at", "1"),
        ("action", "'command.lock'"),
        ("outcome", "'expired'"),
        ("actor", "'admin'"),
        ("subject", "NULL"),
        ("detail", "'local'"),
    ] {
        let kept: rusqlite::types::Value =
            db.query_row(&format!("SELECT {column} FROM audit WHERE seq = 2"), [], |r| r.get(0)).unwrap();
        db.execute(&format!("UPDATE audit SET {column} = {changed} WHERE seq = 2"), []).unwrap();
        assert_eq!(
            store.verify_audit().unwrap(),
            AuditVerification::Broken { seq: 2, reason: contents },
            "{column} changed"
        );
        db.execute(&format!("UPDATE audit SET {column} = ?1 WHERE seq = 2"), [kept]).unwrap();
        assert_eq!(store.verify_audit().unwrap(), AuditVerification::Intact { records: 3 }, "{column} put back");
    }
    db.execute("UPDATE audit SET prev_hash = zeroblob(32) WHERE seq = 3", []).unwrap();
    assert_eq!(
        store.verify_audit().unwrap(),
        AuditVerification::Broken { seq: 3, reason: "does not link to the previous record" }
    );
    db.execute("DELETE FROM audit WHERE seq = 2", []).unwrap();
    assert_eq!(
        store.verify_audit().unwrap(),
        AuditVerification::Broken { seq: 3, reason: "a record is missing before this one" }
    );
    db.execute("INSERT INTO meta (key, value) VALUES ('audit_anchor', zeroblob(39))", []).unwrap();
    assert!(matches!(store.verify_audit(), Err(StoreError::Invalid("audit anchor"))));
}

/// A record about a lock names it by the lock's own pseudonym: the same for every record
/// about it, another for another lock, never its id; a lock the store does not know is
/// `lock:unknown`.
#[test]
fn audit_records_name_each_lock_by_its_own_pseudonym() {
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let (a, _, _) = paired_lock(&mut store);
    let (b, _, _) = paired_lock(&mut store);
    let stranger = LockId::parse("4c48000000000099").unwrap();
    store
        .transaction(|tx| {
            for lock in [a, b, a, stranger] {
                audit(tx, "command.unlock", Some(lock), AuditActor::Hub);
            }
            Ok(())
        })
        .unwrap();
    let subjects: Vec<String> =
        store.audit_records(0, 10).unwrap().into_iter().map(|r| r.subject.expect("a lock")).collect();
    let looks_like =
        |s: &str| s.strip_prefix("lock:").is_some_and(|h| h.len() == 16 && h.bytes().all(|c| c.is_ascii_hexdigit()));
    assert!(looks_like(&subjects[0]) && looks_like(&subjects[1]), "{subjects:?}");
    assert_eq!(subjects[0], subjects[2], "the same lock, the same name");
    assert_ne!(subjects[0], subjects[1], "another lock, another name");
    assert_eq!(subjects[3], "lock:unknown");
    for (lock, subject) in [(a, &subjects[0]), (b, &subjects[1])] {
        assert!(!subject.contains(&lock.to_string()[..8]), "{subject} names the lock");
    }
}

#[test]
fn a_key_file_readable_by_others_stops_start_up_with_the_fix() {
    let dir = temp_dir();
    drop(Store::open(config(dir.path())).unwrap());
    let key = dir.path().join("master.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Store::open(config(dir.path())).unwrap_err().to_string();
    assert!(err.contains(&key.display().to_string()), "names the file: {err}");
    assert!(err.contains("chmod 600"), "gives the fix: {err}");
}

#[test]
fn a_key_that_does_not_open_the_store_is_refused_with_the_way_out() {
    let dir = temp_dir();
    drop(Store::open(config(dir.path())).unwrap());
    let key = dir.path().join("master.key");
    std::fs::remove_file(&key).unwrap();
    let err = Store::open(config(dir.path())).unwrap_err();
    assert!(matches!(err, StoreError::WrongKey { .. }), "{err}");
    let text = err.to_string();
    assert!(text.contains("restore the key") && text.contains("lockhub.db"), "{text}");
}

#[test]
fn a_systemd_credential_is_used_when_present() {
    let dir = temp_dir();
    let creds = temp_dir();
    std::fs::write(creds.path().join("lockhub-master-key"), hex::encode(random_bytes::<32>())).unwrap();
    let cfg = StoreConfig { credentials_dir: Some(creds.path().to_owned()), ..config(dir.path()) };
    let mut store = Store::open(cfg.clone()).unwrap();
    assert!(!dir.path().join("master.key").exists(), "no key file beside a credential");
    assert!(matches!(store.rekey(), Err(StoreError::CredentialKey(_))));
    drop(store);
    Store::open(cfg).unwrap();
}

/// A credential that is no key: one that never ends (a device, as a wrong `LoadCredential=`
/// could make it) is refused at the key's bound rather than read until memory runs out, and
/// one with a byte too many is refused as well.
#[test]
fn a_credential_that_is_no_key_is_refused() {
    let dir = temp_dir();
    let creds = temp_dir();
    let credential = creds.path().join("lockhub-master-key");
    let cfg = StoreConfig { credentials_dir: Some(creds.path().to_owned()), ..config(dir.path()) };
    std::os::unix::fs::symlink("/dev/zero", &credential).unwrap();
    let err = Store::open(cfg.clone()).unwrap_err().to_string();
    assert!(err.contains("lockhub-master-key") && err.contains("does not hold a key"), "{err}");
    std::fs::remove_file(&credential).unwrap();
    std::fs::write(&credential, format!("{}\n\n", hex::encode(random_bytes::<32>()))).unwrap();
    let err = Store::open(cfg).unwrap_err().to_string();
    assert!(err.contains("does not hold a key"), "{err}");
    assert!(!dir.path().join("master.key").exists(), "no key file made beside a credential");
}

#[test]
fn rekey_reseals_everything_and_an_interrupted_rekey_recovers() {
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let lock = LockId([3; 8]);
    let user = [4u8; 32];
    store
        .transaction(|tx| {
            tx.set_gateway_identity(&GatewayId::new("hub").unwrap(), 1)?;
            tx.set_claim_state(b"claimed")?;
            tx.add_lock(lock, "C0:00:00:00:00:03", "L", &PairingKey::from_bytes([5; 32]), 1)?;
            tx.add_user(&user, 1)?;
            tx.put_grant("g", lock, &user, b"statement", None)?;
            tx.put_revocation("r", Some(lock), b"revoked", 1)?;
            audit(tx, "x", Some(lock), AuditActor::User(user.to_vec()));
            Ok(())
        })
        .unwrap();
    let old_key = std::fs::read(dir.path().join("master.key")).unwrap();
    assert_eq!(store.rekey().unwrap(), 6);
    assert_ne!(std::fs::read(dir.path().join("master.key")).unwrap(), old_key);
    assert_eq!(store.pairing_key(lock).unwrap().as_bytes(), &[5; 32]);
    drop(store);
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(&store.grants_for(lock).unwrap()[0].statement[..], b"statement");
    drop(store);
    // A crash after the commit, before the rename: the new key is still staged.
    let key = dir.path().join("master.key");
    std::fs::rename(&key, dir.path().join("master.key.new")).unwrap();
    std::fs::write(&key, &old_key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let store = Store::open(config(dir.path())).unwrap();
    assert_eq!(store.pairing_key(lock).unwrap().as_bytes(), &[5; 32]);
    assert!(!dir.path().join("master.key.new").exists(), "the rename was finished");
}

#[test]
fn forgetting_a_user_unlinks_their_audit_records_and_keeps_the_chain() {
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let lock = LockId([6; 8]);
    let user = random_bytes::<32>();
    store
        .transaction(|tx| {
            tx.add_lock(lock, "C0:00:00:00:00:06", "L", &PairingKey::from_bytes([1; 32]), 1)?;
            tx.add_user(&user, 1)?;
            tx.put_grant("g", lock, &user, b"grant", None)?;
            audit(tx, "command.unlock", Some(lock), AuditActor::User(user.to_vec()));
            Ok(())
        })
        .unwrap();
    let before = store.audit_records(0, 10).unwrap()[0].actor.clone().unwrap();
    assert!(before.starts_with("user:") && before != "user:unknown");
    assert!(store.forget_user(&user, 2).unwrap());
    assert_absent(dir.path(), &user, "the user's public key");
    assert!(store.grants_for(lock).unwrap().is_empty());
    assert!(matches!(store.verify_audit().unwrap(), AuditVerification::Intact { records: 2 }));
    // The same key coming back gets a new, unrelated pseudonym.
    store
        .transaction(|tx| {
            tx.add_user(&user, 3)?;
            audit(tx, "command.unlock", Some(lock), AuditActor::User(user.to_vec()));
            Ok(())
        })
        .unwrap();
    let records = store.audit_records(0, 10).unwrap();
    let after = records.last().unwrap().actor.clone().unwrap();
    assert_ne!(before, after);
}

#[test]
fn retention_prunes_old_audit_records_and_the_chain_still_verifies() {
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let day = 86_400;
    store
        .transaction(|tx| {
            for i in 0..10 {
                tx.audit(AuditEntry {
                    at: i * 100 * day,
                    action: "a",
                    outcome: "ok",
                    actor: AuditActor::Hub,
                    lock: None,
                    detail: "",
                })?;
            }
            Ok(())
        })
        .unwrap();
    let pruned = store.prune_audit(1000 * day).unwrap();
    assert_eq!(pruned, 7, "records older than 365 days");
    assert_eq!(store.verify_audit().unwrap(), AuditVerification::Intact { records: 3 });
    store
        .transaction(|tx| {
            tx.audit(AuditEntry {
                at: 1000 * day,
                action: "b",
                outcome: "ok",
                actor: AuditActor::Hub,
                lock: None,
                detail: "",
            })
            .map(drop)
        })
        .unwrap();
    assert_eq!(store.verify_audit().unwrap(), AuditVerification::Intact { records: 4 });
}

#[test]
fn command_ids_are_remembered_until_they_expire() {
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    assert_eq!(store.transaction(|tx| tx.remember_command("c1", None, 100)).unwrap(), None);
    store.transaction(|tx| tx.set_command_reply("c1", b"{\"ok\":true}")).unwrap();
    assert_eq!(
        store.transaction(|tx| tx.remember_command("c1", None, 100)).unwrap(),
        Some(Some(b"{\"ok\":true}".to_vec()))
    );
    assert_eq!(store.expire_commands(50).unwrap(), 0);
    assert_eq!(store.expire_commands(101).unwrap(), 1);
    assert_eq!(store.transaction(|tx| tx.remember_command("c1", None, 200)).unwrap(), None);
}

#[test]
fn a_state_change_and_its_outbox_record_commit_together_or_not_at_all() {
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let lock = LockId([7; 8]);
    store.transaction(|tx| tx.add_lock(lock, "C0:00:00:00:00:07", "L", &PairingKey::from_bytes([1; 32]), 1)).unwrap();
    let failed = store.transaction(|tx| {
        tx.set_last_event_seq(lock, 9)?;
        tx.append_outbox(Some(lock), "t", b"event 9", false, 1)?;
        Err::<(), _>(StoreError::Invalid("simulated failure"))
    });
    assert!(failed.is_err());
    assert_eq!(store.locks().unwrap()[0].last_event_seq, 0);
    assert_eq!(store.outbox_len().unwrap(), 0);
    store
        .transaction(|tx| {
            tx.set_last_event_seq(lock, 9)?;
            tx.append_outbox(Some(lock), "t", b"event 9", false, 1)
        })
        .unwrap();
    let pending = store.outbox_pending(10).unwrap();
    assert_eq!(pending.len(), 1);
    store.outbox_ack(&[pending[0].id]).unwrap();
    assert_eq!(store.outbox_len().unwrap(), 0);
}

#[test]
fn the_schema_stores_no_address_location_or_fingerprint_and_the_inventory_is_complete() {
    let dir = temp_dir();
    let store = Store::open(config(dir.path())).unwrap();
    let columns = store.schema_columns().unwrap();
    let forbidden = [
        "ip",
        "ipv4",
        "ipv6",
        "remote",
        "location",
        "latitude",
        "longitude",
        "lat",
        "lon",
        "geo",
        "gps",
        "fingerprint",
        "biometric",
        "face",
        "email",
        "phone",
    ];
    for (table, column) in &columns {
        for token in column.split('_').chain(table.split('_')) {
            assert!(!forbidden.contains(&token), "{table}.{column} looks like data we promise not to keep");
        }
    }
    let inventory = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/privacy.md")).unwrap();
    let documented: BTreeSet<String> = inventory
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect();
    for (table, column) in &columns {
        let name = format!("{table}.{column}");
        assert!(documented.contains(&name), "docs/privacy.md does not describe {name}");
    }
    for name in &documented {
        assert!(
            columns.iter().any(|(t, c)| &format!("{t}.{c}") == name),
            "docs/privacy.md describes {name}, which does not exist"
        );
    }
}

/// Helper for the crash test, run as a child process: appends outbox records forever, saying
/// `ACK <id>` once each is committed, and acknowledging (deleting) older ones with
/// `DELETING <id>` / `DEL <id>` around the commit.
#[test]
#[ignore = "a child process of crash_test_every_acknowledged_record_survives_sigkill"]
fn crash_child() {
    use std::io::Write;
    let Some(dir) = std::env::var_os("LOCKHUB_CRASH_DIR") else { return };
    let mut store = Store::open(config(Path::new(&dir))).unwrap();
    let lock = LockId([8; 8]);
    store.transaction(|tx| tx.add_lock(lock, "C0:00:00:00:00:08", "L", &PairingKey::from_bytes([1; 32]), 1)).unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY").unwrap();
    out.flush().unwrap();
    for n in 0u64.. {
        let id = store
            .transaction(|tx| {
                tx.set_last_event_seq(lock, n)?;
                tx.append_outbox(Some(lock), "lockhub/v1/hub/events", format!("event {n}").as_bytes(), false, 1)
            })
            .unwrap();
        writeln!(out, "ACK {id}").unwrap();
        out.flush().unwrap();
        if n % 4 == 3 {
            let oldest = store.outbox_pending(1).unwrap()[0].id;
            writeln!(out, "DELETING {oldest}").unwrap();
            out.flush().unwrap();
            store.outbox_ack(&[oldest]).unwrap();
            writeln!(out, "DEL {oldest}").unwrap();
            out.flush().unwrap();
        }
    }
}

#[test]
fn crash_test_every_acknowledged_record_survives_sigkill() {
    let dir = temp_dir();
    let mut acked = BTreeSet::new();
    let mut deleted = BTreeSet::new();
    let mut maybe_deleted = BTreeSet::new();
    for round in 0..50 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "crash_child", "--ignored", "--nocapture", "--test-threads=1"])
            .env("LOCKHUB_CRASH_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let target = 1 + (OsRng.next_u32() % 40) as usize;
        let mut seen = 0;
        let mut note = |line: &str| {
            if let Some(id) = line.strip_prefix("ACK ") {
                acked.insert(id.parse::<i64>().unwrap());
                return true;
            } else if let Some(id) = line.strip_prefix("DELETING ") {
                maybe_deleted.insert(id.parse::<i64>().unwrap());
            } else if let Some(id) = line.strip_prefix("DEL ") {
                deleted.insert(id.parse::<i64>().unwrap());
            }
            false
        };
        for line in lines.by_ref() {
            if note(&line.unwrap()) {
                seen += 1;
                if seen >= target {
                    break;
                }
            }
        }
        // A random moment, most likely inside a later transaction.
        let spin = OsRng.next_u32() % 3_000;
        let t = std::time::Instant::now();
        while t.elapsed().as_micros() < u128::from(spin) {}
        child.kill().unwrap();
        child.wait().unwrap();
        // Everything the child said before it died is in the pipe: read it all.
        for line in lines {
            note(&line.unwrap());
        }

        let store = Store::open(config(dir.path())).unwrap();
        store.integrity_check().unwrap_or_else(|e| panic!("round {round}: {e}"));
        let present: BTreeSet<i64> = store.outbox_pending(u32::MAX).unwrap().iter().map(|r| r.id).collect();
        for id in &acked {
            if !deleted.contains(id) && !maybe_deleted.contains(id) {
                assert!(present.contains(id), "round {round}: acknowledged record {id} lost");
            }
        }
        for id in &deleted {
            assert!(!present.contains(id), "round {round}: deleted record {id} is back");
        }
    }
    assert!(acked.len() >= 50, "the child made progress");
}

#[test]
fn a_loose_database_file_is_tightened_and_a_newer_schema_is_refused() {
    let dir = temp_dir();
    drop(Store::open(config(dir.path())).unwrap());
    let db = dir.path().join("lockhub.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    drop(Store::open(config(dir.path())).unwrap());
    assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o600);
    raw(dir.path()).pragma_update(None, "user_version", 99).unwrap();
    let err = Store::open(config(dir.path())).unwrap_err();
    assert!(matches!(err, StoreError::TooNew { found: 99, .. }), "{err}");
    assert!(err.to_string().contains("upgrade lockhub"), "{err}");
}

#[test]
fn passcodes_are_stored_only_as_argon2id_hashes() {
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let lock = LockId([9; 8]);
    store.transaction(|tx| tx.add_lock(lock, "C0:00:00:00:00:09", "L", &PairingKey::from_bytes([1; 32]), 1)).unwrap();
    for not_a_hash in ["123456", "$argon2i$v=19$m=256,t=2,p=1$c2FsdA$aGFzaA", "$2b$12$abcdefghijklmnopqrstuv"] {
        let r = store.transaction(|tx| tx.put_passcode(lock, None, Some(1), not_a_hash, None, None));
        assert!(matches!(r, Err(StoreError::Invalid(_))), "{not_a_hash} was accepted");
    }
    // The schema refuses one too, whoever writes it.
    let raw = raw(dir.path());
    assert!(raw.execute("INSERT INTO passcodes (lock, hash) VALUES (1, '123456')", []).is_err());
    store
        .transaction(|tx| {
            tx.put_passcode(lock, None, Some(1), "$argon2id$v=19$m=256,t=2,p=1$c2FsdA$aGFzaA", None, None)
        })
        .unwrap();
}

#[test]
fn a_users_local_code_for_a_lock_is_replaced_windowed_and_removed_by_its_id() {
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let lock = LockId([7; 8]);
    let (alice, hash_a, hash_b) =
        ([1u8; 32], "$argon2id$v=19$m=256,t=2,p=1$c2FsdA$YQ", "$argon2id$v=19$m=256,t=2,p=1$c2FsdA$Yg");
    store.transaction(|tx| tx.add_lock(lock, "C0:00:00:00:00:07", "L", &PairingKey::from_bytes([1; 32]), 1)).unwrap();
    let unknown_user = store.transaction(|tx| tx.put_local_code("k-0", lock, &alice, hash_a, 0, 100));
    assert!(matches!(unknown_user, Err(StoreError::NotFound(_))), "{unknown_user:?}");
    store.transaction(|tx| tx.add_user(&alice, 1)).unwrap();
    assert!(matches!(
        store.transaction(|tx| tx.put_local_code("k-0", lock, &alice, "2468", 0, 100)),
        Err(StoreError::Invalid(_))
    ));
    store.transaction(|tx| tx.put_local_code("k-1", lock, &alice, hash_a, 10, 100)).unwrap();
    store.transaction(|tx| tx.put_local_code("k-2", lock, &alice, hash_b, 10, 100)).unwrap();
    assert_eq!(store.local_codes(lock, 50).unwrap(), [(alice.to_vec(), hash_b.to_owned())]);
    assert!(store.local_codes(lock, 5).unwrap().is_empty(), "not yet valid");
    assert!(store.local_codes(lock, 101).unwrap().is_empty(), "expired");
    assert!(!store.transaction(|tx| tx.remove_local_code("k-1")).unwrap(), "replaced already");
    assert!(store.transaction(|tx| tx.remove_local_code("k-2")).unwrap());
    assert!(store.local_codes(lock, 50).unwrap().is_empty());
}

/// The policy's facts are cached until `principals_version` moves (src/gateway/facts_cache.rs):
/// every change to who may do what must move it — cascaded deletions included — while the
/// writes of every command and event (sequence numbers, outbox, audit, remembered ids) must
/// not, or the cache would be emptied on every command.
/// One write in a transaction.
type TxWrite<'a> = dyn Fn(&mut lockhub::store::Tx<'_>) -> Result<(), StoreError> + 'a;

#[test]
fn the_principals_version_moves_with_every_change_to_who_may_do_what_and_only_then() {
    let dir = temp_dir();
    let mut store = Store::open(config(dir.path())).unwrap();
    let version = store.principals_version();
    let (lock, user) = (LockId(random_bytes()), random_bytes::<32>());
    let moves = |store: &mut Store, write: &TxWrite<'_>| {
        let before = version.get();
        store.transaction(|tx| write(tx)).unwrap();
        version.get() != before
    };
    let changes: [(&str, &TxWrite<'_>); 6] = [
        ("a lock paired", &|tx| tx.add_lock(lock, "C0:00:00:00:00:01", "Door", &PairingKey::from_bytes([1; 32]), 1)),
        ("an owner pinned", &|tx| tx.pin_owner(&[5; 32], 1)),
        ("a user added", &|tx| tx.add_user(&user, 1)),
        ("a grant stored", &|tx| tx.put_grant("grant-1", lock, &user, b"grant", None)),
        ("a grant revoked", &|tx| tx.put_revocation("grant-1", Some(lock), b"revocation", 2)),
        ("a policy set", &|tx| tx.set_policy(Some(lock), r#"{"remote_unlock": true}"#)),
    ];
    for (what, change) in changes {
        assert!(moves(&mut store, change), "{what}: the version stood still");
    }
    let busy: [(&str, &TxWrite<'_>); 4] = [
        ("an event's sequence number", &|tx| tx.set_last_event_seq(lock, 7)),
        ("an outbox record", &|tx| tx.append_outbox(Some(lock), "t", b"{}", false, 3).map(|_| ())),
        ("an audit record", &|tx| {
            audit(tx, "command.unlock", Some(lock), AuditActor::Hub);
            Ok(())
        }),
        ("a remembered command id", &|tx| tx.remember_command("cmd-1", Some(lock), 10).map(|_| ())),
    ];
    for (what, write) in busy {
        assert!(!moves(&mut store, write), "{what} emptied the cache");
    }
    // Unbinding deletes the lock, and with it (by cascade) its grants and policy.
    let before = version.get();
    store.unbind(lock, AuditActor::Admin, 4).unwrap();
    assert_ne!(version.get(), before, "unbinding");
    // Forgetting a user.
    let before = version.get();
    assert!(store.forget_user(&user, 5).unwrap());
    assert_ne!(version.get(), before, "forgetting a user");
}

/// Refusals attributed to nobody beyond the audit budget are counted, not recorded one by one;
/// a transaction that fails takes its counts with it; the hourly housekeeping writes what was
/// counted as one record, and the chain still verifies.
#[test]
fn refusals_from_strangers_beyond_the_budget_are_counted_and_the_housekeeping_writes_the_count() {
    use lockhub::store::audit_budget::{BURST, SUMMARY_ACTION};
    let dir = temp_dir();
    let store = std::sync::Mutex::new(Store::open(config(dir.path())).unwrap());
    let t = 1_700_000_000;
    let refuse = |store: &mut Store, outcome: &str| {
        store.transaction(|tx| {
            tx.audit(AuditEntry {
                at: t,
                action: "cloud.statement",
                outcome,
                actor: AuditActor::Unknown,
                lock: None,
                detail: "",
            })
        })
    };
    for _ in 0..BURST {
        assert!(refuse(&mut store.lock().unwrap(), "bad_signature").unwrap(), "within the budget: recorded");
    }
    assert!(!refuse(&mut store.lock().unwrap(), "bad_signature").unwrap(), "beyond it: counted");
    assert!(!refuse(&mut store.lock().unwrap(), "malformed").unwrap());
    // Counted in a transaction that then failed: not counted after all.
    let failed: Result<(), StoreError> = store.lock().unwrap().transaction(|tx| {
        tx.audit(AuditEntry {
            at: t,
            action: "cloud.statement",
            outcome: "malformed",
            actor: AuditActor::Unknown,
            lock: None,
            detail: "",
        })?;
        Err(StoreError::Invalid("the disk says no"))
    });
    assert!(failed.is_err());
    lockhub::gateway::maintenance::tidy(&store, t + 10).unwrap();
    let store = store.into_inner().unwrap();
    let records = store.audit_records(0, 1000).unwrap();
    assert_eq!(records.len(), BURST as usize + 1);
    let summary = records.last().unwrap();
    assert_eq!((summary.action.as_str(), summary.at), (SUMMARY_ACTION, t + 10));
    assert!(summary.detail.starts_with("2 refusals"), "{}", summary.detail);
    assert!(summary.detail.ends_with(": bad_signature 1, malformed 1"), "{}", summary.detail);
    assert_eq!(store.verify_audit().unwrap(), AuditVerification::Intact { records: BURST as u64 + 1 });
}
