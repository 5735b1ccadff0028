//! What a node tells the network about itself, and the TXT record that carries it.
//!
//! The TXT record arrives from anyone on the link, so [`PeerAdvert::from_txt`] treats
//! it as hostile: every value is bounded in length, numbers are plain decimal digits
//! that must fit their type, and anything unexpected rejects the whole advert rather
//! than half-trusting it.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::NodeId;

/// The advert format this node writes and reads. A node that changes the meaning of
/// a key bumps this, and older nodes then ignore it instead of misreading it.
pub const TXT_VERSION: &str = "1";

const KEY_VERSION: &str = "v";
const KEY_ID: &str = "id";
const KEY_CONTROL_PORT: &str = "control";
const KEY_DATA_PORT: &str = "data";
const KEY_API_PORT: &str = "api";
const KEY_MEMORY: &str = "mem";
const KEY_BACKEND: &str = "backend";
const KEY_CLUSTER: &str = "cluster";

/// An Ed25519 peer id is 52 base58 characters; other libp2p key types stay under 64.
/// The bound is what keeps a hostile value from reaching the base58 decoder at size.
const MAX_ID_LEN: usize = 64;

/// `u64::MAX` has 20 digits.
const MAX_NUMBER_LEN: usize = 20;

const MAX_BACKEND_LEN: usize = 16;

/// The cluster a node belongs to, as it appears on the wire: the first 8 bytes of
/// SHA-256("hearth-cluster:" + name).
///
/// Nodes compare hashes, so the cluster name itself is never broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClusterHash([u8; 8]);

impl ClusterHash {
    pub fn of(cluster_name: &str) -> Self {
        let digest = Sha256::digest(format!("hearth-cluster:{cluster_name}").as_bytes());
        let mut hash = [0; 8];
        hash.copy_from_slice(&digest[..8]);
        Self(hash)
    }
}

/// 16 lowercase hex digits.
impl fmt::Display for ClusterHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl FromStr for ClusterHash {
    type Err = AdvertError;

    /// Only the canonical form: exactly 16 lowercase hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| AdvertError::Invalid {
            key: KEY_CLUSTER,
            reason,
        };
        if s.len() != 16 {
            return Err(invalid("not 16 hex digits"));
        }
        if s.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid("not lowercase hex"));
        }
        let mut hash = [0; 8];
        hex::decode_to_slice(s, &mut hash).map_err(|_| invalid("not hex"))?;
        Ok(Self(hash))
    }
}

/// The compute backend a node runs its layers on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Cpu,
    Metal,
    Cuda,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Metal => "metal",
            Self::Cuda => "cuda",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = AdvertError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [Self::Cpu, Self::Metal, Self::Cuda]
            .into_iter()
            .find(|backend| backend.as_str() == s)
            .ok_or(AdvertError::Invalid {
                key: KEY_BACKEND,
                reason: "not one of cpu, metal, cuda",
            })
    }
}

/// A node as discovery sees it: who it is, where its planes listen, and what it can
/// hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAdvert {
    pub node_id: NodeId,
    /// Where the node can be reached. Not part of the TXT record: mDNS carries them
    /// in its address records, a manually added peer in the address it was dialled at.
    pub addresses: Vec<IpAddr>,
    /// The libp2p control plane's TCP port.
    pub control_port: u16,
    /// The gRPC data plane's port.
    pub data_port: u16,
    /// The OpenAI-compatible HTTP API's port.
    pub api_port: u16,
    /// Memory the node offers for model layers, OS reserve already taken off.
    pub usable_memory_bytes: u64,
    pub backend: Backend,
    pub cluster_hash: ClusterHash,
}

/// Why an advert was rejected. Values from the wire are never echoed unbounded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdvertError {
    #[error("advert has no `{0}` key")]
    Missing(&'static str),

    #[error("advert is format version {0:?}; this node reads version {TXT_VERSION}")]
    UnsupportedVersion(String),

    #[error("advert key `{key}` is invalid: {reason}")]
    Invalid {
        key: &'static str,
        reason: &'static str,
    },

    #[error("the peer dialled at port {dialled} advertises control port {advertised}")]
    ControlPortMismatch { dialled: u16, advertised: u16 },
}

impl PeerAdvert {
    /// The TXT record's key/value pairs. Every pair stays far below the 255-byte
    /// limit of one TXT string.
    pub fn to_txt(&self) -> Vec<(&'static str, String)> {
        vec![
            (KEY_VERSION, TXT_VERSION.to_owned()),
            (KEY_ID, self.node_id.0.clone()),
            (KEY_CONTROL_PORT, self.control_port.to_string()),
            (KEY_DATA_PORT, self.data_port.to_string()),
            (KEY_API_PORT, self.api_port.to_string()),
            (KEY_MEMORY, self.usable_memory_bytes.to_string()),
            (KEY_BACKEND, self.backend.as_str().to_owned()),
            (KEY_CLUSTER, self.cluster_hash.to_string()),
        ]
    }

    /// Reads an advert from TXT key/value pairs received from the network, reached at
    /// `addresses`.
    ///
    /// Keys match case-insensitively and only their first occurrence counts (RFC 6763
    /// §6.4); unknown keys are ignored, so later versions can add some without
    /// bumping [`TXT_VERSION`]. A key without a value is passed as an empty value.
    pub fn from_txt<K, V>(
        props: impl IntoIterator<Item = (K, V)>,
        addresses: Vec<IpAddr>,
    ) -> Result<Self, AdvertError>
    where
        K: AsRef<str>,
        V: AsRef<[u8]>,
    {
        const KEYS: [&str; 8] = [
            KEY_VERSION,
            KEY_ID,
            KEY_CONTROL_PORT,
            KEY_DATA_PORT,
            KEY_API_PORT,
            KEY_MEMORY,
            KEY_BACKEND,
            KEY_CLUSTER,
        ];
        let mut values: [Option<V>; 8] = Default::default();
        for (key, value) in props {
            if let Some(slot) = KEYS
                .iter()
                .position(|known| known.eq_ignore_ascii_case(key.as_ref()))
            {
                values[slot].get_or_insert(value);
            }
        }
        let [version, id, control, data, api, memory, backend, cluster] = values;
        let take = |value: Option<V>, key| value.ok_or(AdvertError::Missing(key));

        // The version decides how to read everything else, so it goes first.
        let version = take(version, KEY_VERSION)?;
        let version = bounded_str(KEY_VERSION, version.as_ref(), 8)?;
        if version != TXT_VERSION {
            return Err(AdvertError::UnsupportedVersion(version.to_owned()));
        }

        Ok(Self {
            node_id: parse_node_id(take(id, KEY_ID)?.as_ref())?,
            addresses,
            control_port: parse_port(KEY_CONTROL_PORT, take(control, KEY_CONTROL_PORT)?.as_ref())?,
            data_port: parse_port(KEY_DATA_PORT, take(data, KEY_DATA_PORT)?.as_ref())?,
            api_port: parse_port(KEY_API_PORT, take(api, KEY_API_PORT)?.as_ref())?,
            usable_memory_bytes: parse_u64(KEY_MEMORY, take(memory, KEY_MEMORY)?.as_ref())?,
            backend: bounded_str(
                KEY_BACKEND,
                take(backend, KEY_BACKEND)?.as_ref(),
                MAX_BACKEND_LEN,
            )?
            .parse()?,
            cluster_hash: bounded_str(KEY_CLUSTER, take(cluster, KEY_CLUSTER)?.as_ref(), 16)?
                .parse()?,
        })
    }
}

fn bounded_str<'a>(key: &'static str, raw: &'a [u8], max: usize) -> Result<&'a str, AdvertError> {
    let invalid = |reason| AdvertError::Invalid { key, reason };
    if raw.is_empty() {
        return Err(invalid("empty"));
    }
    if raw.len() > max {
        return Err(invalid("too long"));
    }
    std::str::from_utf8(raw).map_err(|_| invalid("not UTF-8"))
}

/// Plain decimal digits only: `str::parse` alone would also take a leading `+`.
/// Leading zeros are refused too, so each number has exactly one spelling.
fn parse_u64(key: &'static str, raw: &[u8]) -> Result<u64, AdvertError> {
    let invalid = |reason| AdvertError::Invalid { key, reason };
    let digits = bounded_str(key, raw, MAX_NUMBER_LEN)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid("not a non-negative decimal number"));
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return Err(invalid("leading zero"));
    }
    digits.parse().map_err(|_| invalid("out of range"))
}

fn parse_port(key: &'static str, raw: &[u8]) -> Result<u16, AdvertError> {
    let invalid = |reason| AdvertError::Invalid { key, reason };
    match u16::try_from(parse_u64(key, raw)?) {
        Ok(0) => Err(invalid("port 0")),
        Ok(port) => Ok(port),
        Err(_) => Err(invalid("out of range")),
    }
}

/// A node id must be a peer id in its canonical base58 form, so one node can't be
/// listed twice under two spellings.
fn parse_node_id(raw: &[u8]) -> Result<NodeId, AdvertError> {
    let invalid = |reason| AdvertError::Invalid {
        key: KEY_ID,
        reason,
    };
    let id = bounded_str(KEY_ID, raw, MAX_ID_LEN)?;
    let peer_id = PeerId::from_str(id).map_err(|_| invalid("not a peer id"))?;
    if peer_id.to_base58() != id {
        return Err(invalid("not in canonical base58 form"));
    }
    Ok(NodeId(id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_hash_is_the_first_16_hex_of_sha256() {
        let hash = ClusterHash::of("home");
        let full = hex::encode(Sha256::digest(b"hearth-cluster:home"));
        assert_eq!(hash.to_string(), full[..16]);
        assert_eq!(hash.to_string().parse::<ClusterHash>(), Ok(hash));
        assert_ne!(ClusterHash::of("home"), ClusterHash::of("work"));
    }

    #[test]
    fn cluster_hash_parses_only_the_canonical_form() {
        for bad in [
            "",
            "abc",
            "0123456789ABCDEF",
            "0123456789abcdeg",
            "0123456789abcdef0",
        ] {
            assert!(bad.parse::<ClusterHash>().is_err(), "{bad}");
        }
    }

    #[test]
    fn backends_round_trip() {
        for backend in [Backend::Cpu, Backend::Metal, Backend::Cuda] {
            assert_eq!(backend.as_str().parse::<Backend>(), Ok(backend));
        }
        assert!("CPU".parse::<Backend>().is_err());
        assert!("rocm".parse::<Backend>().is_err());
    }

    #[test]
    fn numbers_are_plain_decimal() {
        assert_eq!(parse_u64("k", b"0"), Ok(0));
        assert_eq!(parse_u64("k", b"18446744073709551615"), Ok(u64::MAX));
        for bad in [
            &b""[..],
            b"+1",
            b"-1",
            b" 1",
            b"1 ",
            b"0x10",
            b"01",
            b"1e9",
            b"18446744073709551616",
            b"99999999999999999999",
            b"100000000000000000000",
            b"\xff",
        ] {
            assert!(parse_u64("k", bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_port("k", b"65535"), Ok(65535));
        assert!(parse_port("k", b"65536").is_err());
        assert!(parse_port("k", b"0").is_err());
    }
}
