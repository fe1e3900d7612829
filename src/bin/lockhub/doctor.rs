//! `lockhub doctor`: checks what the hub needs, one line per check, each failure with its fix.
//!
//! It runs beside the daemon (or instead of it), from the configuration: the files and their
//! modes, the certificates' validity, the clock, BlueZ on the system bus and its adapter, each
//! broker (TCP, then the TLS handshake with the gateway's certificate), the store's integrity,
//! and the daemon's control socket.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use lockhub::cloud::broker_url::BrokerUrl;
use lockhub::config::Config;
use lockhub::control::protocol::Request;
use lockhub::outln;
use serde_json::json;

/// Certificates expiring sooner than this are reported.
const EXPIRY_WARNING_DAYS: i64 = 30;
/// How long a broker may take to answer.
const BROKER_TIMEOUT: Duration = Duration::from_secs(5);

/// One check's result.
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
    fix: Option<String>,
}

fn ok(name: &'static str, detail: impl Into<String>) -> Check {
    Check { name, ok: true, detail: detail.into(), fix: None }
}

fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name, ok: false, detail: detail.into(), fix: Some(fix.into()) }
}

/// Runs every check; prints them; fails when one failed.
pub fn run(config_path: &Path, socket: &Path, json: bool) -> Result<()> {
    let mut checks = Vec::new();
    let config = match Config::load(config_path).and_then(|c| c.check_files(config_path).map(|()| c)) {
        Ok(c) => {
            checks.push(ok("configuration", format!("{} is valid, its files readable", config_path.display())));
            Some(c)
        }
        Err(e) => {
            checks.push(fail(
                "configuration",
                e.to_string(),
                "fix what the message names, then run lockhub check-config",
            ));
            None
        }
    };
    if let Some(config) = &config {
        match &config.cloud {
            Some(cloud) => {
                checks.push(certificate("gateway certificate", &cloud.cert));
                checks.push(certificate("cloud CA", &cloud.ca));
            }
            None => checks.push(ok("cloud", "not configured: this hub runs local only".to_owned())),
        }
        checks.push(clock(config.clock.require_sync));
        checks.push(modes(config));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        checks.extend(runtime.block_on(bluez(config)));
        for url in config.cloud.iter().flat_map(|c| &c.brokers) {
            checks.push(runtime.block_on(broker(config, url)));
        }
        checks.push(store(config));
    }
    checks.push(match crate::admin::call(socket, &Request::Status) {
        Ok(status) => ok("daemon", format!("running, version {}", status["version"].as_str().unwrap_or("?"))),
        Err(e) => fail("daemon", e.to_string(), "systemctl start lockhub; journalctl -u lockhub says why it stopped"),
    });
    let failed = checks.iter().filter(|c| !c.ok).count();
    if json {
        let list: Vec<_> =
            checks.iter().map(|c| json!({ "check": c.name, "ok": c.ok, "detail": c.detail, "fix": c.fix })).collect();
        outln!("{}", serde_json::to_string_pretty(&list)?)?;
    } else {
        for c in &checks {
            outln!("{:<4}  {:<20}  {}", if c.ok { "ok" } else { "FAIL" }, c.name, c.detail)?;
            if let Some(fix) = &c.fix {
                outln!("      {:<20}  fix: {fix}", "")?;
            }
        }
    }
    if failed > 0 {
        anyhow::bail!("{failed} check(s) failed");
    }
    Ok(())
}

fn certificate(name: &'static str, path: &Path) -> Check {
    let Ok(pem) = lockhub::bounded_file::read(path, lockhub::cloud::tls::MAX_PEM_BYTES) else {
        return fail(name, format!("{} cannot be read", path.display()), "see the configuration check");
    };
    let parsed = x509_parser::pem::parse_x509_pem(&pem).ok().and_then(|(_, pem)| {
        let cert = pem.parse_x509().ok()?;
        let v = cert.validity();
        Some((v.not_before.timestamp(), v.not_after.timestamp(), cert.subject().to_string()))
    });
    let Some((not_before, not_after, subject)) = parsed else {
        return fail(name, format!("{}: not a PEM certificate", path.display()), "put the PEM certificate there");
    };
    let now = lockhub::store::unix_now();
    let days = (not_after - now) / 86_400;
    if now < not_before {
        fail(
            name,
            format!("{subject}: not valid before {not_before} (Unix time); is the clock right?"),
            "check the clock, or get a certificate valid now",
        )
    } else if now > not_after {
        fail(
            name,
            format!("{subject}: expired {} day(s) ago", -days),
            "get a new certificate from the vendor's PKI and restart lockhub",
        )
    } else if days < EXPIRY_WARNING_DAYS {
        fail(
            name,
            format!("{subject}: expires in {days} day(s)"),
            "renew it before it expires, then systemctl restart lockhub",
        )
    } else {
        ok(name, format!("{subject}: valid for {days} more day(s)"))
    }
}

fn clock(required: bool) -> Check {
    match (crate::daemon::kernel_synchronised(), required) {
        (true, _) => ok("clock", "synchronised (NTP)"),
        (false, false) => ok("clock", "not synchronised, and [clock] require_sync is off"),
        (false, true) => fail(
            "clock",
            "not synchronised: remote commands are refused until it is",
            "enable NTP (timedatectl set-ntp true) and check the network",
        ),
    }
}

fn modes(config: &Config) -> Check {
    let dir = &config.gateway.state_dir;
    match std::fs::metadata(dir) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => fail(
            "file modes",
            format!(
                "{} is mode {:04o}: others can look into the store",
                dir.display(),
                m.permissions().mode() & 0o7777
            ),
            format!("chmod 0700 {}", dir.display()),
        ),
        Ok(_) => ok("file modes", format!("{} is private; the key file is not readable by others", dir.display())),
        Err(_) => ok("file modes", format!("{} does not exist yet (the daemon creates it)", dir.display())),
    }
}

/// One check per configured adapter (`ble.adapters`, else `ble.adapter`): BlueZ answers and
/// the adapter is there, powered.
async fn bluez(config: &Config) -> Vec<Check> {
    let mut checks = Vec::new();
    for choice in config.ble.adapter_choices() {
        let wanted = choice.clone().unwrap_or_else(|| "the first powered adapter".into());
        checks.push(match lockhub::ble::bluez::BluezTransport::open(&config.ble.for_adapter(choice)).await {
            Ok(transport) => ok(
                "bluetooth",
                format!(
                    "{wanted}: BlueZ answers on the system bus; adapter {} is there, powered, for {} links at once",
                    transport.adapter_name(),
                    config.ble.max_links
                ),
            ),
            Err(e) => fail(
                "bluetooth",
                format!("{wanted}: {e}"),
                "systemctl status bluetooth; the daemon's user must be in group bluetooth; rfkill list; bluetoothctl list",
            ),
        });
    }
    checks
}

async fn broker(config: &Config, url: &str) -> Check {
    let Ok(broker) = BrokerUrl::parse(url) else {
        return fail("broker", format!("{url}: not mqtts://host[:port]"), "fix cloud.brokers");
    };
    let address = format!("{}:{}", broker.host, broker.port);
    let tcp = match tokio::time::timeout(BROKER_TIMEOUT, tokio::net::TcpStream::connect(&address)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            return fail(
                "broker",
                format!("{address}: {e}"),
                "check the network, DNS and the broker's address and port",
            );
        }
        Err(_) => return fail("broker", format!("{address}: no answer in 5 s"), "check the network and any firewall"),
    };
    let Some(cloud) = &config.cloud else { return fail("broker", "no [cloud] configured", "add [cloud]") };
    let tls = match lockhub::cloud::tls::client_config(&cloud.ca, &cloud.cert, &cloud.key) {
        Ok(tls) => tls,
        Err(e) => return fail("broker", e.to_string(), "fix the certificate files"),
    };
    let Ok(name) = rustls::pki_types::ServerName::try_from(broker.host.clone()) else {
        return fail("broker", format!("{}: not a host name", broker.host), "fix cloud.brokers");
    };
    let handshake = tokio_rustls::TlsConnector::from(Arc::clone(&tls)).connect(name, tcp);
    match tokio::time::timeout(BROKER_TIMEOUT, handshake).await {
        Ok(Ok(_)) => {
            ok("broker", format!("{address}: reachable, TLS with the pinned CA and this gateway's certificate"))
        }
        Ok(Err(e)) => fail(
            "broker",
            format!("{address}: TLS handshake failed: {e}"),
            "check cloud.ca (the CA that signed the broker's certificate) and the clock",
        ),
        Err(_) => fail("broker", format!("{address}: TLS handshake timed out"), "check the broker"),
    }
}

fn store(config: &Config) -> Check {
    let store = lockhub::store::StoreConfig::in_dir(&config.gateway.state_dir);
    if !store.database.exists() {
        return ok("database", "no store yet (the daemon creates it)");
    }
    match lockhub::store::Store::open(store).and_then(|s| s.integrity_check()) {
        Ok(()) => ok("database", "integrity check passed"),
        Err(e) => fail(
            "database",
            e.to_string(),
            "stop lockhub, back up /var/lib/lockhub, and restore or remove the store (the hub must then be re-paired)",
        ),
    }
}
