//! A small filesystem for tests of a full disk: a tmpfs mounted on a temporary directory (root
//! only, as `.ci/run` runs the tests), resized on demand, unmounted on drop.

/// A tmpfs of `size` mounted on a fresh temporary directory, unmounted when dropped.
pub struct SmallFilesystem {
    dir: tempfile::TempDir,
}

impl SmallFilesystem {
    /// Mounts it (root only).
    pub fn mount(size: &str) -> Self {
        assert!(super::tier::is_root(), "mounting a small filesystem needs root: the test starts with needs!(Root)");
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700"), "lockhub-test"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(ok.success(), "mount -t tmpfs");
        SmallFilesystem { dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Gives it a new size (the files stay).
    pub fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap();
        assert!(ok.success(), "mount -o remount");
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}
