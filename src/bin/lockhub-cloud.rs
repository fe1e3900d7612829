//! `lockhub-cloud`: the bundled cloud for integration runs and the demo.
//!
//! So far the development PKI: `pki init` creates a CA, a broker certificate for the local
//! machine and client certificates (one per gateway, plus the relay); `pki issue` adds one.
//! The broker with per-gateway ACLs, the relay and the phone-app stand-in come next.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lockhub::devcloud::pki::Pki;

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

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Pki(PkiCommand::Init { dir, gateways }) => {
            let names: Vec<&str> = gateways.iter().map(String::as_str).collect();
            let pki = Pki::init(&dir, &names).with_context(|| format!("creating the PKI in {}", dir.display()))?;
            println!("CA certificate:     {}", pki.ca_cert().display());
            println!("broker certificate: {}", pki.broker_cert().display());
            for name in &names {
                println!("client {name}: {}", pki.client_cert(name).display());
            }
        }
        Command::Pki(PkiCommand::Issue { dir, name }) => {
            let pki = Pki::open(&dir);
            if !pki.ca_cert().exists() {
                anyhow::bail!(
                    "{} holds no PKI: run `lockhub-cloud pki init --dir {}` first",
                    dir.display(),
                    dir.display()
                );
            }
            pki.issue_client(&name).with_context(|| format!("issuing a certificate for {name}"))?;
            println!("client {name}: {}", pki.client_cert(&name).display());
        }
    }
    Ok(())
}
