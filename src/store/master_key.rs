//! Where the master key comes from, and how it is kept.
//!
//! Under systemd the key is a credential (`LoadCredential=` or `LoadCredentialEncrypted=`):
//! the file `lockhub-master-key` in `$CREDENTIALS_DIRECTORY`, 32 raw bytes or 64 hex digits.
//! Otherwise it is a key file beside the database, created on first start (atomically, mode
//! 0600) and refused when anyone but the owner can read it. A rekey stages the new key in
//! `<key>.new` before the store changes, so a crash at any point leaves a key that opens it.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;
use zeroize::Zeroizing;

use super::seal::MasterKey;

/// The credential name under `$CREDENTIALS_DIRECTORY`.
pub const CREDENTIAL_NAME: &str = "lockhub-master-key";

/// Where the key was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// A systemd credential (read-only: rekeying needs a new credential).
    Credential(PathBuf),
    /// A key file the store manages.
    File(PathBuf),
}

impl KeySource {
    /// The file the key was read from.
    pub fn path(&self) -> &Path {
        match self {
            KeySource::Credential(p) | KeySource::File(p) => p,
        }
    }
}

/// Why the master key could not be had.
#[derive(Debug, Error)]
pub enum KeyError {
    /// The key file is readable by group or others.
    #[error(
        "the master key file {path} is readable by others (mode {mode:04o}); fix it with `chmod 600 {path}` \
         and make sure only the lockhub user owns it"
    )]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its mode bits.
        mode: u32,
    },
    /// The key file does not hold a key.
    #[error("the master key file {path} does not hold a key (32 bytes or 64 hex digits); restore it from backup")]
    Malformed {
        /// The key file.
        path: PathBuf,
    },
    /// The file could not be read or written.
    #[error("master key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io { path: path.to_owned(), source }
}

/// A key file's bytes: at most 65 (64 hex digits and a newline); a longer file is no key.
fn read_key_bytes(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    crate::bounded_file::read(path, 65).map_err(|e| match e.kind() {
        std::io::ErrorKind::FileTooLarge => KeyError::Malformed { path: path.to_owned() },
        _ => io(path)(e),
    })
}

fn parse_key(bytes: &[u8], path: &Path) -> Result<MasterKey, KeyError> {
    let malformed = || KeyError::Malformed { path: path.to_owned() };
    let mut key = Zeroizing::new([0u8; 32]);
    match bytes.len() {
        32 => key.copy_from_slice(bytes),
        64 | 65 => {
            let text = std::str::from_utf8(&bytes[..64]).map_err(|_| malformed())?;
            for (i, k) in key.iter_mut().enumerate() {
                *k = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| malformed())?;
            }
            if bytes.len() == 65 && bytes[64] != b'\n' {
                return Err(malformed());
            }
        }
        _ => return Err(malformed()),
    }
    Ok(MasterKey::from_bytes(*key))
}

/// Reads a key file, refusing one that group or others can read.
pub fn read_key_file(path: &Path) -> Result<MasterKey, KeyError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions { path: path.to_owned(), mode });
    }
    parse_key(&read_key_bytes(path)?, path)
}

/// Writes `key` to `path` atomically with mode 0600: a temporary file, fsync, then a link that
/// fails if `path` exists (`replace = false`) or a rename over it (`replace = true`).
pub fn write_key_file(path: &Path, key: &MasterKey, replace: bool) -> Result<(), KeyError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(key.as_bytes())?;
        f.sync_all()?;
        if replace { std::fs::rename(&tmp, path) } else { std::fs::hard_link(&tmp, path) }
    })();
    let _ = std::fs::remove_file(&tmp);
    result.map_err(io(path))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(path))?;
    }
    Ok(())
}

/// Finds the master key: the systemd credential when `credentials_dir` holds one, else the key
/// file at `key_file`, created on first start.
pub fn load(credentials_dir: Option<&Path>, key_file: &Path) -> Result<(MasterKey, KeySource), KeyError> {
    if let Some(dir) = credentials_dir {
        let path = dir.join(CREDENTIAL_NAME);
        if path.exists() {
            return Ok((parse_key(&read_key_bytes(&path)?, &path)?, KeySource::Credential(path)));
        }
    }
    match read_key_file(key_file) {
        Ok(key) => Ok((key, KeySource::File(key_file.to_owned()))),
        Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            let key = MasterKey::generate();
            match write_key_file(key_file, &key, false) {
                Ok(()) => Ok((key, KeySource::File(key_file.to_owned()))),
                // Another process created it first: use theirs.
                Err(KeyError::Io { source, .. }) if source.kind() == std::io::ErrorKind::AlreadyExists => {
                    Ok((read_key_file(key_file)?, KeySource::File(key_file.to_owned())))
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// The staged key of an unfinished rekey.
pub fn staged_path(key_file: &Path) -> PathBuf {
    let mut name = key_file.as_os_str().to_owned();
    name.push(".new");
    PathBuf::from(name)
}
