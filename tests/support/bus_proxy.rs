//! A bus connection that goes silent without closing: a relay between this process's D-Bus
//! clients and the test bus that forwards bytes and the file descriptors they carry (BlueZ
//! hands GATT sockets over the bus), and that can be told to wedge every connection it holds
//! while later connections still go through, or to wedge each connection that makes a given
//! call (so that a new connection sets up and then wedges too). A client then sees what a
//! wedged bus looks like from inside: the socket open, calls sent, no answer ever.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// The relay; its listening socket lives in a temporary directory of its own.
pub struct BusProxy {
    /// The address to give D-Bus clients (`unix:path=…`).
    pub address: String,
    /// Connections numbered below this forward nothing.
    wedged_below: Arc<AtomicU64>,
    /// A connection whose client sends a message naming this (a method's name and its NUL,
    /// as the message header carries it) forwards nothing from then on.
    wedging_call: Arc<OnceLock<Vec<u8>>>,
    accepted: Arc<AtomicU64>,
    _dir: tempfile::TempDir,
}

impl BusProxy {
    /// Relays to the bus at `bus` (a `unix:path=…` address).
    pub fn start(bus: &str) -> BusProxy {
        let target = PathBuf::from(bus.strip_prefix("unix:path=").expect("a unix:path= bus address"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus");
        let listener = UnixListener::bind(&path).unwrap();
        let (wedged_below, accepted) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let wedging_call: Arc<OnceLock<Vec<u8>>> = Arc::default();
        let (w, a, c) = (wedged_below.clone(), accepted.clone(), wedging_call.clone());
        // Lives as long as the test process, as the bus it fronts does.
        std::thread::Builder::new()
            .name("bus-proxy".into())
            .spawn(move || {
                for client in listener.incoming() {
                    let Ok(client) = client else { continue };
                    let number = a.fetch_add(1, Ordering::SeqCst);
                    let Ok(bus) = UnixStream::connect(&target) else { continue };
                    relay(client, bus, Wedges { number, below: w.clone(), call: c.clone(), this: Arc::default() });
                }
            })
            .unwrap();
        BusProxy { address: format!("unix:path={}", path.display()), wedged_below, wedging_call, accepted, _dir: dir }
    }

    /// From now on, the connections accepted so far forward nothing either way (and stay
    /// open); later ones work.
    pub fn wedge(&self) {
        self.wedged_below.store(self.accepted.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    /// From now on, each connection (open or new) wedges once its client calls `method`: a new
    /// connection sets up, and wedges at that call as the old one did. Once per relay.
    pub fn wedge_on_call(&self, method: &str) {
        let mut marker = method.as_bytes().to_vec();
        marker.push(0);
        self.wedging_call.set(marker).expect("one wedging call per relay");
    }

    /// How many connections clients have opened through the relay.
    pub fn connections(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// What wedges one connection.
#[derive(Clone)]
struct Wedges {
    /// The connection's number.
    number: u64,
    /// Connections numbered below this are wedged.
    below: Arc<AtomicU64>,
    /// The call that wedges a connection, once set.
    call: Arc<OnceLock<Vec<u8>>>,
    /// This connection made that call.
    this: Arc<AtomicBool>,
}

impl Wedges {
    fn wedged(&self) -> bool {
        self.number < self.below.load(Ordering::SeqCst) || self.this.load(Ordering::SeqCst)
    }
}

/// Both directions of one connection, a thread each; each ends when its side closes.
fn relay(client: UnixStream, bus: UnixStream, wedges: Wedges) {
    let (client2, bus2) = (client.try_clone().unwrap(), bus.try_clone().unwrap());
    let w = wedges.clone();
    std::thread::spawn(move || pump(&client, &bus, &w, true));
    std::thread::spawn(move || pump(&bus2, &client2, &wedges, false));
}

fn pump(from: &UnixStream, to: &UnixStream, wedges: &Wedges, from_client: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, fds) = match receive(from.as_fd().as_raw_fd(), &mut buf) {
            Ok((0, _)) | Err(_) => break,
            Ok(got) => got,
        };
        // A client's message is written whole, so its header is within one read.
        if from_client
            && let Some(call) = wedges.call.get()
            && buf[..n].windows(call.len()).any(|w| w == call.as_slice())
        {
            wedges.this.store(true, Ordering::SeqCst);
        }
        if wedges.wedged() {
            continue; // dropped, descriptors closed with `fds`
        }
        if send_all(to.as_fd().as_raw_fd(), &buf[..n], &fds).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

/// One read, with the descriptors that came with it (owned: closed when dropped).
fn receive(fd: RawFd, buf: &mut [u8]) -> nix::Result<(usize, Vec<OwnedFd>)> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 32]);
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just created these descriptors for this process.
            fds.extend(received.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    Ok((msg.bytes, fds))
}

/// Writes `data`, the descriptors with its first bytes.
fn send_all(fd: RawFd, mut data: &[u8], fds: &[OwnedFd]) -> nix::Result<()> {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut first = true;
    while !data.is_empty() {
        let rights = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage] = if first && !raw.is_empty() { &rights } else { &[] };
        let sent = sendmsg::<()>(fd, &[IoSlice::new(data)], cmsgs, MsgFlags::empty(), None)?;
        data = &data[sent..];
        first = false;
    }
    Ok(())
}
