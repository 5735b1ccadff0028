//! The gossip messages as they travel, and the checks a received one must pass.
//!
//! Gossip comes from any node that can reach us, so nothing in it is trusted: a
//! message is decoded into typed structures, every count, length and range is
//! bounded, and a message may only speak for the node that signed it. A message
//! failing any check is dropped whole.
//!
//! The encoding is JSON with a version number. Fields this version does not know are
//! ignored, so optional fields can be added without a new version; a message of
//! another version is dropped.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::str::FromStr;

use libp2p::PeerId;
use serde::{Deserialize, Serialize};

use super::{NodeInfo, Plan};

/// The version this node speaks.
pub(crate) const WIRE_VERSION: u32 = 1;

/// Gossip messages larger than this are refused by gossipsub itself, before they are
/// read whole. A plan of [`MAX_STAGES`] stages is well under it.
pub(crate) const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The largest epoch a node accepts: far more plans than a cluster will ever make,
/// and exactly representable in the JSON readers of other languages. Bounding it
/// keeps `epoch + 1` from overflowing when a peer reports a huge one.
pub(crate) const MAX_EPOCH: u64 = 1 << 53;

/// More stages than any pipeline would sensibly have.
const MAX_STAGES: usize = 256;

/// Far more decoder layers than any model has.
const MAX_LAYERS: usize = 65_536;

const MAX_MODEL_ID_BYTES: usize = 256;
const MAX_BACKEND_BYTES: usize = 16;

/// A node rarely listens on more than a few addresses; more would only make every
/// peer dial them all.
pub(crate) const MAX_LISTEN_ADDRS: usize = 16;

/// A node reports its paths to at most this many peers (one per other member).
const MAX_HOPS: usize = MAX_STAGES;

/// Interface names are short (IFNAMSIZ is 16 on Linux); allow some room for others.
const MAX_INTERFACE_NAME_BYTES: usize = 64;

/// What one gossip message says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Body {
    /// The sender's own state, and where it accepts control connections so that every
    /// node can connect to every other.
    Announce {
        info: NodeInfo,
        listen: Vec<SocketAddr>,
    },
    /// A plan, sent by the coordinator that made it.
    Plan(Plan),
    /// The sender is leaving the cluster.
    Goodbye,
}

#[derive(Serialize)]
struct EnvelopeRef<'a> {
    v: u32,
    body: &'a Body,
}

#[derive(Deserialize)]
struct Envelope {
    body: Body,
}

/// Read first, so that a message of another version is told apart from a malformed one.
#[derive(Deserialize)]
struct Header {
    v: u32,
}

/// Why a message was dropped. Values from the wire are never echoed unbounded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Invalid {
    #[error("{0} bytes, over the {MAX_MESSAGE_BYTES} byte limit")]
    TooLarge(usize),

    #[error("not signed by its author")]
    Unsigned,

    #[error("undecodable: {0}")]
    Decode(#[from] serde_json::Error),

    #[error("wire version {0}; this node speaks version {WIRE_VERSION}")]
    Version(u32),

    #[error("{0}")]
    Field(&'static str),
}

/// Encodes a message for gossip.
pub(crate) fn encode(body: &Body) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&EnvelopeRef {
        v: WIRE_VERSION,
        body,
    })
}

/// Decodes and checks a message signed by `source`; returns its author and what it
/// says.
pub(crate) fn decode(source: Option<&PeerId>, data: &[u8]) -> Result<(PeerId, Body), Invalid> {
    if data.len() > MAX_MESSAGE_BYTES {
        return Err(Invalid::TooLarge(data.len()));
    }
    let author = *source.ok_or(Invalid::Unsigned)?;
    let source = author.to_base58();
    let Header { v } = serde_json::from_slice(data)?;
    if v != WIRE_VERSION {
        return Err(Invalid::Version(v));
    }
    let Envelope { body } = serde_json::from_slice(data)?;
    match &body {
        Body::Announce { info, listen } => {
            validate_node_info(info)?;
            if info.node_id != source {
                return Err(Invalid::Field("announces a node other than its sender"));
            }
            validate_listen(listen)?;
        }
        Body::Plan(plan) => {
            validate_plan(plan)?;
            if plan.coordinator != source {
                return Err(Invalid::Field(
                    "a plan sent by a node other than its coordinator",
                ));
            }
        }
        Body::Goodbye => {}
    }
    Ok((author, body))
}

/// Checks what a node says about itself.
pub(crate) fn validate_node_info(info: &NodeInfo) -> Result<(), Invalid> {
    validate_node_id(&info.node_id)?;
    validate_model_id(&info.model_id)?;
    if info.backend.is_empty()
        || info.backend.len() > MAX_BACKEND_BYTES
        || !info.backend.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(Invalid::Field("backend is not a short alphanumeric name"));
    }
    if info.ready_epoch.is_some_and(|epoch| epoch > MAX_EPOCH) {
        return Err(Invalid::Field("ready_epoch is out of range"));
    }
    if info.following_epoch.is_some_and(|epoch| epoch > MAX_EPOCH) {
        return Err(Invalid::Field("following_epoch is out of range"));
    }
    validate_addr(info.data_addr, "data_addr is not a connectable address")?;
    validate_addr(info.api_addr, "api_addr is not a connectable address")?;
    if info.data_paths.len() > super::MAX_DATA_PATHS {
        return Err(Invalid::Field("too many data paths"));
    }
    info.data_paths
        .iter()
        .try_for_each(|addr| validate_addr(*addr, "a data path is not a connectable address"))?;
    if info.prepared.as_ref().is_some_and(|layers| layers.start >= layers.end || layers.end > MAX_LAYERS) {
        return Err(Invalid::Field("prepared layers are empty or out of range"));
    }
    if info.hops.len() > MAX_HOPS {
        return Err(Invalid::Field("too many hops"));
    }
    for hop in &info.hops {
        validate_node_id(&hop.to)?;
        validate_addr(hop.addr, "a hop's address is not connectable")?;
        if hop.interface.len() > MAX_INTERFACE_NAME_BYTES || hop.interface.chars().any(char::is_control) {
            return Err(Invalid::Field("a hop's interface name is too long or has control characters"));
        }
    }
    Ok(())
}

/// Checks a plan's shape: bounded, one stage per node, and layer ranges that tile
/// `0..n` in order.
pub(crate) fn validate_plan(plan: &Plan) -> Result<(), Invalid> {
    if plan.epoch == 0 || plan.epoch > MAX_EPOCH {
        return Err(Invalid::Field("epoch is out of range"));
    }
    validate_node_id(&plan.coordinator)?;
    validate_model_id(&plan.model_id)?;
    if plan.stages.is_empty() || plan.stages.len() > MAX_STAGES {
        return Err(Invalid::Field("the number of stages is out of range"));
    }
    let mut nodes = BTreeSet::new();
    let mut next_layer = 0;
    for stage in &plan.stages {
        validate_node_id(&stage.node_id)?;
        if !nodes.insert(stage.node_id.as_str()) {
            return Err(Invalid::Field("a node has more than one stage"));
        }
        validate_addr(
            stage.data_addr,
            "a stage's data_addr is not a connectable address",
        )?;
        if stage.layers.start != next_layer {
            return Err(Invalid::Field(
                "the stages' layers are not contiguous from 0",
            ));
        }
        if stage.layers.end <= stage.layers.start || stage.layers.end > MAX_LAYERS {
            return Err(Invalid::Field("a stage's layers are empty or out of range"));
        }
        next_layer = stage.layers.end;
    }
    Ok(())
}

fn validate_listen(listen: &[SocketAddr]) -> Result<(), Invalid> {
    if listen.len() > MAX_LISTEN_ADDRS {
        return Err(Invalid::Field("too many listen addresses"));
    }
    listen
        .iter()
        .try_for_each(|addr| validate_addr(*addr, "a listen address is not connectable"))
}

/// Node ids must be canonical `PeerId` strings: two spellings of one id would make
/// one node look like two, and the coordinator rule compares the strings.
fn validate_node_id(node_id: &str) -> Result<(), Invalid> {
    match PeerId::from_str(node_id) {
        Ok(peer) if peer.to_base58() == node_id => Ok(()),
        _ => Err(Invalid::Field(
            "a node id is not a canonical libp2p peer id",
        )),
    }
}

fn validate_model_id(model_id: &str) -> Result<(), Invalid> {
    if model_id.is_empty()
        || model_id.len() > MAX_MODEL_ID_BYTES
        || model_id.chars().any(char::is_control)
    {
        return Err(Invalid::Field(
            "model_id is empty, too long or has control characters",
        ));
    }
    Ok(())
}

/// An unspecified address or port 0 names no place to connect to; `error` says which
/// address it was.
fn validate_addr(addr: SocketAddr, error: &'static str) -> Result<(), Invalid> {
    if addr.ip().is_unspecified() || addr.port() == 0 {
        return Err(Invalid::Field(error));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;
    use proptest::prelude::*;

    use super::*;
    use crate::control::{HopReport, PlanStage};

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    fn info(peer: &PeerId) -> NodeInfo {
        NodeInfo {
            node_id: peer.to_base58(),
            data_addr: "127.0.0.1:7001".parse().unwrap(),
            api_addr: "127.0.0.1:8001".parse().unwrap(),
            usable_memory_bytes: 1 << 30,
            backend: "cpu".into(),
            model_id: "org/model".into(),
            ready_epoch: None,
            following_epoch: None,
            data_paths: Vec::new(),
            hops: Vec::new(),
            prepared: None,
        }
    }

    fn plan(coordinator: &PeerId, stages: &[(&PeerId, std::ops::Range<usize>)]) -> Plan {
        Plan {
            epoch: 1,
            coordinator: coordinator.to_base58(),
            model_id: "org/model".into(),
            stages: stages
                .iter()
                .map(|(node, layers)| PlanStage {
                    node_id: node.to_base58(),
                    data_addr: "127.0.0.1:7001".parse().unwrap(),
                    layers: layers.clone(),
                })
                .collect(),
        }
    }

    fn round_trip(source: &PeerId, body: &Body) -> Result<Body, Invalid> {
        decode(Some(source), &encode(body).unwrap()).map(|(author, body)| {
            assert_eq!(author, *source);
            body
        })
    }

    #[test]
    fn valid_messages_round_trip() {
        let (a, b) = (peer(), peer());
        let bodies = [
            Body::Announce {
                info: info(&a),
                listen: vec!["127.0.0.1:4001".parse().unwrap()],
            },
            Body::Plan(plan(&a, &[(&a, 0..10), (&b, 10..24)])),
            Body::Goodbye,
        ];
        for body in bodies {
            assert_eq!(round_trip(&a, &body).unwrap(), body);
        }
    }

    #[test]
    fn a_node_speaks_only_for_itself() {
        let (a, b) = (peer(), peer());
        let announce = Body::Announce {
            info: info(&a),
            listen: vec![],
        };
        assert!(matches!(round_trip(&b, &announce), Err(Invalid::Field(_))));
        let plan = Body::Plan(plan(&a, &[(&a, 0..4)]));
        assert!(matches!(round_trip(&b, &plan), Err(Invalid::Field(_))));
        assert!(matches!(
            decode(None, &encode(&Body::Goodbye).unwrap()),
            Err(Invalid::Unsigned)
        ));
    }

    #[test]
    fn other_versions_and_unknown_fields() {
        let a = peer();
        let v2 = br#"{"v":2,"body":"goodbye"}"#;
        assert!(matches!(decode(Some(&a), v2), Err(Invalid::Version(2))));
        let extra = br#"{"v":1,"body":"goodbye","future":[1,2,3]}"#;
        assert_eq!(decode(Some(&a), extra).unwrap().1, Body::Goodbye);
    }

    #[test]
    fn malformed_plans_are_rejected() {
        let (a, b) = (peer(), peer());
        let bad = [
            plan(&a, &[]),
            plan(&a, &[(&a, 1..4)]),
            plan(&a, &[(&a, 0..4), (&b, 5..8)]),
            plan(&a, &[(&a, 0..4), (&b, 4..4)]),
            plan(&a, &[(&a, 0..4), (&a, 4..8)]),
            plan(&a, &[(&a, 0..MAX_LAYERS + 1)]),
            Plan {
                epoch: 0,
                ..plan(&a, &[(&a, 0..4)])
            },
            Plan {
                epoch: MAX_EPOCH + 1,
                ..plan(&a, &[(&a, 0..4)])
            },
            Plan {
                model_id: String::new(),
                ..plan(&a, &[(&a, 0..4)])
            },
        ];
        for plan in bad {
            assert!(validate_plan(&plan).is_err(), "{plan:?}");
        }
        let mut odd_id = plan(&a, &[(&a, 0..4)]);
        odd_id.stages[0].node_id = "not-a-peer-id".into();
        assert!(validate_plan(&odd_id).is_err());
    }

    fn hop(to: &PeerId, interface: &str) -> HopReport {
        HopReport {
            to: to.to_base58(),
            addr: "10.1.0.2:7001".parse().unwrap(),
            interface: interface.into(),
            rtt_us: 60,
            bytes_per_second: 1_000_000_000,
        }
    }

    #[test]
    fn malformed_node_infos_are_rejected() {
        let a = peer();
        let bad = [
            NodeInfo {
                backend: "c p u".into(),
                ..info(&a)
            },
            NodeInfo {
                model_id: "x".repeat(MAX_MODEL_ID_BYTES + 1),
                ..info(&a)
            },
            NodeInfo {
                ready_epoch: Some(u64::MAX),
                ..info(&a)
            },
            NodeInfo {
                data_addr: "0.0.0.0:7001".parse().unwrap(),
                ..info(&a)
            },
            NodeInfo {
                node_id: format!("{}x", a.to_base58()),
                ..info(&a)
            },
            NodeInfo {
                data_paths: vec!["10.0.0.1:7001".parse().unwrap(); MAX_LISTEN_ADDRS + 1],
                ..info(&a)
            },
            NodeInfo {
                data_paths: vec!["0.0.0.0:7001".parse().unwrap()],
                ..info(&a)
            },
            NodeInfo {
                hops: vec![hop(&a, "eth1"); MAX_HOPS + 1],
                ..info(&a)
            },
            NodeInfo {
                prepared: Some(4..4),
                ..info(&a)
            },
            NodeInfo {
                prepared: Some(0..MAX_LAYERS + 1),
                ..info(&a)
            },
            NodeInfo {
                hops: vec![hop(&a, "eth1\n[fake log line]")],
                ..info(&a)
            },
            NodeInfo {
                hops: vec![hop(&a, &"x".repeat(MAX_INTERFACE_NAME_BYTES + 1))],
                ..info(&a)
            },
            NodeInfo {
                hops: vec![HopReport { to: "not-a-peer-id".into(), ..hop(&a, "eth1") }],
                ..info(&a)
            },
        ];
        let good = NodeInfo {
            data_paths: vec!["10.0.0.1:7001".parse().unwrap(), "10.1.0.1:7001".parse().unwrap()],
            hops: vec![hop(&peer(), "eth1")],
            ..info(&a)
        };
        assert!(validate_node_info(&good).is_ok());
        for info in bad {
            assert!(validate_node_info(&info).is_err(), "{info:?}");
        }
        let too_many = Body::Announce {
            info: info(&a),
            listen: vec!["127.0.0.1:4001".parse().unwrap(); MAX_LISTEN_ADDRS + 1],
        };
        assert!(round_trip(&a, &too_many).is_err());
    }

    #[test]
    fn oversized_messages_are_rejected_before_decoding() {
        let data = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            decode(Some(&peer()), &data),
            Err(Invalid::TooLarge(_))
        ));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(Some(&PeerId::random()), &data);
        }

        /// Valid messages with one byte changed: near misses reach deeper checks than
        /// random bytes do.
        #[test]
        fn corrupted_messages_never_panic(index in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let a = PeerId::random();
            let body = Body::Plan(plan(&a, &[(&a, 0..10), (&PeerId::random(), 10..24)]));
            let mut data = encode(&body).unwrap();
            let i = index.index(data.len());
            data[i] = byte;
            let _ = decode(Some(&a), &data);
        }
    }
}
