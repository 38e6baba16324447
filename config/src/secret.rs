//! Secrets the proxy holds for its upstream login: where they come from, and a value that never prints.

use std::fmt;
use std::path::PathBuf;

use crate::error::ConfigError;

/// A secret value; `Debug` prints `Secret(***)` so it cannot leak through logs or panics.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The value itself, for the one place that needs it (the upstream login).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where the upstream password lives; never in eastwall.toml itself, which ends up in
/// backups, tickets and version control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    /// A file holding the password (one trailing newline is ignored).
    File(PathBuf),
    /// An environment variable holding the password.
    Env(String),
}

/// What a password file looked like when it was read: a change in any of these means it was
/// rewritten or replaced (an atomic rename gives a new inode; an edit in place changes the
/// modification or change time), so the next login reads it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            FileStamp {
                dev: meta.dev(),
                ino: meta.ino(),
                len: meta.len(),
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
                ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
            }
        }
        #[cfg(not(unix))]
        {
            let mtime_ns = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos() as i128);
            FileStamp {
                dev: 0,
                ino: 0,
                len: meta.len(),
                mtime_ns,
                ctime_ns: 0,
            }
        }
    }
}

/// Refuses a password file that group or others may read, as libpq does for a client key:
/// mode 0600 or stricter, or 0640 or stricter when root owns it (a root-managed secret shared
/// with the service's group).
#[cfg(unix)]
fn check_mode(path: &std::path::Path, meta: &std::fs::Metadata) -> Result<(), ConfigError> {
    use std::os::unix::fs::MetadataExt;
    let mode = meta.mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    if mode & !allowed != 0 {
        return Err(ConfigError::Secret {
            what: format!("upstream.password_file {}", path.display()),
            message: format!(
                "mode {mode:04o} lets group or others read the upstream password; \
                 expected 0600 or stricter (0640 if owned by root): run `chmod 600 {}`",
                path.display()
            ),
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_mode(_path: &std::path::Path, _meta: &std::fs::Metadata) -> Result<(), ConfigError> {
    Ok(())
}

impl PasswordSource {
    /// Reads the secret now. A password file must not be readable by group or others.
    pub fn read(&self) -> Result<Secret, ConfigError> {
        self.read_stamped().map(|(secret, _)| secret)
    }

    /// Reads the secret and, for a file, the stamp it had when read (see
    /// [`PasswordSource::stamp`]); the mode is checked on the file that was opened.
    pub fn read_stamped(&self) -> Result<(Secret, Option<FileStamp>), ConfigError> {
        let (value, stamp) = match self {
            PasswordSource::File(path) => {
                use std::io::Read;
                let cannot = |e: std::io::Error| ConfigError::Secret {
                    what: format!("upstream.password_file {}", path.display()),
                    message: format!("cannot read it: {e}"),
                };
                let mut file = std::fs::File::open(path).map_err(cannot)?;
                let meta = file.metadata().map_err(cannot)?;
                check_mode(path, &meta)?;
                let mut text = String::new();
                file.read_to_string(&mut text).map_err(cannot)?;
                let text = text
                    .strip_suffix('\n')
                    .map(|t| t.strip_suffix('\r').unwrap_or(t))
                    .unwrap_or(&text);
                (text.to_owned(), Some(FileStamp::of(&meta)))
            }
            PasswordSource::Env(var) => (
                std::env::var(var).map_err(|e| ConfigError::Secret {
                    what: format!("upstream.password_env {var}"),
                    message: format!("expected the environment variable to hold the password: {e}"),
                })?,
                None,
            ),
        };
        if value.is_empty() {
            return Err(ConfigError::Secret {
                what: match self {
                    PasswordSource::File(p) => format!("upstream.password_file {}", p.display()),
                    PasswordSource::Env(v) => format!("upstream.password_env {v}"),
                },
                message: "the password is empty; expected the upstream role's password".into(),
            });
        }
        Ok((Secret(value), stamp))
    }

    /// The file's stamp now, without reading it: compare with the one from
    /// [`PasswordSource::read_stamped`] to learn whether the file changed (rotation). `None`
    /// for an environment variable (it cannot change under a running process) or a file that
    /// cannot be looked at.
    pub fn stamp(&self) -> Option<FileStamp> {
        match self {
            PasswordSource::File(path) => std::fs::metadata(path).ok().map(|m| FileStamp::of(&m)),
            PasswordSource::Env(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_private(path: &std::path::Path, text: &str) {
        std::fs::write(path, text).unwrap();
        set_mode(path, 0o600);
    }

    #[cfg(unix)]
    fn set_mode(path: &std::path::Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_password_file_others_can_read_is_refused_naming_file_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        for mode in [0o644, 0o604, 0o660] {
            set_mode(&path, mode);
            let err = PasswordSource::File(path.clone())
                .read()
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!("mode {mode:04o}")), "{err}");
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains("chmod 600"), "{err}");
        }
        set_mode(&path, 0o400);
        assert_eq!(
            PasswordSource::File(path).read().unwrap().expose(),
            "s3cret"
        );
    }

    #[test]
    fn the_stamp_changes_when_the_file_is_rewritten_or_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        write_private(&path, "one\n");
        let source = PasswordSource::File(path.clone());
        let (secret, stamp) = source.read_stamped().unwrap();
        assert_eq!(secret.expose(), "one");
        assert_eq!(source.stamp(), stamp, "unchanged file, same stamp");
        // Replaced by rename (how secret managers rotate): a new inode.
        let next = dir.path().join("pw.new");
        write_private(&next, "two\n");
        std::fs::rename(&next, &path).unwrap();
        assert_ne!(source.stamp(), stamp);
        assert_eq!(source.read().unwrap().expose(), "two");
        assert_eq!(PasswordSource::Env("X".into()).stamp(), None);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = Secret::new("hunter2".into());
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn file_source_strips_one_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        write_private(&path, "s3cret\r\n");
        let s = PasswordSource::File(path).read().unwrap();
        assert_eq!(s.expose(), "s3cret");
    }

    #[test]
    fn missing_file_and_empty_password_are_errors_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = PasswordSource::File(dir.path().join("nope"))
            .read()
            .unwrap_err();
        assert!(
            missing.to_string().contains("upstream.password_file"),
            "{missing}"
        );
        let path = dir.path().join("empty");
        write_private(&path, "\n");
        let empty = PasswordSource::File(path).read().unwrap_err();
        assert!(empty.to_string().contains("empty"), "{empty}");
    }

    #[test]
    fn env_source_names_the_variable_when_unset() {
        let err = PasswordSource::Env("EASTWALL_TEST_SURELY_UNSET_VAR".into())
            .read()
            .unwrap_err();
        assert!(
            err.to_string().contains("EASTWALL_TEST_SURELY_UNSET_VAR"),
            "{err}"
        );
    }
}
