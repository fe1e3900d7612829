//! The `lockhub` binary as an operator runs it: `check-config` and its errors, `claim-code`,
//! and `run` as a process on the test bus and the bundled broker — online, claimed and
//! commanded through the cloud, `offline` after SIGTERM.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use lockhub::auth::statement::{Claim, Statement};
use lockhub::cloud::reply::Outcome;
use lockhub::devcloud::app::{AppClient, AppKey, new_id};
use lockhub::devcloud::pki::Pki;
use lockhub::protocol::ids::GatewayId;
use lockhub::store::unix_now;

fn write_config(dir: &Path, pki: &Pki, port: u16, gw: &str) -> std::path::PathBuf {
    let path = dir.join("lockhub.toml");
    std::fs::write(
        &path,
        format!(
            "[gateway]\nid = \"{gw}\"\nstate_dir = \"{}\"\n\n[cloud]\nbrokers = [\"mqtts://localhost:{port}\"]\n\
             ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[clock]\nrequire_sync = false\n",
            dir.join("state").display(),
            pki.ca_cert().display(),
            pki.client_cert(gw).display(),
            pki.client_key(gw).display()
        ),
    )
    .unwrap();
    path
}

fn lockhub(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lockhub")).args(args).output().unwrap()
}

#[test]
fn check_config_says_where_and_what() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::init(&dir.path().join("pki"), &["gw-cfg"]).unwrap();
    let good = write_config(dir.path(), &pki, 8883, "gw-cfg");
    let out = lockhub(&["check-config", "--config", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&good).unwrap().replace("require_sync", "require_synced");
    std::fs::write(&good, text).unwrap();
    let out = lockhub(&["check-config", "--config", good.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("lockhub.toml:12:1: unknown field `require_synced`, expected `require_sync`"), "{stderr}");
    let out = lockhub(&["check-config", "--config", "/nonexistent/lockhub.toml"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("/nonexistent/lockhub.toml"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_runs_is_claimed_through_the_cloud_and_stops_cleanly() {
    let bed = support::bed();
    let dir = tempfile::tempdir().unwrap();
    let gw = "gw-daemon";
    let pki = Pki::init(&dir.path().join("pki"), &[gw]).unwrap();
    let broker = support::bundled::Bundled::start(&pki);
    let config = write_config(dir.path(), &pki, broker.port, gw);
    let app = AppClient::connect(&format!("mqtts://localhost:{}", broker.port), &pki, &GatewayId::new(gw).unwrap())
        .await
        .unwrap();
    let mut seen = app.watch();
    let mut daemon = Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--", env!("CARGO_BIN_EXE_lockhub"), "run", "--config"])
        .arg(&config)
        .env("DBUS_SYSTEM_BUS_ADDRESS", &bed.bus)
        .env("LOCKHUB_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let status_topic = format!("lockhub/v1/{gw}/status");
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), seen.recv())
            .await
            .expect("the daemon never came online")
            .unwrap();
        if msg.topic == status_topic && String::from_utf8_lossy(&msg.payload).contains("\"online\"") {
            break;
        }
    }
    // The claim code from the CLI, while the daemon runs (the store is shared safely).
    let out = lockhub(&["claim-code", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let code = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(code.len(), 11, "{code}");
    let owner = AppKey::generate(&dir.path().join("keys"), "owner", false).unwrap();
    let now = unix_now();
    let claim =
        Statement::Claim(Claim { jti: new_id("k"), gw: GatewayId::new(gw).unwrap(), code, iat: now, exp: now + 60 });
    let reply = app.send(&claim, &owner, Duration::from_secs(60)).await.unwrap();
    assert_eq!(reply.result, Outcome::Ok, "{reply:?}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(daemon.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), seen.recv()).await.expect("no offline status").unwrap();
        if msg.topic == status_topic && String::from_utf8_lossy(&msg.payload).contains("\"offline\"") {
            break;
        }
    }
    let exit = tokio::task::spawn_blocking(move || daemon.wait().unwrap()).await.unwrap();
    assert!(exit.success(), "the daemon exited with {exit}");
    let out = lockhub(&["claim-code", "--config", config.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("already claimed"));
}
