//! The daemon's own machine code in memory.
//!
//! A hub has little RAM, and the kernel maps an executable's pages around each page fault
//! (fault-around) and reads ahead: nearly all of the binary's text ends up resident, although
//! most of it (start-up, configuration, the other subcommands) never runs again once the
//! daemon serves. After start-up the daemon marks its read-only mappings random-access (no
//! fault-around, no read-ahead) and hands back the pages resident so far (`MADV_PAGEOUT`,
//! Linux 5.4+; older kernels refuse it and only the first part applies). What runs while
//! serving comes back page by page, from the page cache. The pages are clean and shared with
//! the file: nothing is lost, only the count of what this process holds.

use std::io;

/// The read-only mappings of this executable: (start, length).
fn own_read_only_mappings() -> io::Result<Vec<(usize, usize)>> {
    let exe = std::env::current_exe()?;
    let exe = exe.to_string_lossy();
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut out = Vec::new();
    for line in maps.lines() {
        // start-end perms offset dev inode path
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        let path = fields.nth(3).unwrap_or("");
        if path != exe || perms.contains('w') {
            continue;
        }
        let Some((start, end)) = range.split_once('-') else { continue };
        let (Ok(start), Ok(end)) = (usize::from_str_radix(start, 16), usize::from_str_radix(end, 16)) else {
            continue;
        };
        if end > start {
            out.push((start, end - start));
        }
    }
    Ok(out)
}

/// Marks the executable's read-only mappings random-access and pages them out; returns how
/// many bytes of mappings were advised.
pub fn trim() -> io::Result<usize> {
    let mut advised = 0;
    for (start, len) in own_read_only_mappings()? {
        // SAFETY: the range is one of this process's own file-backed, read-only mappings, as
        // the kernel lists them; both advices only change how its pages are cached (they are
        // clean and come back from the file on the next touch), never their contents.
        let random = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_RANDOM) };
        if random != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let _ = unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_PAGEOUT) };
        advised += len;
    }
    Ok(advised)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resident_kib_of_own_text() -> u64 {
        let exe = std::env::current_exe().unwrap().to_string_lossy().into_owned();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let (mut ours, mut total) = (false, 0);
        for line in smaps.lines() {
            if line.contains('-') && line.split_whitespace().nth(1).is_some_and(|p| p.len() == 4) {
                ours = line.ends_with(&exe) && !line.split_whitespace().nth(1).unwrap().contains('w');
            } else if ours && let Some(kib) = line.strip_prefix("Rss:") {
                total += kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap();
            }
        }
        total
    }

    #[test]
    fn the_executables_own_pages_are_found_and_handed_back() {
        assert!(!own_read_only_mappings().unwrap().is_empty(), "the test binary has read-only mappings");
        let before = resident_kib_of_own_text();
        assert!(trim().unwrap() > 0);
        let after = resident_kib_of_own_text();
        println!("resident pages of this executable: {before} KiB before, {after} KiB after");
        assert!(after < before, "{before} KiB before, {after} KiB after");
    }
}
