//! Reading a file the operator names — the configuration, a key, a certificate, a password
//! file — whole, but never past a bound.
//!
//! The size `stat` gives is no bound: a device (`/dev/zero`, `/dev/urandom`) reports 0 and
//! never ends, a file still being written reports less than it will hold. A wrong path in the
//! configuration must get a clear error, not a daemon that reads until memory runs out. So
//! the file is read through a limit one byte past the bound, into a buffer sized once from
//! `stat` (a regular file's bytes are never copied by a reallocation, which would leave a
//! secret's copy behind in freed memory), and the buffer is zeroized when dropped.

use std::io::Read;
use std::path::Path;

use zeroize::Zeroizing;

/// The bytes of the file at `path`, at most `max` of them; a file with more is an error of
/// kind `FileTooLarge` ("more than `max` bytes").
pub fn read(path: &Path, max: usize) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let file = std::fs::File::open(path)?;
    let stated = file.metadata().map_or(0, |m| usize::try_from(m.len()).unwrap_or(usize::MAX));
    let mut bytes = Zeroizing::new(Vec::with_capacity(stated.min(max) + 1));
    file.take(max as u64 + 1).read_to_end(&mut bytes)?;
    if bytes.len() > max {
        return Err(std::io::Error::new(std::io::ErrorKind::FileTooLarge, format!("more than {max} bytes")));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_within_the_bound_is_read_whole_and_one_past_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [7u8; 100]).unwrap();
        assert_eq!(read(&path, 100).unwrap().as_slice(), &[7u8; 100]);
        let e = read(&path, 99).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::FileTooLarge);
        assert_eq!(e.to_string(), "more than 99 bytes");
    }

    #[test]
    fn a_device_that_never_ends_is_refused_at_the_bound() {
        // stat says 0 bytes; reading would never end.
        let e = read(Path::new("/dev/zero"), 4096).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::FileTooLarge);
        assert_eq!(read(Path::new("/dev/null"), 4096).unwrap().len(), 0);
    }

    #[test]
    fn what_cannot_be_opened_says_why() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(&dir.path().join("none"), 10).unwrap_err().kind(), std::io::ErrorKind::NotFound);
        assert_eq!(read(dir.path(), 10).unwrap_err().kind(), std::io::ErrorKind::IsADirectory);
    }
}
