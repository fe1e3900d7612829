//! `lockhub-cloud`: the bundled cloud for integration runs and the demo.
//!
//! - `pki init` creates a CA, a broker certificate for the local machine and client
//!   certificates (one per gateway, plus the relay); `pki issue` adds one.
//! - `serve` runs the broker (mutual TLS, per-gateway ACLs) with the event sink.
//! - `mosquitto-config` prints the equivalent Mosquitto configuration; `nats-config` one
//!   node's configuration of a NATS cluster serving the fleet over MQTT.
//!
//! - `app …` is the phone-app stand-in: keys in a directory, statements signed and sent,
//!   typed replies printed.

// Standard output and error go through `lockhub::standard_streams`: a reader gone is no panic.
#![deny(clippy::print_stdout, clippy::print_stderr)]

mod app;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lockhub::devcloud::broker::{Broker, BrokerConfig};
use lockhub::devcloud::mosquitto_config::MosquittoConfig;
use lockhub::devcloud::nats_config::NatsNode;
use lockhub::devcloud::pki::Pki;
use lockhub::outln;
use lockhub::protocol::ids::GatewayId;
use lockhub::standard_streams;
use tokio::sync::watch;

#[derive(Parser)]
#[command(name = "lockhub-cloud", version, about = "The bundled lockhub cloud (development and integration runs)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The development PKI.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Run the broker: mutual TLS with the PKI's CA, per-gateway topic ACLs, and the event
    /// sink. Prints `listening on <address>` once it accepts clients; stops on SIGTERM or
    /// Ctrl-C.
    Serve {
        /// Directory of an initialised PKI.
        #[arg(long)]
        pki: PathBuf,
        /// Address to listen on (port 0: any free port, printed).
        #[arg(long, default_value = "127.0.0.1:8883")]
        listen: SocketAddr,
        /// Directory for the event sink's database (created); without it, events are routed
        /// but not stored.
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// The phone-app stand-in: keygen, claim, pair, grant, revoke, policy, unlock / lock /
    /// unlatch, events.
    App(Box<app::AppArgs>),
    /// Print the equivalent Mosquitto configuration (TLS, use_identity_as_username, ACLs).
    MosquittoConfig {
        /// Directory of an initialised PKI (the paths printed point into it).
        #[arg(long)]
        pki: PathBuf,
        /// Port of the TLS listener.
        #[arg(long, default_value_t = 8883)]
        port: u16,
        /// Address the listener binds.
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
        /// Where the ACL file will be installed.
        #[arg(long, default_value = "/etc/mosquitto/lockhub/acl")]
        acl_file: PathBuf,
        /// Print the ACL file instead of mosquitto.conf.
        #[arg(long)]
        acl: bool,
    },
    /// Print the configuration of one node of a NATS cluster serving the fleet over MQTT
    /// (mutual TLS, a user per certificate, per-gateway permissions, JetStream replicas).
    NatsConfig {
        /// Directory of an initialised PKI (the paths printed point into it).
        #[arg(long)]
        pki: PathBuf,
        /// This node's name, unique in the cluster.
        #[arg(long)]
        name: String,
        /// Address the listeners bind.
        #[arg(long, default_value = "0.0.0.0")]
        bind: String,
        /// Port of the NATS protocol listener (nobody can authenticate on it: MQTT only).
        #[arg(long, default_value_t = 4222)]
        client_port: u16,
        /// Port of the cluster routes.
        #[arg(long, default_value_t = 6222)]
        cluster_port: u16,
        /// Port of the MQTT (TLS) listener.
        #[arg(long, default_value_t = 8883)]
        mqtt_port: u16,
        /// Another node's route, nats-route://host:port (repeatable).
        #[arg(long = "route")]
        routes: Vec<String>,
        /// JetStream's directory.
        #[arg(long, default_value = "/var/lib/nats/jetstream")]
        store_dir: PathBuf,
        /// A gateway allowed to connect (repeatable; its certificate's CN).
        #[arg(long = "gateway")]
        gateways: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create the CA and the broker certificate (kept if present) and client certificates.
    Init {
        /// Directory for the PKI (created; private keys are written mode 0600).
        #[arg(long)]
        dir: PathBuf,
        /// A gateway to issue a client certificate for (repeatable); its id is the certificate's CN.
        #[arg(long = "gateway")]
        gateways: Vec<String>,
    },
    /// Issue (or reissue) a client certificate whose CN is NAME.
    Issue {
        /// Directory of an initialised PKI.
        #[arg(long)]
        dir: PathBuf,
        /// The identity (a gateway id).
        name: String,
    },
}

fn main() -> std::process::ExitCode {
    lockhub::error_report::exit_code(run())
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve { pki, listen, data } => serve(pki, listen, data)?,
        Command::App(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(app::run(*args))?,
        Command::MosquittoConfig { pki, port, bind, acl_file, acl } => {
            let pki = open_pki(&pki)?;
            let config = MosquittoConfig::for_pki(&pki, &bind, port, acl_file);
            let text = if acl { config.render_acl() } else { config.render() };
            standard_streams::write_with(|out| out.write_all(text.as_bytes()))?;
        }
        Command::NatsConfig { pki, name, bind, client_port, cluster_port, mqtt_port, routes, store_dir, gateways } => {
            let pki = open_pki(&pki)?;
            let gateways = gateways
                .iter()
                .map(|g| GatewayId::new(g.as_str()).map_err(|e| anyhow::anyhow!("--gateway {g:?}: {e}")))
                .collect::<Result<Vec<_>>>()?;
            for route in &routes {
                if !route.starts_with("nats-route://") {
                    anyhow::bail!("--route {route:?}: expected nats-route://host:port");
                }
            }
            let node = NatsNode::for_pki(
                &pki,
                &name,
                &bind,
                (client_port, cluster_port, mqtt_port),
                routes,
                store_dir,
                gateways,
            );
            standard_streams::write_with(|out| out.write_all(node.render().as_bytes()))?;
        }
        Command::Pki(PkiCommand::Init { dir, gateways }) => {
            let names: Vec<&str> = gateways.iter().map(String::as_str).collect();
            let pki = Pki::init(&dir, &names).with_context(|| format!("creating the PKI in {}", dir.display()))?;
            outln!("CA certificate:     {}", pki.ca_cert().display())?;
            outln!("broker certificate: {}", pki.broker_cert().display())?;
            for name in &names {
                outln!("client {name}: {}", pki.client_cert(name).display())?;
            }
        }
        Command::Pki(PkiCommand::Issue { dir, name }) => {
            let pki = open_pki(&dir)?;
            pki.issue_client(&name).with_context(|| format!("issuing a certificate for {name}"))?;
            outln!("client {name}: {}", pki.client_cert(&name).display())?;
        }
    }
    Ok(())
}

fn open_pki(dir: &std::path::Path) -> Result<Pki> {
    let pki = Pki::open(dir);
    if !pki.ca_cert().exists() {
        anyhow::bail!("{} holds no PKI: run `lockhub-cloud pki init --dir {}` first", dir.display(), dir.display());
    }
    Ok(pki)
}

#[tokio::main]
async fn serve(pki: PathBuf, listen: SocketAddr, data: Option<PathBuf>) -> Result<()> {
    let pki = open_pki(&pki)?;
    let events_db = match data {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            Some(dir.join("events.db"))
        }
        None => None,
    };
    let broker = Broker::bind(BrokerConfig::from_pki(&pki, listen, events_db)).await?;
    // The harness and the demo read this line to learn the port.
    outln!("listening on {}", broker.local_addr())?;
    let (stop, stopped) = watch::channel(false);
    let server = tokio::spawn(broker.run(stopped));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stopping");
    let _ = stop.send(true);
    server.await?;
    Ok(())
}
