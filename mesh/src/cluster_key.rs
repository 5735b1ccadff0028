//! The cluster key: 32 random bytes every node of a private cluster holds.
//!
//! The key itself never leaves the node and is never used directly: each use gets its
//! own key derived from it, `SHA-256(label || key)` with a label naming the use
//! ([`ClusterKey::derive`]): the control plane's private network key
//! ([`PNET_LABEL`]), the data plane's handshake MAC key (`hearth-auth-v1`).
//!
//! It is kept as 64 hex digits (and a newline) in a file only its owner can read
//! ([`ClusterKey::write_new`], [`ClusterKey::read_file`]), or given in hex in an
//! environment variable ([`ClusterKey::from_hex`]).

use std::fmt;
use std::io::Write as _;
use std::path::Path;

use rand::Rng as _;
use sha2::{Digest as _, Sha256};

/// The length of a cluster key, in bytes.
pub const CLUSTER_KEY_LEN: usize = 32;

/// Labels the private network key of the control plane.
pub const PNET_LABEL: &[u8] = b"hearth-pnet-v1";

/// A cluster's shared secret. `Debug` does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterKey([u8; CLUSTER_KEY_LEN]);

/// Why a cluster key could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ClusterKeyError {
    #[error("a cluster key is {expected} hex digits; this one is not ({reason})", expected = 2 * CLUSTER_KEY_LEN)]
    Malformed { reason: String },

    #[error("{path} already exists; pass --force to replace it")]
    Exists { path: String },

    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ClusterKey {
    /// A fresh key from a cryptographically secure generator.
    pub fn generate() -> Self {
        let mut bytes = [0; CLUSTER_KEY_LEN];
        rand::rng().fill(&mut bytes);
        Self(bytes)
    }

    pub fn from_bytes(bytes: [u8; CLUSTER_KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Reads a key in hex; surrounding white space is ignored.
    pub fn from_hex(text: &str) -> Result<Self, ClusterKeyError> {
        let text = text.trim();
        let bytes = hex::decode(text).map_err(|e| ClusterKeyError::Malformed { reason: e.to_string() })?;
        let bytes: [u8; CLUSTER_KEY_LEN] = bytes.try_into().map_err(|bytes: Vec<u8>| ClusterKeyError::Malformed {
            reason: format!("{} bytes instead of {CLUSTER_KEY_LEN}", bytes.len()),
        })?;
        Ok(Self(bytes))
    }

    /// The key in hex, for writing it to a file. Keep it secret.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Reads a key file: the key in hex, surrounding white space ignored. Warns when
    /// the file is readable by others than its owner.
    pub fn read_file(path: &Path) -> Result<Self, ClusterKeyError> {
        let io = |source| ClusterKeyError::Io { action: "reading the cluster key from", path: path.display().to_string(), source };
        let text = std::fs::read_to_string(path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            if let Ok(metadata) = std::fs::metadata(path) {
                if metadata.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(
                        "the cluster key file {} can be read by other users; `chmod 600` it",
                        path.display()
                    );
                }
            }
        }
        Self::from_hex(&text)
    }

    /// Writes this key to a new file only its owner may read or write (mode 0600 on
    /// Unix). Refuses to replace an existing file unless `force`.
    pub fn write_new(&self, path: &Path, force: bool) -> Result<(), ClusterKeyError> {
        let display = path.display().to_string();
        let io = |action, source| ClusterKeyError::Io { action, path: display.clone(), source };
        if force {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(io("replacing", error)),
            }
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = match options.open(path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(ClusterKeyError::Exists { path: display });
            }
            Err(error) => return Err(io("creating", error)),
        };
        writeln!(file, "{}", self.to_hex())
            .and_then(|()| file.sync_all())
            .map_err(|error| io("writing", error))
    }

    /// A key for one use of the cluster key: `SHA-256(label || key)`.
    pub fn derive(&self, label: &[u8]) -> [u8; 32] {
        let mut hash = Sha256::new();
        hash.update(label);
        hash.update(self.0);
        hash.finalize().into()
    }

    /// A short, non-secret name for the key (the first bytes of a hash of it), to tell
    /// in logs which key a node runs with.
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.derive(b"hearth-fingerprint-v1")[..4])
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterKey({})", self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_malformed_keys() {
        let key = ClusterKey::generate();
        assert_eq!(ClusterKey::from_hex(&format!("  {}\n", key.to_hex())).unwrap(), key);
        assert_ne!(ClusterKey::generate(), key);
        for bad in ["", "zz", &"ab".repeat(31), &"ab".repeat(33)] {
            assert!(matches!(ClusterKey::from_hex(bad), Err(ClusterKeyError::Malformed { .. })), "{bad:?}");
        }
    }

    #[test]
    fn debug_hides_the_key() {
        let key = ClusterKey::from_bytes([0xab; 32]);
        assert!(!format!("{key:?}").contains("abab"));
    }

    #[test]
    fn derived_keys_are_separated_by_label() {
        let key = ClusterKey::from_bytes([7; 32]);
        assert_ne!(key.derive(PNET_LABEL), key.derive(b"hearth-auth-v1"));
        assert_ne!(key.derive(PNET_LABEL), [7; 32]);
        assert_ne!(ClusterKey::from_bytes([8; 32]).derive(PNET_LABEL), key.derive(PNET_LABEL));
        let mut expected = Sha256::new();
        expected.update(b"hearth-pnet-v1");
        expected.update([7; 32]);
        assert_eq!(key.derive(PNET_LABEL), <[u8; 32]>::from(expected.finalize()));
    }

    #[test]
    fn key_file_round_trip_permissions_and_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let key = ClusterKey::generate();
        key.write_new(&path, false).unwrap();
        assert_eq!(ClusterKey::read_file(&path).unwrap(), key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }

        let other = ClusterKey::generate();
        assert!(matches!(other.write_new(&path, false), Err(ClusterKeyError::Exists { .. })));
        assert_eq!(ClusterKey::read_file(&path).unwrap(), key, "a refused write leaves the file alone");
        other.write_new(&path, true).unwrap();
        assert_eq!(ClusterKey::read_file(&path).unwrap(), other);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert!(matches!(
            ClusterKey::read_file(&dir.path().join("missing")),
            Err(ClusterKeyError::Io { .. })
        ));
    }
}
