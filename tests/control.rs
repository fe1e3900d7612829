//! The admin control socket and its command line, against a gateway running over the real
//! stack: status, locks, audit (and its verification), users, forget-user, unbind and rekey as
//! root, with tables and `--json`; an unprivileged user outside the admin group is refused with
//! a message that says what to do — by the socket's mode, and by the server's own check when
//! the mode is loosened; deletions that another connection to the database holds up; and a
//! flood of connections answered `busy` beyond the bound.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use lockhub::auth::statement::Permission;
use lockhub::ble::LockTransport;
use support::stack::{Stack, claim_pair_grant};

fn lockhub(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lockhub")).args(args).arg("--socket").arg(socket).output().unwrap()
}

/// Runs the CLI in a blocking task (the server runs on this test's runtime).
async fn cli(socket: &Path, args: &[&str]) -> (bool, String, String) {
    let socket = socket.to_owned();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        lockhub(&socket, &args)
    })
    .await
    .unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

async fn as_nobody(socket: &Path, args: &[&str]) -> (bool, String) {
    let mut command = Command::new("setpriv");
    command
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--", env!("CARGO_BIN_EXE_lockhub")])
        .args(args)
        .arg("--socket")
        .arg(socket);
    let out = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    (out.status.success(), String::from_utf8(out.stderr).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_cli_over_the_control_socket() {
    crate::needs!(Dbus, Root);
    let run = tempfile::tempdir().unwrap();
    // Others may traverse the directory, so that the socket's own mode is what decides.
    std::fs::set_permissions(run.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let mut hub = Stack::prepare("gw-admin");
    // The admin group here is root's: `nobody` is outside it.
    hub.config.control.group = "root".into();
    hub.config.control.socket = run.path().join("control.sock");
    let stack = hub.start().await;
    let socket = stack.hub.control_socket().to_owned();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let p = claim_pair_grant(&stack, &[Permission::Lock, Permission::Unlock], None).await;
    let lock = p.lock_id.to_string();

    // As root.
    let (ok, out, err) = cli(&socket, &["status"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("gateway:         gw-admin") && out.contains("cloud:           connected (broker 1)"),
        "{out}"
    );
    assert!(out.contains("locks:           1") && out.contains("claimed:         yes"), "{out}");
    assert!(out.contains("adapter:         hci0: home to 1 lock(s), "), "the emulator's one adapter: {out}");
    let (ok, out, err) = cli(&socket, &["locks"]).await;
    assert!(ok, "{err}");
    assert!(out.starts_with("LOCK") && out.contains(&lock), "{out}");
    let (ok, out, _) = cli(&socket, &["locks", "--json"]).await;
    let locks: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok);
    assert_eq!(locks[0]["lock"], lock.as_str());
    assert_eq!(locks[0]["adapter"], "hci0", "the adapter it goes through");
    assert_eq!(locks[0]["reachable"], true, "just paired: reachable, whether or not its task has reported yet");
    let (ok, out, _) = cli(&socket, &["audit", "--limit", "100"]).await;
    assert!(ok && out.contains("lock.pair") && out.contains("gateway.claim"), "{out}");
    let (ok, out, _) = cli(&socket, &["audit", "--json"]).await;
    let records: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok && records.as_array().unwrap().len() >= 3, "{out}");
    let (ok, out, _) = cli(&socket, &["audit", "--verify"]).await;
    assert!(ok && out.starts_with("audit chain intact:"), "{out}");
    // Its reader gone before the table (`lockhub audit | head -0`): a quiet, successful end.
    let mut audit = Command::new(env!("CARGO_BIN_EXE_lockhub"));
    audit.args(["audit", "--socket"]).arg(&socket);
    tokio::task::spawn_blocking(move || support::assert_quiet_with_reader_gone(&mut audit)).await.unwrap();
    let (ok, out, _) = cli(&socket, &["users", "--json"]).await;
    let users: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok);
    let user_key = p.user.public().to_string();
    assert_eq!(users[0]["key"], user_key.as_str());
    assert_eq!(users[0]["grants"], 1);

    // Destructive commands want a confirmation; without a terminal, --yes.
    let (ok, _, err) = cli(&socket, &["unbind", &lock]).await;
    assert!(!ok && err.contains("pass --yes to confirm from a script"), "{err}");
    let (ok, out, err) = cli(&socket, &["unbind", &lock, "--yes"]).await;
    assert!(ok, "{err}");
    assert!(
        err.contains("asking the lock to forget this hub") && out.contains(&format!("unbound lock {lock}")),
        "{out}{err}"
    );
    let (ok, _, err) = cli(&socket, &["unbind", &lock, "--yes"]).await;
    assert!(!ok && err.contains("is not paired (not_found)"), "{err}");
    let (ok, out, _) = cli(&socket, &["locks"]).await;
    assert!(ok && out.contains("(none)"), "{out}");
    let (ok, _, err) = cli(&socket, &["forget-user", &user_key, "--yes"]).await;
    assert!(ok, "{err}");
    let (ok, out, _) = cli(&socket, &["users"]).await;
    assert!(ok && out.contains("(none)"), "{out}");
    let (ok, _, err) = cli(&socket, &["forget-user", "not-a-key", "--yes"]).await;
    assert!(!ok && err.contains("(malformed)"), "{err}");
    let (ok, out, err) = cli(&socket, &["rekey"]).await;
    assert!(ok && out.contains("re-sealed under a new master key"), "{out}{err}");
    let (ok, out, _) = cli(&socket, &["audit", "--verify"]).await;
    assert!(ok && out.starts_with("audit chain intact:"), "{out}");

    // A new lock: scanned (progress each second), then paired with the code on its label.
    let ctl = support::control().await;
    let fresh = support::add_lock(&ctl, r#"{"motor_ms": 0}"#).await;
    assert!(fresh.pairing_mode);
    let (ok, out, err) = cli(&socket, &["scan", "--seconds", "2"]).await;
    assert!(ok, "{err}");
    assert!(err.contains("scanning: 1 of 2 s") && err.contains("scanning: 2 of 2 s"), "{err}");
    // Unpaired, it is known by the tag it advertises (its id is on its label).
    let tag = lockhub::protocol::ids::LockTag::of(lockhub::protocol::ids::LockId::parse(&fresh.lock_id).unwrap());
    let row = out.lines().find(|l| l.starts_with(&tag.to_string())).unwrap_or_else(|| panic!("not seen: {out}"));
    assert!(row.contains("dBm") && row.contains("yes  ") && row.trim_end().ends_with("no"), "{row}");
    let (ok, _, err) = cli(&socket, &["pair", &fresh.lock_id, "--setup", "00000000"]).await;
    assert!(!ok && err.contains("pairing failed"), "a wrong setup code: {err}");
    let (ok, out, err) = cli(&socket, &["pair", &fresh.lock_id, "--setup", &fresh.setup_code]).await;
    assert!(ok && out.contains(&format!("paired lock {}", fresh.lock_id)), "{out}{err}");
    let (ok, out, _) = cli(&socket, &["locks"]).await;
    assert!(ok && out.contains(&fresh.lock_id), "{out}");

    // As `nobody`: the socket's mode keeps them out, and the message says what to do.
    let (ok, err) = as_nobody(&socket, &["status"]).await;
    assert!(!ok);
    assert!(err.contains("permission denied") && err.contains("lockhub-admin group"), "{err}");
    // Loosened, the server itself refuses them.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let (ok, err) = as_nobody(&socket, &["status"]).await;
    assert!(!ok);
    assert!(err.contains("nobody may not administer this hub") && err.contains("(unauthorised)"), "{err}");

    // A malformed request gets a typed answer, and the server keeps serving.
    let raw = {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.write_all(b"{\"cmd\":\"reboot\"}\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    };
    assert!(raw.contains("\"code\":\"malformed\""), "{raw}");
    assert!(cli(&socket, &["status"]).await.0);

    // Someone edits an audit record behind the daemon's back: --verify names it and fails.
    let db = rusqlite::Connection::open(stack.dir.path().join("state").join("lockhub.db")).unwrap();
    let seq: i64 = db.query_row("SELECT MIN(seq) + 1 FROM audit", [], |r| r.get(0)).unwrap();
    db.execute("UPDATE audit SET outcome = 'ok', detail = 'nothing happened' WHERE seq = ?1", [seq]).unwrap();
    let (ok, out, _) = cli(&socket, &["audit", "--verify"]).await;
    assert!(!ok && out.starts_with(&format!("audit chain BROKEN at record {seq}")), "{out}");
}

/// Every byte of the files the store keeps, joined, to search for what was deleted.
fn store_bytes(state: &Path) -> Vec<u8> {
    std::fs::read_dir(state).unwrap().flat_map(|e| std::fs::read(e.unwrap().path()).unwrap_or_default()).collect()
}

fn holds(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A user who sent commands and is then forgotten is named in no file of the store: not by
/// their key raw, in base64 or in hex. (A remembered command id was `<key in base64>:<jti>`,
/// kept until the command's expiry; a grant's id for as long as the grant.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_user_who_sent_commands_is_named_in_no_file() {
    crate::needs!(Dbus);
    use base64::Engine;
    use lockhub::devcloud::app::command;
    let stack = Stack::start("gw-forget").await;
    let socket = stack.hub.control_socket().to_owned();
    let p = claim_pair_grant(&stack, &[Permission::Unlock, Permission::Lock, Permission::Remote], None).await;
    for op in [lockhub::auth::statement::Operation::Unlock, lockhub::auth::statement::Operation::Lock] {
        let statement = lockhub::auth::statement::Statement::Command(command(
            &stack.gw,
            p.lock_id,
            op,
            lockhub::store::unix_now(),
            30,
        ));
        let reply = p.app.send(&statement, &p.user, support::stack::WAIT).await.unwrap();
        support::stack::assert_reply(&reply, lockhub::cloud::reply::Outcome::Ok, None);
    }
    let key = p.user.public();
    let (ok, _, err) = cli(&socket, &["forget-user", &key.to_string(), "--yes"]).await;
    assert!(ok, "{err}");
    let mut debt = stack.log_debt.clone();
    tokio::time::timeout(support::stack::WAIT, debt.wait_for(|d| !d.outstanding())).await.unwrap().unwrap();
    let files = store_bytes(&stack.dir.path().join("state"));
    let raw = key.as_bytes();
    let forms = [
        ("raw", raw.to_vec()),
        ("base64url", key.to_string().into_bytes()),
        ("base64", base64::engine::general_purpose::STANDARD.encode(raw).into_bytes()),
        ("hex", raw.iter().map(|b| format!("{b:02x}")).collect::<String>().into_bytes()),
    ];
    for (form, needle) in forms {
        assert!(!holds(&files, &needle), "the forgotten user's key ({form}) is still in the store's files");
    }
}

/// An unbind and a forget-user whose compaction another connection holds up (a tool left
/// open on the database): the admin is told that the deleted rows are still in the log, yet
/// the lock is unbound everywhere — the transport forgot it, its retained state is cleared,
/// it is listed no more — and the checkpointer empties the log once the tool lets go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_held_up_by_another_connection_still_happen_and_say_what_is_left() {
    crate::needs!(Dbus);
    let stack = Stack::start("gw-held").await;
    let socket = stack.hub.control_socket().to_owned();
    let p = claim_pair_grant(&stack, &[Permission::Unlock], None).await;
    let lock = p.lock_id.to_string();
    let user_key = p.user.public().to_string();
    let state_topic = lockhub::cloud::topics::Topics::new(&stack.gw).lock_state(p.lock_id);
    let mut seen = p.app.watch();
    let state = stack.dir.path().join("state");

    let reader = rusqlite::Connection::open(state.join("lockhub.db")).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader.query_row("SELECT count(*) FROM locks", [], |r| r.get(0)).unwrap();
    let (ok, out, err) = cli(&socket, &["unbind", &lock, "--yes"]).await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("deleted, but the database's write-ahead log still holds the deleted rows")
            && err.contains("it is emptied as soon as they let go"),
        "{err}"
    );
    assert!(!stack.transport.remembers(&p.lock.address), "the transport forgot the lock all the same");
    loop {
        let msg = tokio::time::timeout(support::stack::WAIT, seen.recv()).await.expect("state never cleared").unwrap();
        if msg.topic == state_topic && msg.payload.is_empty() {
            break;
        }
    }
    let (ok, out, _) = cli(&socket, &["locks"]).await;
    assert!(ok && out.contains("(none)"), "{out}");
    let (ok, _, err) = cli(&socket, &["forget-user", &user_key, "--yes"]).await;
    assert!(!ok && err.contains("still holds the deleted rows"), "{err}");
    let (ok, out, _) = cli(&socket, &["users"]).await;
    assert!(ok && out.contains("(none)"), "{out}");
    let mut debt = stack.log_debt.clone();
    assert!(debt.borrow_and_update().outstanding());
    assert!(holds(&store_bytes(&state), p.lock.address.as_bytes()), "what is owed: the lock's rows, in the log");
    let (ok, out, err) = cli(&socket, &["status"]).await;
    assert!(ok && out.contains("deletions:       deleted rows still in the store's log"), "{out}{err}");

    reader.execute_batch("COMMIT").unwrap();
    tokio::time::timeout(support::stack::WAIT, debt.wait_for(|d| !d.outstanding()))
        .await
        .expect("the log was never emptied after the reader let go")
        .unwrap();
    let (ok, out, err) = cli(&socket, &["status"]).await;
    assert!(ok && out.contains("deletions:       complete"), "{out}{err}");
    let files = store_bytes(&state);
    assert!(!holds(&files, p.lock.address.as_bytes()), "the lock's address is still in the store's files");
    assert!(!holds(&files, lock.as_bytes()), "the lock's id is still in the store's files");
    assert!(!holds(&files, p.user.public().as_bytes()), "the user's key is still in the store's files");
}

/// The records that clear an unbound lock's retained topics name it (its id is in the topic)
/// and stay in the outbox until the broker has them, after the unbind's compaction: once they
/// are delivered, nothing of the lock is left in any file either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_its_retained_topics_are_cleared_no_file_names_the_unbound_lock() {
    crate::needs!(Dbus);
    use lockhub::store::audit::AuditActor;
    let stack = Stack::start("gw-clear").await;
    let p = claim_pair_grant(&stack, &[Permission::Unlock], None).await;
    let lock = p.lock_id.to_string();
    let state = stack.dir.path().join("state");
    assert_eq!(stack.gateway.unbind(p.lock_id, AuditActor::Admin).await.unwrap(), Some(true));
    stack
        .after_deliveries(|| match stack.store.lock().unwrap().outbox_len().unwrap() {
            0 => Ok(()),
            n => Err(format!("{n} outbox records undelivered")),
        })
        .await;
    let mut debt = stack.log_debt.clone();
    tokio::time::timeout(support::stack::WAIT, debt.wait_for(|d| !d.outstanding())).await.unwrap().unwrap();
    let files = store_bytes(&state);
    assert!(!holds(&files, lock.as_bytes()), "the unbound lock's id is still in the store's files");
    assert!(!holds(&files, p.lock.address.as_bytes()), "the lock's address is still in the store's files");
}

/// Reads one answer line from a raw connection to the control socket.
async fn answer_on(stream: &mut tokio::net::UnixStream) -> serde_json::Value {
    use tokio::io::AsyncBufReadExt;
    let mut line = String::new();
    tokio::time::timeout(support::stack::WAIT, tokio::io::BufReader::new(stream).read_line(&mut line))
        .await
        .expect("no answer")
        .unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
}

/// A flood of connections that send nothing (a script gone wrong) takes at most
/// `MAX_CONNECTIONS` of the daemon's descriptors: the next is answered `busy` at once instead
/// of waiting out their 10 s, and once one of them goes the socket serves again. (And the
/// server stops with the hub, connections open or not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_is_answered_busy_and_the_socket_serves_on() {
    crate::needs!(Dbus);
    use lockhub::control::server::MAX_CONNECTIONS;
    use tokio::io::AsyncWriteExt;
    let stack = Stack::start("gw-flood").await;
    let socket = stack.hub.control_socket().to_owned();

    let mut silent = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        silent.push(tokio::net::UnixStream::connect(&socket).await.unwrap());
    }
    // Accepted in the order they connected: this one is over the bound.
    let mut over = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let answer = answer_on(&mut over).await;
    assert_eq!(answer["error"]["code"], "busy", "{answer}");
    assert!(answer["error"]["message"].as_str().unwrap().contains("try again"), "{answer}");

    // One leaves: its task sees the end of its request and gives its place back.
    drop(silent.pop());
    let served = tokio::time::timeout(support::stack::WAIT, async {
        loop {
            let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
            // Refused, the connection may be closed before the request is written: the answer
            // is there to read all the same.
            let _ = stream.write_all(b"{\"cmd\":\"status\"}\n").await;
            let answer = answer_on(&mut stream).await;
            if answer["error"]["code"] != "busy" {
                return answer;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("never served again after a place was free");
    assert_eq!(served["ok"]["gateway"], "gw-flood", "{served}");

    // The hub stopped with connections still open: the server ends and removes its socket.
    let stopped = stack.hub.stop().await;
    assert!(stopped.link_closed, "{stopped:?}");
    assert!(!socket.exists());
    drop(silent);
}
