//! The daemon's machine code in memory.
//!
//! A hub has little RAM, and code stays mapped once touched: start-up, configuration, the
//! other subcommands, all of it resident although it never runs again once the daemon serves;
//! the same holds for what start-up touched in the libraries (the dynamic linker binding
//! symbols, libm, libsystemd). After start-up the daemon unmaps the pages of its read-only file
//! mappings (`MADV_DONTNEED`), and marks its own random-access (no read-ahead when a page comes
//! back from disk): what runs while serving comes back page by page from the page cache, where
//! the rest stays as clean cache the kernel may drop. Two things keep this from bringing
//! everything back: the kernel maps the cached neighbours of each fault too (fault-around,
//! 64 KiB, which `MADV_RANDOM` does not stop), so the release build lays the serving code out
//! together (build.rs); and only mappings without private pages are unmapped (the relocated
//! read-only data is private: unmapping it would lose the relocations).
//!
//! Not `MADV_PAGEOUT`, which would also drop the pages from the cache: the kernel refuses it
//! for a file the process could not open for writing, which is how a packaged daemon runs
//! (its binary is root's, it runs as `lockhub`) — there it did nothing at all. A library's
//! pages that other processes map stay in memory for them: for those, unmapping changes what
//! this process's RSS counts, not what the machine holds (its PSS counts them shared).

use std::io;

/// One read-only file mapping: this executable's, or a library's.
#[derive(Debug)]
struct Mapping {
    start: usize,
    len: usize,
    /// Whether it is this executable's own.
    own: bool,
    /// KiB resident.
    rss_kib: u64,
    /// KiB of private (copied-on-write) pages: contents that exist nowhere else.
    private_kib: u64,
}

/// The read-only file mappings of this process, from `/proc/self/smaps`.
fn read_only_file_mappings() -> io::Result<Vec<Mapping>> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_string_lossy();
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut out = Vec::new();
    let mut current: Option<Mapping> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(first), Some(second)) = (fields.next(), fields.next()) else { continue };
        // A mapping's header: start-end perms offset dev inode [path].
        if let Some((start, end)) = first.split_once('-')
            && second.len() == 4
        {
            out.extend(current.take());
            let path = fields.nth(3).unwrap_or("");
            // Files only: not the stack, the heap, [vdso] or [vvar].
            if !path.starts_with('/') || second.contains('w') {
                continue;
            }
            let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16)) else {
                continue;
            };
            if end > start {
                current = Some(Mapping { start, len: end - start, own: path == exe, rss_kib: 0, private_kib: 0 });
            }
        } else if let Some(mapping) = current.as_mut() {
            match first {
                "Rss:" => mapping.rss_kib = second.parse().unwrap_or(0),
                // Unparsable counts as private: such a mapping is left alone.
                "Anonymous:" => mapping.private_kib = second.parse().unwrap_or(u64::MAX),
                _ => {}
            }
        }
    }
    out.extend(current);
    Ok(out)
}

/// Marks the executable's read-only mappings random-access, and unmaps the pages of every
/// read-only file mapping (its own and the libraries') without private pages; returns how many
/// KiB were resident in the mappings it unmapped.
///
/// Never inlined: `packaging/profile-hot-code` cuts its profile where this is entered.
#[inline(never)]
pub fn trim() -> io::Result<usize> {
    let mut unmapped = 0;
    for Mapping { start, len, own, rss_kib, private_kib } in read_only_file_mappings()? {
        // SAFETY: the range is one of this process's own file-backed, read-only mappings, as
        // the kernel lists them; the advice only changes how its pages are read, never their
        // contents.
        if own && unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_RANDOM) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if private_kib != 0 {
            continue;
        }
        // SAFETY: as above, and the mapping holds no private page: every page unmapped is a
        // clean copy of the file, and comes back from it, unchanged, on the next touch.
        if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_DONTNEED) } != 0 {
            return Err(io::Error::last_os_error());
        }
        unmapped += rss_kib as usize;
    }
    Ok(unmapped)
}

#[cfg(test)]
#[allow(clippy::print_stdout, reason = "a test's own output, read by its parent test")]
mod tests {
    use super::*;

    /// KiB resident in this executable's read-only mappings: (clean ones, private ones).
    fn resident_kib_of_own_mappings() -> (u64, u64) {
        let own = read_only_file_mappings().unwrap().into_iter().filter(|m| m.own);
        own.fold(
            (0, 0),
            |(clean, private), m| {
                if m.private_kib == 0 { (clean + m.rss_kib, private) } else { (clean, private + m.rss_kib) }
            },
        )
    }

    /// Set in the child that [`an_unprivileged_daemon_hands_its_code_back`] starts.
    const CHILD: &str = "LOCKHUB_TEXT_PAGES_CHILD";

    #[test]
    fn the_executables_own_pages_are_found_and_handed_back() {
        let mappings = read_only_file_mappings().unwrap();
        assert!(
            mappings.iter().any(|m| m.own && m.private_kib == 0),
            "the test binary has clean read-only mappings: {mappings:?}"
        );
        // A position-independent binary's relocated read-only data: private, and to be kept.
        assert!(mappings.iter().any(|m| m.own && m.private_kib > 0), "and a relocated one: {mappings:?}");
        let (before, private_before) = resident_kib_of_own_mappings();
        assert!(trim().unwrap() > 0);
        let (after, private_after) = resident_kib_of_own_mappings();
        println!("resident pages of this executable: {before} KiB before, {after} KiB after");
        assert!(after < before, "{before} KiB before, {after} KiB after");
        assert!(private_after >= private_before, "relocated data unmapped: {private_before} -> {private_after} KiB");
        if std::env::var_os(CHILD).is_some() {
            // The parent reads this line.
            println!("handed back: {before} -> {after} KiB");
        }
    }

    /// As packaged, the daemon runs as its own user and its binary is root's: the hand-back
    /// must work for a process that cannot write its executable (`MADV_PAGEOUT` does not).
    /// Root runs this test binary again as `nobody`, from a root-owned copy.
    #[test]
    fn an_unprivileged_daemon_hands_its_code_back() {
        // SAFETY: geteuid has no preconditions.
        if std::env::var_os(CHILD).is_some() || unsafe { libc::geteuid() } != 0 {
            println!("not root: nothing to drop, and the test binary is this user's own");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let copy = dir.path().join("text-pages-test");
        std::fs::copy(std::env::current_exe().unwrap(), &copy).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
        let out = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&copy)
            .args(["--exact", "text_pages::tests::the_executables_own_pages_are_found_and_handed_back", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("handed back:"), "the child ran the hand-back: {stdout}");
    }
}
