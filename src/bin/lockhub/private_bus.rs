//! The demo's private D-Bus bus, where the emulated locks serve `org.bluez` and the gateway's
//! bluer finds them: Debian's `dbus-daemon` when it is installed (the bus daemon BlueZ meets on a
//! real hub), else busd, a message bus run inside this process, so that the demo needs nothing
//! installed. Either listens on a socket in the run's temporary directory only, and stops with
//! the run, however it ends.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::channel::oneshot;

/// The bus configuration given to dbus-daemon: only this user's processes reach it.
const DAEMON_CONFIG: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <auth>EXTERNAL</auth>
  <listen>unix:tmpdir=/tmp</listen>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"#;

/// How long dbus-daemon may take to print its address (it does once it listens).
const DAEMON_READY: Duration = Duration::from_secs(5);

/// A running private bus; stopped when dropped.
pub struct PrivateBus {
    /// The address clients connect to (`unix:path=…`).
    pub address: String,
    runner: Runner,
}

enum Runner {
    /// Debian's dbus-daemon, a child process.
    Daemon(Child),
    /// busd on a thread of this process, until `stop` fires.
    Embedded { stop: Option<oneshot::Sender<()>>, thread: Option<JoinHandle<()>> },
}

impl PrivateBus {
    /// The address the bus in `dir` will listen on: known before it starts, so that it can be
    /// put in the environment while this process has a single thread (libdbus reads it there).
    pub fn address_in(dir: &Path) -> String {
        format!("unix:path={}", Self::socket_in(dir).display())
    }

    /// Why a bus in `dir` could not be reached, if it could not: its socket's path must fit a
    /// Unix socket address, and the path must not need escaping in a D-Bus address — libdbus
    /// and dbus-daemon decode `%xx`, zbus (the emulated locks, busd) takes it literally, so no
    /// one spelling of a path with a space, a comma or an `=` reaches all three.
    pub fn unusable_in(dir: &Path) -> Option<String> {
        use std::os::unix::ffi::OsStrExt;
        let socket = Self::socket_in(dir);
        let bytes = socket.as_os_str().as_bytes();
        if let Some(&odd) = bytes.iter().find(|b| !(b.is_ascii_alphanumeric() || b"-_/.".contains(b))) {
            let shown = if odd.is_ascii_graphic() || odd == b' ' {
                format!("{:?}", char::from(odd))
            } else {
                format!("byte {odd:#04x}")
            };
            return Some(format!("its path holds {shown}, which a D-Bus address would have to escape"));
        }
        if bytes.len() > MAX_SOCKET_PATH {
            return Some(format!(
                "its socket's path would be {} bytes, more than a Unix socket's {MAX_SOCKET_PATH}",
                bytes.len()
            ));
        }
        None
    }

    /// The socket behind [`PrivateBus::address_in`] `dir`.
    fn socket_in(dir: &Path) -> PathBuf {
        dir.join("bus")
    }

    /// Starts the bus on [`PrivateBus::address_in`] `dir`; returns once it accepts connections.
    /// Says on standard output why it is not dbus-daemon, when it is not.
    pub fn start(dir: &Path) -> Result<PrivateBus> {
        if let Some(why) = Self::unusable_in(dir) {
            bail!("the private bus cannot listen in {}: {why}", dir.display());
        }
        let address = Self::address_in(dir);
        let runner = match find_program("dbus-daemon") {
            Some(daemon) => match start_daemon(&daemon, dir, &address) {
                Ok(child) => Runner::Daemon(child),
                Err(e) => {
                    lockhub::outln!(
                        "lockhub demo: {} did not start ({e:#}), so the private bus is busd, run inside this process.",
                        daemon.display()
                    )?;
                    // What it may have left on the socket's path.
                    let _ = std::fs::remove_file(Self::socket_in(dir));
                    start_embedded(&address)?
                }
            },
            None => {
                lockhub::outln!(
                    "lockhub demo: dbus-daemon is not installed here, so the private bus is busd, run inside this \
                     process (install dbus, e.g. `sudo apt install dbus`, to run it on the daemon BlueZ uses)."
                )?;
                start_embedded(&address)?
            }
        };
        Ok(PrivateBus { address, runner })
    }

    /// Which bus this is, for the transcript.
    pub fn kind(&self) -> &'static str {
        match self.runner {
            Runner::Daemon(_) => "dbus-daemon",
            Runner::Embedded { .. } => "busd, inside this process",
        }
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        match &mut self.runner {
            Runner::Daemon(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Runner::Embedded { stop, thread } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                if let Some(thread) = thread.take() {
                    let _ = thread.join();
                }
            }
        }
    }
}

/// The longest path a Unix socket may be bound to: `sun_path` holds 108 bytes, its last the
/// terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

fn find_program(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

fn start_daemon(daemon: &Path, dir: &Path, address: &str) -> Result<Child> {
    let config = dir.join("bus.conf");
    std::fs::write(&config, DAEMON_CONFIG).context("writing the bus configuration")?;
    // Under `setpriv --pdeathsig` where util-linux has it: the bus dies with the demo, however
    // the demo ends.
    let mut command = match find_program("setpriv") {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(daemon);
            c
        }
        None => Command::new(daemon),
    };
    let mut child = command
        .arg("--config-file")
        .arg(&config)
        .args(["--address", address, "--nofork", "--print-address"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Its warnings (fd limits when run as root) are not the demo's business.
        .stderr(Stdio::null())
        .spawn()
        .context("starting dbus-daemon")?;
    // It prints its address once it listens; read on a thread of its own, so that a daemon
    // that never does is given up on (killing it ends the read).
    let stdout = child.stdout.take().expect("piped");
    let (line_tx, line) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("dbus-daemon-ready".into())
        .spawn(move || {
            let mut line = String::new();
            let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
            let _ = line_tx.send(read);
        })
        .context("starting a thread to wait for dbus-daemon")?;
    let failure = match line.recv_timeout(DAEMON_READY) {
        Ok(Ok(line)) if !line.trim().is_empty() => return Ok(child),
        Ok(Ok(_)) => anyhow!("dbus-daemon exited before it was ready"),
        Ok(Err(e)) => anyhow!("reading dbus-daemon's address: {e}"),
        Err(_) => anyhow!("dbus-daemon did not say it was ready within {DAEMON_READY:?}"),
    };
    let _ = child.kill();
    let _ = child.wait();
    Err(failure)
}

/// busd runs on its own runtime (zruntime), driven by the thread that blocks on it: a thread of
/// its own here, beside the demo's tokio runtime.
fn start_embedded(address: &str) -> Result<Runner> {
    let (ready_tx, ready) = std::sync::mpsc::channel::<Result<()>>();
    let (stop, stopped) = oneshot::channel::<()>();
    let address = address.to_owned();
    let thread = std::thread::Builder::new()
        .name("private-bus".into())
        .spawn(move || {
            zruntime::block_on(async move {
                let mut bus = match busd::bus::Bus::for_address(Some(&address)).await {
                    Ok(bus) => bus,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                {
                    let running = std::pin::pin!(bus.run());
                    if let futures::future::Either::Left((Err(e), _)) = futures::future::select(running, stopped).await
                    {
                        lockhub::errln!("lockhub demo: the embedded bus stopped: {e:#}");
                    }
                }
                let _ = bus.cleanup().await;
            });
        })
        .context("starting the embedded bus's thread")?;
    match ready.recv() {
        Ok(Ok(())) => Ok(Runner::Embedded { stop: Some(stop), thread: Some(thread) }),
        Ok(Err(e)) => Err(e.context("starting the embedded bus (busd)")),
        Err(_) => Err(anyhow!("the embedded bus's thread ended before it was ready")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_usable_when_its_socket_path_is_plain_and_short_enough() {
        assert_eq!(PrivateBus::unusable_in(Path::new("/tmp/lockhub-demo-42")), None);
        let why = PrivateBus::unusable_in(Path::new("/tmp/my dir/lockhub-demo-42")).unwrap();
        assert!(why.contains("' '"), "{why}");
        let why = PrivateBus::unusable_in(Path::new("/tmp/a,b=c")).unwrap();
        assert!(why.contains("','"), "{why}");
        let why = PrivateBus::unusable_in(Path::new("/tmp/caf\u{e9}")).unwrap();
        assert!(why.contains("byte 0xc3"), "{why}");
        // 107 bytes with "/bus" is the most a socket's path may be.
        let longest = format!("/{}", "d".repeat(MAX_SOCKET_PATH - "/bus".len() - 1));
        assert_eq!(PrivateBus::unusable_in(Path::new(&longest)), None);
        let why = PrivateBus::unusable_in(Path::new(&format!("{longest}d"))).unwrap();
        assert!(why.contains("108 bytes"), "{why}");
    }
}
