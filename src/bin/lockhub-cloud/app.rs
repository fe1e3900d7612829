//! `lockhub-cloud app …`: the phone-app stand-in on the command line. Keys live in a directory;
//! statements are signed with them and sent through the broker with the relay's certificate;
//! each command prints the gateway's typed reply and exits non-zero unless it was `ok`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use lockhub::auth::keys::PublicKey;
use lockhub::auth::statement::{Operation, Permission, Schedule, Statement, StatementId};
use lockhub::cloud::reply::{Outcome, Reply};
use lockhub::devcloud::app::{AppClient, AppKey, claim, command, grant, local_code, pair, remote_unlock, revoke};
use lockhub::devcloud::pki::Pki;
use lockhub::outln;
use lockhub::protocol::ids::{GatewayId, LockId};
use lockhub::standard_streams::Reader;
use lockhub::store::unix_now;

/// Where the app finds its keys and the cloud.
#[derive(Args)]
pub struct AppArgs {
    /// Directory of the app's keys (created by `keygen`).
    #[arg(long, default_value = "lockhub-app")]
    dir: PathBuf,
    /// The broker.
    #[arg(long, default_value = "mqtts://localhost:8883")]
    broker: String,
    /// The PKI directory with the relay's certificate.
    #[arg(long)]
    pki: Option<PathBuf>,
    /// Which key signs (a name in --dir).
    #[arg(long, default_value = "owner")]
    key: String,
    /// How long to wait for the gateway's reply, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    #[command(subcommand)]
    command: AppCommand,
}

#[derive(Clone, Copy, ValueEnum)]
enum Perm {
    Lock,
    Unlock,
    Unlatch,
    Remote,
}

#[derive(Subcommand)]
enum AppCommand {
    /// Create a key pair named --key in --dir (mode 0600) and print its public key.
    Keygen {
        /// Replace an existing key (grants naming the old one stop working).
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of --key (what the owner grants to).
    Whoami,
    /// Claim a gateway with the code it shows (`lockhub claim-code`).
    Claim {
        #[arg(long)]
        gateway: String,
        #[arg(long)]
        code: String,
    },
    /// Pair a lock with the setup code on its label.
    Pair {
        #[arg(long)]
        gateway: String,
        #[arg(long)]
        lock: String,
        #[arg(long)]
        setup: String,
    },
    /// Grant a user (by public key) permissions on a lock.
    Grant {
        #[arg(long)]
        gateway: String,
        #[arg(long)]
        lock: String,
        /// The user's public key (`lockhub-cloud app whoami` on their side; base64url, so it
        /// may begin with `-`).
        #[arg(long, allow_hyphen_values = true)]
        user: String,
        /// Permissions, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        perms: Vec<Perm>,
        /// Valid for this many days from now.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Restrict to these weekdays (mon,tue,…), with --from, --to and --tz.
        #[arg(long, value_delimiter = ',')]
        weekdays: Vec<String>,
        #[arg(long, default_value = "00:00")]
        from: String,
        #[arg(long, default_value = "23:59")]
        to: String,
        #[arg(long, default_value = "UTC")]
        tz: String,
    },
    /// Give a user (by public key) a code for local control of a lock (Home Assistant). The
    /// code is read from stdin and only its Argon2id hash is sent.
    LocalCode {
        #[arg(long)]
        gateway: String,
        #[arg(long)]
        lock: String,
        /// The user's public key (`lockhub-cloud app whoami` on their side; base64url, so it
        /// may begin with `-`).
        #[arg(long, allow_hyphen_values = true)]
        user: String,
        /// Valid for this many days from now.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Revoke a grant or a local code by its id (printed when given).
    Revoke {
        #[arg(long)]
        gateway: String,
        #[arg(long)]
        grant: String,
    },
    /// Turn remote unlock on or off for a lock (off until the owner turns it on).
    Policy {
        #[arg(long)]
        gateway: String,
        #[arg(long)]
        lock: String,
        #[arg(long)]
        remote_unlock: bool,
    },
    /// Unlock a lock.
    Unlock {
        #[arg(long)]
        gateway: String,
        #[arg(long)]
        lock: String,
    },
    /// Lock a lock.
    Lock {
        #[arg(long)]
        gateway: String,
        #[arg(long)]
        lock: String,
    },
    /// Unlatch (open) a lock that can.
    Unlatch {
        #[arg(long)]
        gateway: String,
        #[arg(long)]
        lock: String,
    },
    /// Print the gateway's retained status and its locks' retained states.
    Status {
        #[arg(long)]
        gateway: String,
    },
    /// Print the gateway's status and its locks' retained states, then events as they come
    /// (Ctrl-C to stop; --for to stop after some seconds).
    Events {
        #[arg(long)]
        gateway: String,
        /// Stop after this many seconds.
        #[arg(long = "for")]
        seconds: Option<u64>,
    },
}

fn gateway(id: &str) -> Result<GatewayId> {
    GatewayId::new(id).map_err(|e| anyhow::anyhow!("--gateway {id:?}: {e}"))
}

fn lock(id: &str) -> Result<LockId> {
    LockId::parse(id).map_err(|_| anyhow::anyhow!("--lock {id:?}: a lock id is 16 hex digits"))
}

fn print_reply(reply: &Reply) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(reply)?)?;
    if reply.result != Outcome::Ok {
        bail!("the gateway answered {:?}", reply.reason.map(|r| r.as_str()).unwrap_or("not ok"));
    }
    Ok(())
}

/// Runs an app subcommand.
pub async fn run(args: AppArgs) -> Result<()> {
    let AppArgs { dir, broker, pki, key, timeout, command: cmd } = args;
    let timeout = Duration::from_secs(timeout);
    match &cmd {
        AppCommand::Keygen { force } => {
            let k = AppKey::generate(&dir, &key, *force)?;
            outln!("{}", k.public())?;
            return Ok(());
        }
        AppCommand::Whoami => {
            outln!("{}", AppKey::load(&dir, &key)?.public())?;
            return Ok(());
        }
        _ => {}
    }
    let pki = Pki::open(&pki.context("--pki DIR: the PKI with the relay's certificate is needed to reach the broker")?);
    let now = unix_now();
    let (gw, statement) = match cmd {
        AppCommand::Keygen { .. } | AppCommand::Whoami => unreachable!("handled above"),
        AppCommand::Claim { gateway: g, code } => {
            let gw = gateway(&g)?;
            (gw.clone(), claim(&gw, &code, now))
        }
        AppCommand::Pair { gateway: g, lock: l, setup } => {
            let gw = gateway(&g)?;
            (gw.clone(), pair(&gw, lock(&l)?, &setup, now))
        }
        AppCommand::Grant { gateway: g, lock: l, user, perms, days, weekdays, from, to, tz } => {
            let gw = gateway(&g)?;
            let sub = PublicKey::from_base64(&user).map_err(|e| anyhow::anyhow!("--user: {e}"))?;
            let perms = perms
                .into_iter()
                .map(|p| match p {
                    Perm::Lock => Permission::Lock,
                    Perm::Unlock => Permission::Unlock,
                    Perm::Unlatch => Permission::Unlatch,
                    Perm::Remote => Permission::Remote,
                })
                .collect();
            let schedule = (!weekdays.is_empty()).then_some(Schedule { tz, days: weekdays, from, to });
            if let Some(s) = &schedule {
                s.validate().map_err(|e| anyhow::anyhow!("schedule: {e}"))?;
            }
            let g = grant(&gw, sub, lock(&l)?, perms, schedule, days, now);
            outln!("grant id: {} (to revoke it: --grant {})", g.jti, g.jti)?;
            (gw, Statement::Grant(g))
        }
        AppCommand::LocalCode { gateway: g, lock: l, user, days } => {
            let gw = gateway(&g)?;
            let sub = PublicKey::from_base64(&user).map_err(|e| anyhow::anyhow!("--user: {e}"))?;
            let mut code = zeroize::Zeroizing::new(String::new());
            std::io::stdin().read_line(&mut code).context("reading the code from stdin")?;
            let c = local_code(&gw, sub, lock(&l)?, code.trim(), days, now).context("the code")?;
            outln!("local code id: {} (to revoke it: --grant {})", c.jti, c.jti)?;
            (gw, Statement::LocalCode(c))
        }
        AppCommand::Revoke { gateway: g, grant } => {
            let gw = gateway(&g)?;
            let grant = StatementId::new(grant).map_err(|e| anyhow::anyhow!("--grant: {e}"))?;
            (gw.clone(), revoke(&gw, grant, now))
        }
        AppCommand::Policy { gateway: g, lock: l, remote_unlock: on } => {
            let gw = gateway(&g)?;
            (gw.clone(), remote_unlock(&gw, lock(&l)?, on, now))
        }
        AppCommand::Unlock { gateway: g, lock: l } => {
            let gw = gateway(&g)?;
            (gw.clone(), Statement::Command(command(&gw, lock(&l)?, Operation::Unlock, now, 30)))
        }
        AppCommand::Lock { gateway: g, lock: l } => {
            let gw = gateway(&g)?;
            (gw.clone(), Statement::Command(command(&gw, lock(&l)?, Operation::Lock, now, 30)))
        }
        AppCommand::Unlatch { gateway: g, lock: l } => {
            let gw = gateway(&g)?;
            (gw.clone(), Statement::Command(command(&gw, lock(&l)?, Operation::Unlatch, now, 30)))
        }
        AppCommand::Status { gateway: g } => {
            let gw = gateway(&g)?;
            let app = AppClient::connect(&broker, &pki, &gw).await?;
            let retained = app.retained(timeout).await?;
            let any = !retained.is_empty();
            for (topic, payload) in retained {
                if outln!("{topic} {}", String::from_utf8_lossy(&payload))? == Reader::Gone {
                    return Ok(());
                }
            }
            if !any {
                outln!("nothing retained for {gw}: it has never connected to this broker")?;
            }
            return Ok(());
        }
        AppCommand::Events { gateway: g, seconds } => {
            let gw = gateway(&g)?;
            let app = AppClient::connect(&broker, &pki, &gw).await?;
            let mut seen = app.watch();
            let until = seconds.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
            loop {
                let next = async {
                    match until {
                        Some(at) => tokio::time::timeout_at(at, seen.recv()).await.ok(),
                        None => Some(seen.recv().await),
                    }
                };
                tokio::select! {
                    msg = next => match msg {
                        Some(Ok(m)) => {
                            if outln!("{} {}", m.topic, String::from_utf8_lossy(&m.payload))? == Reader::Gone {
                                return Ok(());
                            }
                        }
                        Some(Err(tokio::sync::broadcast::error::RecvError::Lagged(n))) => lockhub::errln!("({n} messages skipped)"),
                        Some(Err(_)) => bail!("the connection to the broker ended"),
                        None => return Ok(()),
                    },
                    _ = tokio::signal::ctrl_c() => return Ok(()),
                }
            }
        }
    };
    let signer = AppKey::load(&dir, &key)?;
    let app = AppClient::connect(&broker, &pki, &gw).await?;
    let started = std::time::Instant::now();
    let reply = app.send(&statement, &signer, timeout).await?;
    lockhub::errln!("{} answered in {:.1} ms", statement.typ(), started.elapsed().as_secs_f64() * 1000.0);
    print_reply(&reply)
}
