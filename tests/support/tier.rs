//! Test tiers: what a test needs from the machine beyond a Rust toolchain and a C compiler.
//!
//! A test that needs a tier starts with [`ready`] (or the `needs!` macro) and returns at once
//! when the machine lacks it: it passes without having run, and `tests/tiers.rs` prints one
//! summary of every tier skipped here and how to enable it. With `LOCKHUB_TEST_ALL=1` (as
//! `.ci/run` sets it) a missing tier fails the test instead, so CI skips nothing.

use std::path::{Path, PathBuf};

/// What a test may need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    /// Debian's `dbus-daemon`: the private bus the emulated locks serve `org.bluez` on.
    Dbus,
    /// Debian's Mosquitto, as the cloud's broker or the local one Home Assistant uses.
    Mosquitto,
    /// `nats-server`, for the clustered cloud.
    Nats,
    /// Root: another user's identity (`setpriv --reuid`), `chown`, mount namespaces.
    Root,
    /// `debootstrap`, `lintian`, `cargo-deb` and Debian's package mirror, as root: the .deb
    /// built, checked and installed in a fresh root.
    Debootstrap,
    /// qemu and the tools that build its guest, as root: the real Linux Bluetooth stack.
    Guest,
    /// Python 3.13, and PyPI once: a real Home Assistant core (`support::ha_core`).
    HomeAssistant,
}

/// Every tier, in the order the summary lists them.
pub const ALL: [Tier; 7] =
    [Tier::Dbus, Tier::Mosquitto, Tier::Nats, Tier::HomeAssistant, Tier::Root, Tier::Debootstrap, Tier::Guest];

/// Where a program is, looking in `PATH` and in the system's sbin directories (which a
/// non-root user's `PATH` often leaves out, and where Debian puts `mosquitto`).
pub fn program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    lockhub::control::peer::own_uid() == 0
}

impl Tier {
    /// Its name in the summary.
    pub fn name(self) -> &'static str {
        match self {
            Tier::Dbus => "dbus",
            Tier::Mosquitto => "mosquitto",
            Tier::Nats => "nats",
            Tier::Root => "root",
            Tier::Debootstrap => "package",
            Tier::Guest => "real-bluez",
            Tier::HomeAssistant => "home-assistant",
        }
    }

    /// What this machine lacks for it, if anything.
    pub fn missing(self) -> Option<String> {
        let programs: &[&str] = match self {
            Tier::Dbus => &["dbus-daemon"],
            Tier::Mosquitto => &["mosquitto"],
            Tier::Nats => &["nats-server"],
            Tier::Root => &[],
            Tier::Debootstrap => &["debootstrap", "lintian", "cargo-deb"],
            Tier::Guest => &["qemu-system-x86_64", "debootstrap", "depmod", "cpio"],
            Tier::HomeAssistant => &[],
        };
        let mut lacking: Vec<String> =
            programs.iter().filter(|p| program(p).is_none()).map(|p| p.to_string()).collect();
        if self == Tier::HomeAssistant && super::ha_core::python().is_none() {
            lacking.push("Python 3.13".into());
        }
        if matches!(self, Tier::Root | Tier::Debootstrap | Tier::Guest) && !is_root() {
            lacking.push("root".into());
        }
        (!lacking.is_empty()).then(|| lacking.join(", "))
    }

    /// How to enable it.
    pub fn enable(self) -> &'static str {
        match self {
            Tier::Dbus => "apt-get install dbus",
            Tier::Mosquitto => "apt-get install mosquitto",
            Tier::Nats => "apt-get install nats-server",
            Tier::Root => "run the tests as root",
            Tier::Debootstrap => {
                "apt-get install debootstrap lintian and cargo install cargo-deb, as root, with Debian's mirror reachable"
            }
            Tier::Guest => "apt-get install qemu-system-x86 debootstrap kmod cpio, as root",
            Tier::HomeAssistant => "python3.13 on PATH or under ~/.pyenv, and PyPI reachable the first time",
        }
    }
}

/// Whether a missing tier is a failure rather than a skip (`LOCKHUB_TEST_ALL=1`).
pub fn all_required() -> bool {
    std::env::var("LOCKHUB_TEST_ALL").is_ok_and(|v| v == "1")
}

/// Whether the machine has every tier in `tiers`. When it does not, the caller returns (the
/// test is skipped; `tests/tiers.rs` says so), unless `LOCKHUB_TEST_ALL=1`, which fails here.
pub fn ready(tiers: &[Tier]) -> bool {
    let lacking: Vec<String> =
        tiers.iter().filter_map(|t| t.missing().map(|m| format!("{} (lacks {m}: {})", t.name(), t.enable()))).collect();
    if lacking.is_empty() {
        return true;
    }
    assert!(!all_required(), "LOCKHUB_TEST_ALL=1, and this machine cannot run tier {}", lacking.join("; "));
    false
}

/// Returns from the test unless the machine has every tier named: `needs!(Dbus, Root);`.
#[macro_export]
macro_rules! needs {
    ($($tier:ident),+) => {
        if !$crate::support::tier::ready(&[$($crate::support::tier::Tier::$tier),+]) {
            return;
        }
    };
}
