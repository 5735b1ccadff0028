//! A node's identity: an Ed25519 key pair kept in its data folder, and the node id
//! (a libp2p [`PeerId`]) derived from it.
//!
//! Two live nodes must never share an id: the rest of the mesh keys everything —
//! placement, routing, liveness — by it. The usual way to get two is to copy a data
//! folder to a second machine, so next to the key the folder records which machine
//! the key was made on, and [`Identity::load_or_create`] refuses a folder that came
//! from elsewhere. What the folder cannot catch (two processes on one machine, or
//! machines cloned from one disk image) discovery catches on the wire; see
//! [`duplicate_id_error`].

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use libp2p_identity::{KeyType, Keypair, PeerId};
use sha2::{Digest, Sha256};

use crate::NodeId;

/// File in the data folder holding the key pair, in libp2p's protobuf encoding.
pub const KEY_FILE: &str = "identity.key";

/// File in the data folder naming (by hash) the machine the key was created on.
pub const HOST_FILE: &str = "identity.host";

/// An Ed25519 key is 68 bytes in protobuf encoding; anything much larger is not a key,
/// and reading it whole would only let a stray file eat memory.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Why a node's identity could not be loaded or created.
///
/// Each message already includes its cause, so none is repeated as `source()`.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("could not {action} {path}: {error}")]
    Io {
        action: &'static str,
        path: PathBuf,
        error: io::Error,
    },

    #[error(
        "the identity file {path} is corrupt ({reason}); remove it to give this node a new \
         identity"
    )]
    Corrupt { path: PathBuf, reason: String },

    #[error(
        "this data folder's identity was created on another machine (machine {recorded}, \
         this is machine {current}); two nodes must not share an id: remove {key} to give \
         this node a new one, or use --data-dir"
    )]
    OtherMachine {
        key: PathBuf,
        recorded: String,
        current: String,
    },

    #[error(
        "another node at {theirs} uses this node's id {node_id} (this node is at {ours}); its \
         data folder was probably copied from this one: on one of the two, remove {KEY_FILE} \
         from its data folder (or give it its own --data-dir) and restart it"
    )]
    DuplicateId {
        node_id: NodeId,
        ours: String,
        theirs: String,
    },

    #[error("cannot tell which machine this is: {0}")]
    NoMachineId(String),

    #[error("no data folder: set HEARTH_DATA_DIR (or HOME) or pass --data-dir")]
    NoDataDir,
}

/// The error to report when discovery sees this node's id advertised by another
/// machine ([`DiscoveryEvent::DuplicateId`](crate::discovery::DiscoveryEvent)).
///
/// Which of the two nodes is the copy cannot be known, so the message tells whoever
/// reads it how to fix either.
pub fn duplicate_id_error(node_id: &NodeId, ours: &[IpAddr], theirs: &[IpAddr]) -> IdentityError {
    IdentityError::DuplicateId {
        node_id: node_id.clone(),
        ours: join_addrs(ours),
        theirs: join_addrs(theirs),
    }
}

fn join_addrs(addrs: &[IpAddr]) -> String {
    if addrs.is_empty() {
        return "an unknown address".to_owned();
    }
    addrs
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The folder a node keeps its identity (and later its other state) in, when no
/// `--data-dir` is given: `$HEARTH_DATA_DIR`, else `$XDG_DATA_HOME/hearth`, else
/// `~/.local/share/hearth` (`~/Library/Application Support/hearth` on macOS).
pub fn default_data_dir() -> Result<PathBuf, IdentityError> {
    data_dir_from(|name| std::env::var_os(name), cfg!(target_os = "macos"))
        .ok_or(IdentityError::NoDataDir)
}

/// [`default_data_dir`] over an injected environment, so tests need not mutate the
/// process's own.
fn data_dir_from(var: impl Fn(&str) -> Option<OsString>, macos: bool) -> Option<PathBuf> {
    let set = |name: &str| var(name).filter(|value| !value.is_empty());
    if let Some(dir) = set("HEARTH_DATA_DIR") {
        return Some(PathBuf::from(dir));
    }
    // The XDG spec says a relative XDG_DATA_HOME is invalid and must be ignored.
    if let Some(xdg) = set("XDG_DATA_HOME").map(PathBuf::from) {
        if xdg.is_absolute() {
            return Some(xdg.join("hearth"));
        }
    }
    let home = PathBuf::from(set("HOME")?);
    Some(if macos {
        home.join("Library/Application Support/hearth")
    } else {
        home.join(".local/share/hearth")
    })
}

/// Which machine a data folder belongs to.
///
/// Held as a SHA-256 of the operating system's machine id: systemd asks applications
/// not to expose `/etc/machine-id` itself, and data folders get copied around.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineId(String);

impl MachineId {
    /// This machine: `/etc/machine-id` on Linux, the IOPlatformUUID on macOS, and the
    /// host name where neither can be read.
    pub fn current() -> Result<Self, IdentityError> {
        raw_machine_id()
            .map(|raw| Self::from_raw(&raw))
            .ok_or_else(|| {
                IdentityError::NoMachineId(
                    "no machine id (/etc/machine-id, IOPlatformUUID) and no host name".to_owned(),
                )
            })
    }

    /// The machine whose raw, OS-given id is `raw`; tests use this to play a second
    /// machine.
    pub fn from_raw(raw: &str) -> Self {
        let digest = Sha256::digest(format!("hearth-machine:{}", raw.trim()).as_bytes());
        Self(hex::encode(digest))
    }

    /// The form kept in [`HOST_FILE`]: 64 lowercase hex digits.
    fn parse(recorded: &str) -> Option<Self> {
        let recorded = recorded.trim();
        let is_digest = recorded.len() == 64
            && recorded
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        is_digest.then(|| Self(recorded.to_owned()))
    }
}

/// Short enough to read in an error message, long enough to tell machines apart.
impl fmt::Display for MachineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0[..12])
    }
}

#[cfg(target_os = "linux")]
fn raw_machine_id() -> Option<String> {
    ["/etc/machine-id", "/var/lib/dbus/machine-id"]
        .iter()
        .filter_map(|path| fs::read_to_string(path).ok())
        .map(|id| id.trim().to_owned())
        // An image not yet booted holds an empty file or "uninitialized".
        .find(|id| !id.is_empty() && id != "uninitialized")
        .or_else(|| non_empty(fs::read_to_string("/proc/sys/kernel/hostname").ok()))
        .or_else(hostname_command)
}

#[cfg(target_os = "macos")]
fn raw_machine_id() -> Option<String> {
    std::process::Command::new("ioreg")
        .args(["-rd1", "-c", "IOPlatformExpertDevice"])
        .output()
        .ok()
        .and_then(|out| parse_ioreg_uuid(&String::from_utf8_lossy(&out.stdout)))
        .or_else(hostname_command)
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn raw_machine_id() -> Option<String> {
    non_empty(std::env::var("COMPUTERNAME").ok()).or_else(hostname_command)
}

fn hostname_command() -> Option<String> {
    let out = std::process::Command::new("hostname").output().ok()?;
    non_empty(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
}

/// The IOPlatformUUID out of `ioreg -rd1 -c IOPlatformExpertDevice`, whose line reads
/// `  "IOPlatformUUID" = "5A1C…"`.
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
fn parse_ioreg_uuid(ioreg: &str) -> Option<String> {
    let line = ioreg
        .lines()
        .find(|line| line.contains("\"IOPlatformUUID\""))?;
    let (_, value) = line.split_once('=')?;
    non_empty(Some(value.trim().trim_matches('"').to_owned()))
}

/// A node's key pair and the node id derived from it.
#[derive(Clone)]
pub struct Identity {
    keypair: Keypair,
    peer_id: PeerId,
}

impl Identity {
    /// Loads the identity kept in `data_dir`, creating the folder and a new key pair
    /// when there is none; refuses one created on another machine.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, IdentityError> {
        Self::load_or_create_on(data_dir, &MachineId::current()?)
    }

    /// [`load_or_create`](Self::load_or_create) as if running on `machine`.
    pub fn load_or_create_on(data_dir: &Path, machine: &MachineId) -> Result<Self, IdentityError> {
        let key_path = data_dir.join(KEY_FILE);
        let host_path = data_dir.join(HOST_FILE);
        fs::create_dir_all(data_dir).map_err(io_error("create", data_dir))?;

        match read_bounded(&key_path) {
            Ok(bytes) => {
                if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
                    return Err(IdentityError::Corrupt {
                        path: key_path,
                        reason: format!("larger than {MAX_KEY_FILE_BYTES} bytes"),
                    });
                }
                let identity = Self::decode(&key_path, &bytes)?;
                warn_if_readable_by_others(&key_path);
                check_machine(&key_path, &host_path, machine)?;
                tracing::debug!(node_id = %identity.node_id(), "loaded identity");
                Ok(identity)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // The machine is recorded first: a crash in between leaves a host file
                // without a key, which the next start simply overwrites.
                write_private(&host_path, format!("{}\n", machine.0).as_bytes())?;
                let identity = Self::generate();
                let encoded = identity.keypair.to_protobuf_encoding().map_err(|e| {
                    IdentityError::Corrupt {
                        path: key_path.clone(),
                        reason: format!("could not encode the new key: {e}"),
                    }
                })?;
                write_private(&key_path, &encoded)?;
                tracing::info!(node_id = %identity.node_id(), path = %key_path.display(), "created a new node identity");
                Ok(identity)
            }
            Err(e) => Err(io_error("read", &key_path)(e)),
        }
    }

    /// A fresh identity that lives only in memory (for tests and throwaway nodes).
    pub fn generate() -> Self {
        Self::from_keypair(Keypair::generate_ed25519())
    }

    fn from_keypair(keypair: Keypair) -> Self {
        let peer_id = keypair.public().to_peer_id();
        Self { keypair, peer_id }
    }

    fn decode(path: &Path, bytes: &[u8]) -> Result<Self, IdentityError> {
        let corrupt = |reason: String| IdentityError::Corrupt {
            path: path.to_owned(),
            reason,
        };
        let keypair = Keypair::from_protobuf_encoding(bytes)
            .map_err(|e| corrupt(format!("not a libp2p key pair: {e}")))?;
        if keypair.key_type() != KeyType::Ed25519 {
            return Err(corrupt(format!(
                "holds a {:?} key, not Ed25519",
                keypair.key_type()
            )));
        }
        Ok(Self::from_keypair(keypair))
    }

    /// The key pair the control plane signs and authenticates with.
    pub fn keypair(&self) -> &Keypair {
        &self.keypair
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The node id: the peer id's base58 form.
    pub fn node_id(&self) -> NodeId {
        NodeId(self.peer_id.to_base58())
    }
}

/// Shows the id only: the secret key must never reach a log.
impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("peer_id", &self.peer_id)
            .finish_non_exhaustive()
    }
}

fn check_machine(key: &Path, host_path: &Path, machine: &MachineId) -> Result<(), IdentityError> {
    let recorded = match fs::read_to_string(host_path) {
        Ok(recorded) => recorded,
        // A key without a record (the record was deleted, or a crash between the two
        // writes) is adopted by the machine it is found on.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            tracing::info!(path = %host_path.display(), "no machine recorded for the identity; recording this one");
            return write_private(host_path, format!("{}\n", machine.0).as_bytes());
        }
        Err(e) => return Err(io_error("read", host_path)(e)),
    };
    let recorded = MachineId::parse(&recorded).ok_or_else(|| IdentityError::Corrupt {
        path: host_path.to_owned(),
        reason: "expected a 64-digit hex machine hash".to_owned(),
    })?;
    if recorded != *machine {
        return Err(IdentityError::OtherMachine {
            key: key.to_owned(),
            recorded: recorded.to_string(),
            current: machine.to_string(),
        });
    }
    Ok(())
}

/// Reads at most one byte past the limit: enough to tell an oversized file apart.
fn read_bounded(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Writes `contents` to `path` readable by the owner only, replacing it atomically so
/// a crash never leaves half a key behind.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), IdentityError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        // A leftover from a crashed run may have other permissions; `create_new` makes
        // sure the mode below is the one the file gets.
        let _ = fs::remove_file(&tmp);
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_error("write", path))?;
    // Make the rename itself durable; not every platform can open a directory, and
    // the write has succeeded either way.
    if let Some(dir) = path.parent() {
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "the node's private key is readable by other users; run chmod 600 on it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> IdentityError {
    let path = path.to_owned();
    move |error| IdentityError::Io {
        action,
        path,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn data_dir_prefers_hearth_then_xdg_then_home() {
        let all = [
            ("HEARTH_DATA_DIR", "/srv/hearth"),
            ("XDG_DATA_HOME", "/x"),
            ("HOME", "/home/a"),
        ];
        assert_eq!(data_dir_from(env(&all), false), Some("/srv/hearth".into()));
        assert_eq!(
            data_dir_from(env(&all[1..]), false),
            Some("/x/hearth".into())
        );
        assert_eq!(
            data_dir_from(env(&all[2..]), false),
            Some("/home/a/.local/share/hearth".into())
        );
        assert_eq!(
            data_dir_from(env(&all[2..]), true),
            Some("/home/a/Library/Application Support/hearth".into())
        );
        assert_eq!(data_dir_from(env(&[]), false), None);
    }

    #[test]
    fn data_dir_ignores_empty_and_relative_values() {
        let vars = [
            ("HEARTH_DATA_DIR", ""),
            ("XDG_DATA_HOME", "relative/dir"),
            ("HOME", "/home/a"),
        ];
        assert_eq!(
            data_dir_from(env(&vars), false),
            Some("/home/a/.local/share/hearth".into())
        );
    }

    #[test]
    fn machine_ids_are_hashed_and_trimmed() {
        let a = MachineId::from_raw("3d1219c7c4c5404aaa1f6d2a48adfda4\n");
        assert_eq!(a, MachineId::from_raw("3d1219c7c4c5404aaa1f6d2a48adfda4"));
        assert!(!a.0.contains("3d1219c7"));
        assert_eq!(MachineId::parse(&format!("{}\n", a.0)), Some(a.clone()));
        assert_eq!(MachineId::parse("not hex"), None);
        assert_eq!(MachineId::parse(&a.0.to_uppercase()), None);
    }

    #[test]
    fn this_machine_has_an_id() {
        MachineId::current().expect("a machine id or host name");
    }

    #[test]
    fn ioreg_output_yields_the_platform_uuid() {
        let out = r#"+-o J314sAP  <class IOPlatformExpertDevice, id 0x100000248>
    {
      "IOPlatformSerialNumber" = "XYZ"
      "IOPlatformUUID" = "5A1C0D3E-1111-2222-3333-444455556666"
    }"#;
        assert_eq!(
            parse_ioreg_uuid(out).as_deref(),
            Some("5A1C0D3E-1111-2222-3333-444455556666")
        );
        assert_eq!(parse_ioreg_uuid("nothing here"), None);
    }

    #[test]
    fn duplicate_message_names_both_sides_and_the_fix() {
        let msg = duplicate_id_error(
            &NodeId::from("12D3KooWabc"),
            &["192.0.2.2".parse().unwrap()],
            &["192.0.2.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        )
        .to_string();
        assert!(msg.contains("192.0.2.7, fd00::7"), "{msg}");
        assert!(msg.contains("192.0.2.2"), "{msg}");
        assert!(msg.contains("12D3KooWabc"), "{msg}");
        assert!(msg.contains("remove identity.key"), "{msg}");
    }
}
