//! File handling for the CA folder: atomic writes that are never briefly world-readable,
//! bounded reads, the private-key permission check, and the folder lock.

use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use crate::error::CaError;

/// Certificates, keys, CRLs and the index are small; anything bigger is not ours.
pub(crate) const MAX_FILE_LEN: u64 = 16 * 1024 * 1024;

/// Writes a file with mode 0600 from the start.
///
/// The bytes go to a fresh temporary file created 0600 beside `path` and are renamed over it,
/// so an existing file with looser permissions never holds the new secret, and a crash
/// leaves either the old file or the new one, never half of either.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    write_atomic(path, contents, 0o600)
}

/// Writes a public file (certificate, CRL, index) atomically, mode 0644 less the umask.
pub(crate) fn write_public(path: &Path, contents: &[u8]) -> Result<(), CaError> {
    write_atomic(path, contents, 0o644)
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let dir = parent_dir(path);
    let mut tmp = tempfile::Builder::new()
        .prefix(".eastwall-")
        .suffix(".tmp")
        .permissions(Permissions::from_mode(mode))
        .tempfile_in(&dir)
        .map_err(|e| CaError::io(&dir, "create a temporary file in", e))?;
    tmp.write_all(contents)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| CaError::io(tmp.path(), "write", e))?;
    tmp.persist(path)
        .map_err(|e| CaError::io(path, "replace", e.error))?;
    // Make the rename itself durable; a failure here does not undo a completed write.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Reads a whole file as UTF-8, refusing anything larger than `MAX_FILE_LEN`.
pub(crate) fn read_text(path: &Path) -> Result<String, CaError> {
    let file = File::open(path).map_err(|e| CaError::io(path, "open", e))?;
    let mut buf = String::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_string(&mut buf)
        .map_err(|e| CaError::io(path, "read", e))?;
    if buf.len() as u64 > MAX_FILE_LEN {
        return Err(CaError::corrupt(
            path,
            format!("file is larger than {MAX_FILE_LEN} bytes"),
        ));
    }
    Ok(buf)
}

/// Refuses a private key that group or others may read, as libpq does for client keys.
pub(crate) fn check_private_mode(path: &Path) -> Result<(), CaError> {
    let meta = fs::metadata(path).map_err(|e| CaError::io(path, "inspect", e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

/// An exclusive lock on the CA folder, held while the index and CRL are read and rewritten,
/// so that concurrent `eastwall ca` runs cannot lose each other's records.
pub(crate) struct DirLock {
    _lock: Flock<File>,
}

impl DirLock {
    pub(crate) fn acquire(dir: &Path) -> Result<Self, CaError> {
        let path = dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| CaError::io(&path, "open the lock file", e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| CaError::io(&path, "lock", errno.into()))?;
        Ok(Self { _lock: lock })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn write_private_creates_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        write_private(&path, b"secret").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"secret");
    }

    #[test]
    fn write_private_over_a_world_readable_file_leaves_it_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, Permissions::from_mode(0o644)).unwrap();
        write_private(&path, b"new secret").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"new secret");
    }

    #[test]
    fn write_leaves_no_temporary_files_behind() {
        let dir = tempfile::tempdir().unwrap();
        write_private(&dir.path().join("a"), b"1").unwrap();
        write_public(&dir.path().join("b"), b"2").unwrap();
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn loose_key_permissions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.key");
        write_private(&path, b"x").unwrap();
        assert!(check_private_mode(&path).is_ok());
        fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();
        let err = check_private_mode(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
