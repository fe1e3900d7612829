//! `lockhub-lock`: emulated LHP/1 lock firmware, as a program.
//!
//! `serve` hosts locks behind a fake `org.bluez` on a D-Bus bus, so the gateway's real BlueZ
//! code can talk to them on a machine without Bluetooth. `peripheral` runs one lock as a real
//! BLE peripheral on a hardware adapter, so a second board can stand in for a lock.

// Standard output and error go through `lockhub::standard_streams`: a reader gone is no panic.
#![deny(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use lockhub::firmware::bluez::{BluezEmulator, LockSpec};
use tokio::io::AsyncReadExt;

#[derive(Parser)]
#[command(name = "lockhub-lock", version, about = "Emulated LHP/1 lock firmware")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve emulated locks behind a fake org.bluez on a D-Bus bus.
    Serve {
        /// D-Bus address of the bus to serve on (default: $DBUS_SYSTEM_BUS_ADDRESS).
        #[arg(long)]
        bus: Option<String>,
        /// Directory keeping each lock's flash, so pairings survive restarts.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Locks to create when the state directory holds none.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=256))]
        locks: u16,
        /// ATT MTU of each created lock, cycled over the locks (e.g. 23,247).
        #[arg(long, value_delimiter = ',', default_value = "247")]
        mtu: Vec<u16>,
        /// Motor time of created locks, in ms.
        #[arg(long, default_value_t = 400)]
        motor_ms: u64,
        /// Exit when standard input closes (lets a parent process reap us by exiting).
        #[arg(long)]
        exit_with_stdin: bool,
    },
    /// Run one lock as a real BLE peripheral on a hardware adapter (needs BlueZ and a radio).
    Peripheral {
        /// Adapter to use (default: the first powered one).
        #[arg(long)]
        adapter: Option<String>,
        /// Directory keeping the lock's flash.
        #[arg(long)]
        state_dir: PathBuf,
        /// Registers the advertisement anew this often (ms) while no central is connected:
        /// for emulated controllers (btvirt) that report an advertisement only when it
        /// starts. A real radio needs none.
        #[arg(long, value_parser = clap::value_parser!(u64).range(100..=600_000))]
        refresh_advertising_ms: Option<u64>,
        /// Motor time of a lock made now, in ms (a lock read from its state directory keeps
        /// its own).
        #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u64).range(0..=60_000))]
        motor_ms: u64,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    lockhub::error_report::exit_code(run().await)
}

async fn run() -> Result<()> {
    let log = lockhub::log_filter::choose("info");
    tracing_subscriber::fmt().with_env_filter(log.filter).with_writer(std::io::stderr).init();
    if let Some(warning) = log.warning {
        tracing::warn!("{warning}");
    }
    match Cli::parse().command {
        Command::Serve { bus, state_dir, locks, mtu, motor_ms, exit_with_stdin } => {
            serve(bus, state_dir, locks, mtu, motor_ms, exit_with_stdin).await
        }
        Command::Peripheral { adapter, state_dir, refresh_advertising_ms, motor_ms } => {
            let refresh = refresh_advertising_ms.map(std::time::Duration::from_millis);
            lockhub::firmware::peripheral::run(adapter.as_deref(), &state_dir, refresh, motor_ms)
                .await
                .context("peripheral")
        }
    }
}

async fn serve(
    bus: Option<String>,
    state_dir: Option<PathBuf>,
    locks: u16,
    mtu: Vec<u16>,
    motor_ms: u64,
    exit_with_stdin: bool,
) -> Result<()> {
    let bus = match bus.or_else(|| std::env::var("DBUS_SYSTEM_BUS_ADDRESS").ok()) {
        Some(b) => b,
        None => bail!("no bus: pass --bus ADDRESS or set DBUS_SYSTEM_BUS_ADDRESS (never the real system bus's BlueZ)"),
    };
    if let Some(bad) = mtu.iter().find(|m| !(23..=517).contains(*m)) {
        bail!("--mtu {bad}: an ATT MTU is 23 to 517");
    }
    let emulator = BluezEmulator::serve(&bus, state_dir).await.with_context(|| format!("serving on {bus}"))?;
    let mut ids = emulator.restore().await.context("restoring locks")?;
    if ids.is_empty() {
        for i in 0..locks {
            let lock_id = format!("4c48{:012x}", u64::from(i) + 1);
            let spec = LockSpec { lock_id, mtu: mtu[usize::from(i) % mtu.len()], motor_ms, ..LockSpec::default() };
            ids.push(emulator.add_lock(spec).await?);
        }
    }
    let ids: Vec<String> = ids.iter().map(ToString::to_string).collect();
    // One line on stdout, flushed: what a parent process waits for.
    lockhub::outln!("READY bus={bus} locks={}", ids.join(","))?;
    tracing::info!(locks = ids.len(), "serving emulated locks as org.bluez");
    let stdin_closed = async {
        if exit_with_stdin {
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
        } else {
            std::future::pending::<()>().await;
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
        () = stdin_closed => {}
    }
    tracing::info!("saving lock state and stopping");
    emulator.shutdown().await;
    Ok(())
}
