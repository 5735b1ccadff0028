//! The control plane: a libp2p swarm over which the nodes of a cluster gossip who they
//! are, notice who has gone, and learn the coordinator's plan.
//!
//! Each node is identified by its Ed25519 key; its node id is the base58 string of the
//! libp2p `PeerId` derived from it. Connections are TCP, encrypted and authenticated
//! with Noise, multiplexed with yamux; with a cluster key, a private network layer keyed
//! by it sits between TCP and Noise, so peers without the key cannot even complete the
//! Noise handshake. On top of them run:
//!
//! - **gossipsub** on one topic per cluster, derived from the cluster hash, so clusters
//!   sharing a network never see each other's messages. Every message is signed by its
//!   author and checked ([`ValidationMode::Strict`](libp2p::gossipsub::ValidationMode)),
//!   so a message's source is authenticated; a node may only speak for itself.
//! - **ping** every 200 ms on every connection; a connection that answers none for a
//!   second is closed, so a peer that falls silent is dropped within about a second
//!   even when its TCP connection stays up.
//!
//! # Membership
//!
//! Every node announces its [`NodeInfo`] every 500 ms and whenever it changes. A peer
//! is a member from its first valid announcement until it says goodbye (a clean
//! shutdown), its last direct connection closes or fails a ping, or — for a peer heard
//! only through others — 1.5 s pass without an announcement. Nodes connect to every
//! member they hear of, so a cluster dialled together as a chain becomes fully
//! connected and every drop is seen directly. Nodes serving another model are not
//! members: nodes only cluster for the same model.
//!
//! # Coordination
//!
//! The coordinator is the member with the smallest node id (see
//! [`crate::coordinator`]). Only its plans are taken, and only when newer than the
//! plan in force; it repeats its plan every 500 ms so that nodes joining late, or
//! that missed it, converge.

mod membership;
mod one_way;
mod pnet;
mod swarm;
pub(crate) mod wire;

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use membership::Membership;
pub(crate) use wire::MAX_EPOCH;

/// The most data-plane addresses a node may announce ([`NodeInfo::data_paths`]); peers
/// refuse announcements listing more.
pub const MAX_DATA_PATHS: usize = 16;

/// What every node gossips about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The base58 libp2p `PeerId` of the node's key.
    pub node_id: String,
    /// The gRPC data plane.
    pub data_addr: SocketAddr,
    /// The OpenAI-compatible HTTP API.
    pub api_addr: SocketAddr,
    /// Memory the node offers for model layers, OS reserve already taken off.
    pub usable_memory_bytes: u64,
    /// `"cpu"`, `"metal"` or `"cuda"`; kept a string so that a node with a newer
    /// backend is still understood.
    pub backend: String,
    /// Nodes only cluster with nodes serving the same model.
    pub model_id: String,
    /// The newest plan epoch whose layers this node has loaded; at most 2^53.
    pub ready_epoch: Option<u64>,
    /// The epoch of the plan this node follows, loaded or still loading; at most 2^53.
    /// The node ignores plans with lower epochs, so a coordinator plans above it.
    #[serde(default)]
    pub following_epoch: Option<u64>,
    /// Every address the data plane is reachable on (one per interface), `data_addr`
    /// among them: peers probe each and use the best.
    #[serde(default)]
    pub data_paths: Vec<SocketAddr>,
    /// The paths this node's data plane uses to reach its peers, as it measured them.
    #[serde(default)]
    pub hops: Vec<HopReport>,
    /// Layers a node outside the plan in force has loaded for the plan that will take
    /// it in: the coordinator waits for a newcomer to be prepared, so the plan in force
    /// serves while the newcomer loads (or fetches) its layers.
    #[serde(default)]
    pub prepared: Option<Range<usize>>,
}

/// One measured path from a node to a peer, as the node reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopReport {
    /// The peer's node id.
    pub to: String,
    /// The peer's data-plane address the path goes to.
    pub addr: SocketAddr,
    /// The local interface it leaves by (empty if unknown).
    pub interface: String,
    /// Round-trip time of a small frame, in microseconds (the best of the recent ones).
    pub rtt_us: u64,
    /// Throughput of an activation-sized burst, in bytes per second (0 until measured).
    pub bytes_per_second: u64,
}

/// The pipeline the coordinator decided on: which node runs which layers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Increases with every plan, from 1 to at most 2^53; a node never goes back to
    /// an older one.
    pub epoch: u64,
    /// The node id of the coordinator that published the plan.
    pub coordinator: String,
    pub model_id: String,
    /// In pipeline order; the layer ranges are contiguous, start at 0 and are never
    /// empty.
    pub stages: Vec<PlanStage>,
}

/// One node's part of a [`Plan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStage {
    pub node_id: String,
    /// Where the previous stage sends its activations.
    pub data_addr: SocketAddr,
    pub layers: Range<usize>,
}

/// How to start the control plane.
#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// The node's identity; the node id is derived from it.
    pub keypair: libp2p_identity::Keypair,
    /// Where to accept connections; port 0 picks a free port.
    pub listen: SocketAddr,
    /// The cluster's hash as discovery advertises it. The gossip topic is derived from
    /// it, so clusters never see each other's messages.
    pub cluster_hash: String,
    /// With a key, the control plane is a private network keyed by it: only peers
    /// holding the same key can connect. Without one, anyone on the link can.
    pub cluster_key: Option<crate::cluster_key::ClusterKey>,
}

/// What the control plane tells its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlEvent {
    /// The live membership changed. Always includes this node; sorted by node id.
    ///
    /// Each event is the whole membership, so when the receiver falls behind, older
    /// snapshots are replaced by the newest rather than queued.
    Members(Vec<NodeInfo>),
    /// The coordinator (possibly this node) published a plan newer than any before.
    Plan(Plan),
}

/// Why the control plane could not start or refused a request.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the node key cannot be used for the control plane: {0}")]
    Key(String),

    #[error("the node id {given} is not the id of the node's key ({derived})")]
    NodeIdMismatch { given: String, derived: String },

    #[error("invalid node info: {0}")]
    InvalidNodeInfo(String),

    #[error("invalid plan: {0}")]
    InvalidPlan(String),

    #[error("could not set up the control plane: {0}")]
    Setup(#[source] Box<dyn std::error::Error + Send + Sync>),

    #[error("could not listen for control connections on {addr}: {reason}")]
    Listen { addr: SocketAddr, reason: String },

    #[error("the control plane has stopped")]
    Stopped,
}

/// A handle on the running control plane; clones share it.
///
/// Dropping every handle stops the control plane abruptly, without a goodbye, as a
/// crash would; [`ControlPlane::shutdown`] leaves the cluster cleanly.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    node_id: Arc<str>,
    // Unbounded because the callers are this node's own code, which sends a handful of
    // commands; a bounded queue would force the synchronous methods to drop commands.
    commands: mpsc::UnboundedSender<Command>,
}

/// What a handle asks of the swarm task.
#[derive(Debug)]
enum Command {
    Dial(SocketAddr),
    UpdateMe(NodeInfo),
    PublishPlan(Plan),
    Shutdown(oneshot::Sender<()>),
}

/// Events waiting for the receiver; few, because older snapshots are replaced.
const EVENT_CAPACITY: usize = 16;

impl ControlPlane {
    /// Starts the control plane on the current tokio runtime.
    ///
    /// Returns the handle, the events (starting with a [`ControlEvent::Members`] of
    /// this node alone), and the address it listens on (with the actual port when
    /// `config.listen` asked for port 0).
    ///
    /// # Errors
    ///
    /// If the key is unusable or not the key of `me.node_id`, if `me` is not valid
    /// gossip, or if the address cannot be listened on.
    pub async fn start(
        config: ControlConfig,
        me: NodeInfo,
    ) -> Result<(Self, mpsc::Receiver<ControlEvent>, SocketAddr), ControlError> {
        let keypair = swarm::convert_keypair(&config.keypair)?;
        let derived = keypair.public().to_peer_id().to_base58();
        if me.node_id != derived {
            return Err(ControlError::NodeIdMismatch {
                given: me.node_id,
                derived,
            });
        }
        wire::validate_node_info(&me).map_err(|e| ControlError::InvalidNodeInfo(e.to_string()))?;

        let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let node_id: Arc<str> = Arc::from(me.node_id.as_str());
        let listen = swarm::spawn(keypair, &config, me, commands_rx, events_tx).await?;
        let plane = Self {
            node_id,
            commands: commands_tx,
        };
        Ok((plane, events_rx, listen))
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Connects to a control plane at `addr`, e.g. one found by discovery or given
    /// with `--peer`. Dialling an address already connected or being dialled does
    /// nothing; failures are logged, and the membership shows who was reached.
    pub fn dial(&self, addr: SocketAddr) {
        // A stopped control plane has nobody to connect for.
        let _ = self.commands.send(Command::Dial(addr));
    }

    /// Replaces what this node announces about itself, e.g. when `ready_epoch`
    /// changes; the cluster hears of it at once.
    ///
    /// # Errors
    ///
    /// If `me` is not this node or not valid gossip, or the control plane stopped.
    pub fn update_me(&self, me: NodeInfo) -> Result<(), ControlError> {
        if me.node_id != *self.node_id {
            return Err(ControlError::NodeIdMismatch {
                given: me.node_id,
                derived: self.node_id.to_string(),
            });
        }
        wire::validate_node_info(&me).map_err(|e| ControlError::InvalidNodeInfo(e.to_string()))?;
        self.send(Command::UpdateMe(me))
    }

    /// Publishes a plan, normally one from [`crate::coordinator::next_plan`].
    ///
    /// The plan is published only if this node is the coordinator and the plan is
    /// newer than the one in force; otherwise it is dropped with a warning, since
    /// every other node would ignore it too. A published plan also comes back as a
    /// [`ControlEvent::Plan`].
    ///
    /// # Errors
    ///
    /// If the plan is not this node's or not valid gossip, or the control plane
    /// stopped.
    pub fn publish_plan(&self, plan: Plan) -> Result<(), ControlError> {
        if plan.coordinator != *self.node_id {
            return Err(ControlError::InvalidPlan(format!(
                "its coordinator is {}, not this node",
                plan.coordinator
            )));
        }
        wire::validate_plan(&plan).map_err(|e| ControlError::InvalidPlan(e.to_string()))?;
        self.send(Command::PublishPlan(plan))
    }

    /// Leaves the cluster: tells the other nodes goodbye, so they drop this node at
    /// once, then closes every connection. Other handles stop working.
    pub async fn shutdown(self) {
        let (done_tx, done_rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(done_tx)).is_ok() {
            // An error means the task is already gone, which is what we want.
            let _ = done_rx.await;
        }
    }

    fn send(&self, command: Command) -> Result<(), ControlError> {
        self.commands
            .send(command)
            .map_err(|_| ControlError::Stopped)
    }
}
