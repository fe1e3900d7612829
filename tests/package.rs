//! The Debian package as an owner meets it. `packaging/build-deb amd64` builds it (and fails
//! on any lintian error or warning); it is installed with apt into a fresh Debian bookworm
//! root made by debootstrap, checked — files, modes, conffile, user and groups, unit enabled
//! —, run — `lockhub --version`, `lockhub check-config` on the shipped configuration, then as
//! the daemon's user once certificates are provisioned —, and purged, after which the root's
//! file tree is exactly what it was before the install.
//!
//! Needs root (for chroot), debootstrap, cargo-deb, lintian and a Debian mirror; `.ci/run`
//! installs the tools.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

const MIRROR: &str = "http://deb.debian.org/debian";

fn check(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The amd64 package, built once per test run.
fn package() -> &'static Path {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(root.join("packaging/build-deb")).arg("amd64").current_dir(root).output().unwrap();
        let log = check("packaging/build-deb amd64", out);
        assert!(log.contains("lintian: clean"), "{log}");
        let built = log.lines().find_map(|l| l.strip_prefix("built ")).expect("the script names the package");
        root.join(built.split(' ').next().unwrap())
    })
}

/// A Debian bookworm root, with the package's dependencies installed.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Root {
        let dir = tempfile::Builder::new().prefix("lockhub-deb-").tempdir().unwrap();
        let base = base_image();
        check(
            "unpacking the base root",
            Command::new("tar").arg("-xzf").arg(base).arg("-C").arg(dir.path()).output().unwrap(),
        );
        std::fs::copy("/etc/resolv.conf", dir.path().join("etc/resolv.conf")).unwrap();
        let root = Root { dir };
        // No service starts inside the test root.
        root.sh("printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d");
        root.sh("apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -qq --no-install-recommends systemd dbus bluez procps");
        root
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p.trim_start_matches('/'))
    }

    /// Runs `script` inside the root (with /proc, in a mount namespace that dies with it).
    fn try_sh(&self, script: &str) -> Output {
        Command::new("unshare")
            .args([
                "--mount",
                "--fork",
                "sh",
                "-c",
                r#"mount -t proc proc "$1/proc" && exec chroot "$1" /bin/sh -c "$2""#,
                "sh",
            ])
            .arg(self.dir.path())
            .arg(script)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C")
            .output()
            .unwrap()
    }

    fn sh(&self, script: &str) -> String {
        check(script, self.try_sh(script))
    }

    /// Every file's path, mode and owner, but for the package manager's own bookkeeping and
    /// /run (a tmpfs on a real system; `systemd-analyze verify` leaves a file there).
    fn tree(&self) -> Vec<String> {
        let listing = self
            .sh("find / -xdev \\( -path /var/lib/dpkg -o -path /var/lib/apt -o -path /var/cache -o -path /var/log \
             -o -path /tmp -o -path /run -o -path /etc/ld.so.cache \\) -prune -o -printf '%p %m %u:%g\\n'");
        let mut lines: Vec<String> = listing.lines().map(str::to_owned).collect();
        lines.sort();
        lines
    }
}

/// debootstrap's minimal bookworm, made once and kept (as a tarball) under target/.
fn base_image() -> &'static Path {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bookworm-minbase.tar.gz");
        if !cache.exists() {
            let work = tempfile::tempdir().unwrap();
            let root = work.path().join("root");
            check(
                "debootstrap",
                Command::new("debootstrap")
                    .args(["--variant=minbase", "bookworm"])
                    .arg(&root)
                    .arg(MIRROR)
                    .output()
                    .expect("debootstrap is not installed (.ci/run installs it)"),
            );
            let partial = cache.with_extension("partial");
            check(
                "packing the base root",
                Command::new("tar").arg("-czf").arg(&partial).arg("-C").arg(&root).arg(".").output().unwrap(),
            );
            std::fs::rename(&partial, &cache).unwrap();
        }
        cache
    })
}

#[test]
fn the_package_installs_runs_as_its_user_and_purges_to_nothing() {
    crate::needs!(Debootstrap);
    let deb = package();
    let root = Root::new();
    let before = root.tree();

    std::fs::copy(deb, root.path("/tmp/lockhub.deb")).unwrap();
    root.sh("DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends /tmp/lockhub.deb");

    // Files and modes.
    let stat = |p: &str| root.sh(&format!("stat -c '%a %U:%G' {p}")).trim().to_owned();
    assert_eq!(stat("/usr/bin/lockhub"), "755 root:root");
    assert_eq!(stat("/etc/lockhub"), "750 root:lockhub");
    assert_eq!(stat("/etc/lockhub/lockhub.toml"), "644 root:root");
    assert_eq!(stat("/usr/lib/sysusers.d/lockhub.conf"), "644 root:root");
    assert_eq!(stat("/usr/share/man/man1/lockhub.1.gz"), "644 root:root");
    assert_eq!(stat("/usr/share/bash-completion/completions/lockhub"), "644 root:root");
    assert_eq!(stat("/usr/share/doc/lockhub/copyright"), "644 root:root");
    let unit = root.sh("dpkg -L lockhub | grep '/systemd/system/lockhub.service$'").trim().to_owned();
    assert_eq!(stat(&unit), "644 root:root");
    let conffiles = root.sh("dpkg-query -W -f='${Conffiles}' lockhub");
    assert!(conffiles.contains("/etc/lockhub/lockhub.toml"), "{conffiles}");
    // Enabled at boot.
    assert!(root.path("/etc/systemd/system/multi-user.target.wants/lockhub.service").is_symlink());
    // The unit as systemd reads it.
    root.sh(&format!("systemd-analyze verify --man=no {unit}"));
    // Its exposure stays at most 1.5 (1.4 today), and a leak or a flood meets a wall.
    root.sh(&format!("systemd-analyze security --offline=true --threshold=15 {unit}"));
    let text = root.sh(&format!("cat {unit}"));
    for directive in ["MemoryMax=128M", "TasksMax=48"] {
        assert!(text.lines().any(|l| l == directive), "the unit lacks {directive}");
    }

    // The user, without a login, and the groups.
    let user = root.sh("getent passwd lockhub");
    let fields: Vec<&str> = user.trim().split(':').collect();
    assert!(fields[2].parse::<u32>().unwrap() < 1000, "a system user: {user}");
    assert_eq!((fields[5], fields[6]), ("/var/lib/lockhub", "/usr/sbin/nologin"), "{user}");
    let admin = root.sh("getent group lockhub-admin");
    assert!(admin.trim().ends_with(":lockhub"), "the daemon hands its socket to this group: {admin}");
    root.sh("getent group bluetooth");

    // It runs, and says what the shipped configuration still needs.
    assert_eq!(root.sh("lockhub --version").trim(), format!("lockhub {}", env!("CARGO_PKG_VERSION")));
    let out = root.try_sh("lockhub check-config");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("/etc/lockhub/lockhub.toml: cloud.ca = /etc/lockhub/cloud-ca.pem: no such file: fix the path, or put the file there"),
        "{err}"
    );
    // Provisioned as the owner would (key 0640 root:lockhub), the daemon's user reads it all.
    let pki = tempfile::tempdir().unwrap();
    let pki = lockhub::devcloud::pki::Pki::init(pki.path(), &["gw-1"]).unwrap();
    std::fs::copy(pki.ca_cert(), root.path("/etc/lockhub/cloud-ca.pem")).unwrap();
    std::fs::copy(pki.client_cert("gw-1"), root.path("/etc/lockhub/gateway.pem")).unwrap();
    std::fs::copy(pki.client_key("gw-1"), root.path("/etc/lockhub/gateway.key")).unwrap();
    root.sh("chown root:lockhub /etc/lockhub/gateway.key && chmod 0640 /etc/lockhub/gateway.key");
    let ok = root.sh("runuser -u lockhub -- lockhub check-config");
    assert_eq!(ok.trim(), "/etc/lockhub/lockhub.toml: ok (gateway gw-1, 1 broker(s))");
    // State as the unit's StateDirectory= leaves it.
    root.sh("install -d -m 0700 -o lockhub -g lockhub /var/lib/lockhub && touch /var/lib/lockhub/store.db");

    // Purged: nothing of it is left.
    root.sh("DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq lockhub");
    assert!(!root.try_sh("getent passwd lockhub").status.success(), "the user is left");
    assert!(!root.try_sh("getent group lockhub-admin").status.success(), "the admin group is left");
    assert!(!root.try_sh("getent group lockhub").status.success(), "the group is left");
    let after = root.tree();
    let added: Vec<&String> = after.iter().filter(|l| !before.contains(l)).collect();
    let removed: Vec<&String> = before.iter().filter(|l| !after.contains(l)).collect();
    assert!(added.is_empty() && removed.is_empty(), "left behind: {added:#?}\nremoved: {removed:#?}");
}
