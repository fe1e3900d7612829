//! A throw-away Debian virtual machine with the real Linux Bluetooth stack: Debian's kernel
//! (modules `bluetooth`, `hci_vhci`), Debian's bluetoothd and `btvirt` (virtual LE
//! controllers linked by one virtual air), booted under qemu.
//!
//! The guest's root is a debootstrap'd Debian bookworm, made once and kept under `target/`
//! keyed by the kernel and BlueZ package versions (about a minute to make). It is shared into
//! the guest read-only over 9p with a tmpfs on top, so a run changes nothing in it. The
//! project's directory and its target directory are shared read-only at the same paths, so
//! the test binary and the binaries it starts (`env!("CARGO_BIN_EXE_…")`) run unchanged in
//! the guest. A small init loads the modules, mounts everything, starts the system bus and
//! runs one command; its output is the serial console, read here line by line.
//!
//! Needs root (debootstrap), `qemu-system-x86_64`, `debootstrap`, `depmod` (kmod), `cpio` and
//! Debian's package mirror; `.ci/run` installs the tools. `/dev/kvm` is used only when
//! `LOCKHUB_GUEST_ACCEL=kvm` says so: the sandboxes this project runs in have a KVM that
//! cannot boot Debian's kernel, so the default is software emulation (TCG).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const MIRROR: &str = "http://deb.debian.org/debian";
const SUITE: &str = "bookworm";
/// Packages of the guest beyond debootstrap's minimal base.
const PACKAGES: &str = "dbus,bluez,bluez-test-tools,kmod,iproute2,busybox-static";
/// Bumped when the way the image is made changes, so that old caches are not reused.
const RECIPE: u32 = 1;
/// Kernel modules the first stage loads to reach its root over 9p, in load order.
const BOOT_MODULES: &[&str] = &[
    "fs/netfs/netfs",
    "fs/fscache/fscache",
    "net/9p/9pnet",
    "fs/9p/9p",
    "drivers/virtio/virtio_ring",
    "drivers/virtio/virtio",
    "drivers/virtio/virtio_pci_legacy_dev",
    "drivers/virtio/virtio_pci_modern_dev",
    "drivers/virtio/virtio_pci",
    "net/9p/9pnet_virtio",
    "fs/overlayfs/overlay",
];
/// Module trees the guest's root gets (Bluetooth and what it needs).
const GUEST_MODULE_TREES: &[&str] =
    &["kernel/net/bluetooth", "kernel/drivers/bluetooth", "kernel/crypto", "kernel/lib", "kernel/net/rfkill"];

/// What this machine lacks for the tier, in one sentence, or nothing.
pub fn missing_tools() -> Option<String> {
    let mut missing = Vec::new();
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (debootstrap makes the guest's root)".to_owned());
    }
    for (tool, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("debootstrap", "debootstrap"),
        ("depmod", "kmod"),
        ("cpio", "cpio"),
        ("apt-get", "apt"),
        ("dpkg-deb", "dpkg"),
    ] {
        if !on_path(tool) {
            missing.push(format!("{tool} (package {package})"));
        }
    }
    (!missing.is_empty()).then(|| missing.join(", "))
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

fn run(what: &str, command: &mut Command) -> String {
    let out = command.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The guest's kernel and root, ready to boot.
pub struct Image {
    dir: PathBuf,
}

impl Image {
    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// The image for the current package versions: the cached one, or made now (printing
    /// what it does on standard error).
    pub fn prepare() -> Image {
        let (kernel_package, key) = versions();
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest");
        let dir = cache.join(&key);
        if dir.join("ready").exists() {
            return Image { dir };
        }
        std::fs::create_dir_all(&cache).unwrap();
        // Images of older versions are of no more use, and 300 MB each.
        for old in std::fs::read_dir(&cache).unwrap().flatten() {
            let _ = std::fs::remove_dir_all(old.path());
        }
        let started = Instant::now();
        let partial = cache.join(format!("{key}.partial"));
        std::fs::create_dir_all(&partial).unwrap();
        let root = partial.join("root");
        eprintln!("guest image: debootstrap {SUITE} with {PACKAGES} (about a minute, once)");
        run(
            "debootstrap",
            Command::new("debootstrap")
                .args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
                .arg(&root)
                .arg(MIRROR),
        );
        eprintln!("guest image: kernel {kernel_package}");
        run("apt-get download", Command::new("apt-get").args(["download", &kernel_package]).current_dir(&partial));
        let deb = std::fs::read_dir(&partial)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .expect("apt-get download leaves the .deb");
        let unpacked = partial.join("kernel");
        run("dpkg-deb -x", Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked));
        let release = kernel_package.trim_start_matches("linux-image-").to_owned();
        let modules = unpacked.join("lib/modules").join(&release);
        let guest_modules = root.join("lib/modules").join(&release);
        for tree in GUEST_MODULE_TREES {
            let to = guest_modules.join(tree);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            run("copying modules", Command::new("cp").arg("-a").arg(modules.join(tree)).arg(&to));
        }
        for file in ["modules.order", "modules.builtin", "modules.builtin.modinfo"] {
            std::fs::copy(modules.join(file), guest_modules.join(file)).unwrap();
        }
        run("depmod", Command::new("depmod").arg("-b").arg(&root).arg(&release));
        let boot_modules = partial.join("boot-modules");
        std::fs::create_dir_all(&boot_modules).unwrap();
        for module in BOOT_MODULES {
            let name = Path::new(module).file_name().unwrap();
            std::fs::copy(
                modules.join("kernel").join(format!("{module}.ko")),
                boot_modules.join(name).with_extension("ko"),
            )
            .unwrap();
        }
        std::fs::copy(unpacked.join("boot").join(format!("vmlinuz-{release}")), partial.join("vmlinuz")).unwrap();
        std::fs::remove_dir_all(&unpacked).unwrap();
        std::fs::remove_file(&deb).unwrap();
        std::fs::write(partial.join("ready"), format!("{key}\n")).unwrap();
        std::fs::rename(&partial, &dir).unwrap();
        eprintln!("guest image: made in {:.0} s", started.elapsed().as_secs_f64());
        Image { dir }
    }

    /// Boots the guest and runs `command` (with `env`) as its only job, as root, in the
    /// project's directory; returns what the serial console printed once the guest powered
    /// off, or panics past `limit`. Each console line is copied to standard error as it comes.
    pub fn boot(&self, command: &[&str], env: &[(&str, &str)], limit: Duration) -> Console {
        let work = tempfile::Builder::new().prefix("lockhub-guest-").tempdir().unwrap();
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let target = target_dir();
        let mut shares = vec![manifest.to_path_buf()];
        if !target.starts_with(manifest) {
            shares.push(target);
        }
        let initrd = self.initrd(work.path(), &shares, command, env);
        let accel = std::env::var("LOCKHUB_GUEST_ACCEL").unwrap_or_else(|_| "tcg".into());
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-accel", &accel, "-m", "2048", "-smp", "2", "-nographic", "-no-reboot", "-nic", "none"])
            .arg("-kernel")
            .arg(self.dir.join("vmlinuz"))
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .arg("-virtfs")
            .arg(format!("local,path={},mount_tag=guestroot,security_model=none,readonly=on", self.root().display()));
        for (i, share) in shares.iter().enumerate() {
            qemu.arg("-virtfs")
                .arg(format!("local,path={},mount_tag=share{i},security_model=none,readonly=on", share.display()));
        }
        let started = Instant::now();
        let mut child = qemu.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).trim_end_matches('\r').to_owned();
                eprintln!("guest: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        loop {
            let left = limit.saturating_sub(started.elapsed());
            match rx.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the guest did not power off within {limit:?}; its last lines:\n{}", tail(&lines));
                }
            }
        }
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
        }
        assert!(status.success(), "qemu failed ({status}): {stderr}\n{}", tail(&lines));
        Console { lines, wall: started.elapsed() }
    }

    /// The first stage (busybox, the 9p and overlay modules, an init that mounts the root and
    /// hands over to the second) and the second (a bash script in the real root) as one
    /// initramfs.
    fn initrd(&self, work: &Path, shares: &[PathBuf], command: &[&str], env: &[(&str, &str)]) -> PathBuf {
        let tree = work.join("initrd");
        for d in ["bin", "mods", "newroot", "proc", "dev", "sys", "lower", "upper"] {
            std::fs::create_dir_all(tree.join(d)).unwrap();
        }
        std::fs::copy(self.root().join("bin/busybox"), tree.join("bin/busybox")).unwrap();
        let mut loads = String::new();
        for module in BOOT_MODULES {
            let name = Path::new(module).file_name().unwrap().to_str().unwrap();
            std::fs::copy(
                self.dir.join("boot-modules").join(format!("{name}.ko")),
                tree.join("mods").join(format!("{name}.ko")),
            )
            .unwrap();
            loads.push_str(&format!("insmod /mods/{name}.ko || echo 'guest: insmod {name} failed'\n"));
        }
        let init = format!(
            "#!/bin/busybox sh\n\
             /bin/busybox --install -s /bin\n\
             mount -t proc proc /proc\n\
             mount -t devtmpfs dev /dev\n\
             {loads}\
             mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 guestroot /lower\n\
             mount -t tmpfs -o size=1g tmpfs /upper\n\
             mkdir -p /upper/u /upper/w\n\
             mount -t overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w overlay /newroot\n\
             cp /stage2 /newroot/stage2\n\
             umount /proc\n\
             mount --move /dev /newroot/dev\n\
             exec switch_root /newroot /stage2\n"
        );
        let mut mounts = String::new();
        for (i, share) in shares.iter().enumerate() {
            mounts.push_str(&format!(
                "mkdir -p '{0}' && mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 share{i} '{0}'\n",
                share.display()
            ));
        }
        let exports: String = env.iter().map(|(k, v)| format!("export {k}='{v}'\n")).collect();
        let quoted: Vec<String> = command.iter().map(|a| format!("'{a}'")).collect();
        let stage2 = format!(
            "#!/bin/bash\n\
             mount -t proc proc /proc\n\
             mount -t sysfs sys /sys\n\
             mount -t tmpfs tmpfs /run\n\
             mount -t tmpfs tmpfs /tmp\n\
             mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm\n\
             {mounts}\
             ip link set lo up\n\
             hostname lockhub-guest\n\
             printf '127.0.0.1 localhost\\n::1 localhost ip6-localhost\\n' > /etc/hosts\n\
             echo \"GUEST-UP $(cut -d' ' -f1 /proc/uptime)\"\n\
             modprobe hci_vhci || echo 'modprobe hci_vhci failed'\n\
             mkdir -p /run/dbus && dbus-daemon --system --fork\n\
             export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8\n\
             {exports}\
             cd '{}'\n\
             {} 2>&1\n\
             echo \"GUEST-EXIT $?\"\n\
             echo o > /proc/sysrq-trigger\n\
             sleep 60\n",
            env!("CARGO_MANIFEST_DIR"),
            quoted.join(" ")
        );
        std::fs::write(tree.join("init"), init).unwrap();
        std::fs::write(tree.join("stage2"), stage2).unwrap();
        for f in ["init", "stage2", "bin/busybox"] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tree.join(f), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let out = work.join("initrd.cpio");
        run(
            "cpio",
            Command::new("sh")
                .args(["-c", "find . | cpio -o -H newc --quiet > \"$1\"", "sh"])
                .arg(&out)
                .current_dir(&tree),
        );
        out
    }
}

/// What the guest printed on its console.
pub struct Console {
    /// Every line, in order.
    pub lines: Vec<String>,
    /// From starting qemu to its exit.
    pub wall: Duration,
}

impl Console {
    /// The exit status of the guest's command, if it got that far.
    pub fn exit_code(&self) -> Option<i32> {
        self.lines.iter().rev().find_map(|l| after(l, "GUEST-EXIT ")).and_then(|c| c.trim().parse().ok())
    }

    /// Seconds from the kernel's start to the second stage running.
    pub fn boot_s(&self) -> Option<f64> {
        self.lines.iter().find_map(|l| after(l, "GUEST-UP ")).and_then(|s| s.trim().parse().ok())
    }

    /// The last lines, for a failure's message.
    pub fn tail(&self) -> String {
        tail(&self.lines)
    }
}

/// What follows `mark` in `line`, wherever it is: the guest's processes share one console, so
/// a line of the test's may follow another process's unfinished one.
pub fn after<'a>(line: &'a str, mark: &str) -> Option<&'a str> {
    line.find(mark).map(|at| &line[at + mark.len()..])
}

fn tail(lines: &[String]) -> String {
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// The kernel package `linux-image-amd64` points at, and the cache key: kernel and BlueZ
/// versions and the recipe. Refreshes the package lists once if they do not know them.
fn versions() -> (String, String) {
    let ask = || -> Option<(String, String, String)> {
        let out = Command::new("apt-cache").args(["depends", "linux-image-amd64"]).output().ok()?;
        let kernel = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.trim().strip_prefix("Depends: ").map(|p| p.trim().to_owned()))
            .filter(|p| p.starts_with("linux-image-"))?;
        let version = |package: &str| -> Option<String> {
            let out = Command::new("apt-cache").args(["show", "--no-all-versions", package]).output().ok()?;
            String::from_utf8_lossy(&out.stdout).lines().find_map(|l| l.strip_prefix("Version: ").map(str::to_owned))
        };
        Some((version(&kernel)?, version("bluez")?, kernel))
    };
    let (kernel_version, bluez_version, kernel) = ask()
        .or_else(|| {
            run("apt-get update", Command::new("apt-get").args(["update", "-qq"]));
            ask()
        })
        .expect("apt-cache knows linux-image-amd64 and bluez (Debian's package lists)");
    let key = format!("{kernel}_{kernel_version}-bluez_{bluez_version}-r{RECIPE}").replace(['/', ':', '~', '+'], "_");
    (kernel, key)
}

/// The Cargo target directory this test binary was built in.
fn target_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is `<target>/tmp`.
    Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("the target directory").to_path_buf()
}
