//! The node in its cluster: it finds its peers, follows the coordinator's plan, loads the
//! layers the plan gives it, and tells the request holder which pipeline to use.
//!
//! One task owns all of this state and reacts to three sources: discovery (new peers to
//! connect to), the control plane (membership and plans), and its own layer loads.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use candle_core::Device;
use hearth_mesh::cluster_key::ClusterKey;
use hearth_mesh::control::{ControlConfig, ControlEvent, ControlPlane, HopReport, NodeInfo, Plan, MAX_DATA_PATHS};
use hearth_mesh::coordinator::{next_plan, plan_is_ready, prospective_layers};
use hearth_mesh::discovery::{
    local_addresses, primary_address, Backend, ClusterHash, Discovery, DiscoveryConfig, DiscoveryEvent, InterfacePolicy, ManualPeer,
    PeerAdvert,
};
use hearth_mesh::identity::{duplicate_id_error, Identity};
use hearth_mesh::{format_bytes, ModelProfile};
use hearth_models::{ModelSource, Stage};
use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::data_plane::{DataPlane, Neighbour, StageRole};
use crate::holder::Route;
use crate::paths::{PathView, Paths};
use crate::weights::NodeModel;

/// Membership must hold still this long before the coordinator plans: nodes that start
/// together find each other within about a second, and each plan costs a layer load.
const SETTLE: Duration = Duration::from_millis(600);
/// Before its first plan a node waits longer: an existing node takes about a second to see
/// a newcomer on mDNS, and a node that planned alone would load every layer it can hold.
const FIRST_SETTLE: Duration = Duration::from_millis(2000);
/// How long a node that coordinates but has no plan waits to hear the plan its peers
/// serve (its author repeats it every 500 ms) before planning without it.
const PLAN_IN_FORCE_WAIT: Duration = Duration::from_millis(1500);
/// How often manually given peers are dialled again, in case they started later.
const REDIAL: Duration = Duration::from_secs(2);
/// How often this node's measured paths are gossiped again when no choice changed: the
/// figures drift, and peers' `hearth status` should not show stale ones for long.
const HOP_REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// How often this node looks at its interfaces for an address that came, went or moved
/// (a link up after start, a new DHCP lease, Wi-Fi traded for Ethernet): one cheap
/// `getifaddrs` (tens of microseconds), the same on every OS, so a move is announced
/// within a quarter of a second.
const INTERFACE_LOOK: Duration = Duration::from_millis(250);
/// The first and the longest wait between attempts to listen for control connections.
const LISTEN_RETRY_FIRST: Duration = Duration::from_millis(250);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(5);

/// How this node joins its cluster.
pub struct ClusterOptions {
    pub cluster_name: String,
    pub data_dir: PathBuf,
    pub control_listen: SocketAddr,
    pub peers: Vec<ManualPeer>,
    pub interfaces: InterfacePolicy,
    /// Advertise and browse with mDNS; without it only `peers` are joined.
    pub mdns: bool,
    pub usable_memory_bytes: u64,
    pub backend: Backend,
    /// The address the API listens on, announced to peers for `hearth status`.
    pub api_addr: SocketAddr,
    /// With a key, the control plane is a private network only its holders can join.
    pub cluster_key: Option<ClusterKey>,
}

/// The cluster as `GET /v1/cluster` and `hearth status` show it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterView {
    pub epoch: u64,
    pub coordinator: Option<String>,
    /// Every stage of the plan has loaded its layers.
    pub ready: bool,
    /// This node's id.
    pub node: String,
    /// Why the cluster cannot serve, when it cannot.
    pub problem: Option<String>,
    /// Plan stages in pipeline order, then live members without layers.
    pub nodes: Vec<NodeView>,
    /// The plan's hops, in pipeline order (the last one goes from the last stage back
    /// round to the first), with the path each uses as its sender measured it.
    pub hops: Vec<HopView>,
    /// Every path from this node to its peers, measured.
    pub paths: Vec<PathView>,
}

/// One hop of the pipeline and the path it takes.
#[derive(Debug, Clone, Serialize)]
pub struct HopView {
    pub from: String,
    pub to: String,
    /// `None` until the sender has reported its path.
    pub path: Option<HopReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeView {
    pub id: String,
    /// The data plane address: where the previous stage sends hidden states.
    pub addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub usable_memory_bytes: u64,
    pub backend: String,
    /// `[start, end)`, or `null` for a member the plan leaves out.
    pub layers: Option<[usize; 2]>,
    /// The node has loaded its layers of the current plan.
    pub ready: bool,
}

/// What the rest of the node reads from the cluster.
pub struct ClusterHandles {
    pub routes: watch::Receiver<Option<Route>>,
    pub view: watch::Receiver<ClusterView>,
    pub node_id: String,
}

/// Joins the cluster and keeps following it until the process ends.
pub async fn join(
    options: ClusterOptions,
    model: NodeModel,
    device: Device,
    data_plane: DataPlane,
) -> anyhow::Result<ClusterHandles> {
    let identity = Identity::load_or_create(&options.data_dir)
        .with_context(|| format!("loading this node's identity from {}", options.data_dir.display()))?;
    let node_id = identity.node_id().to_string();
    let cluster_hash = ClusterHash::of(&options.cluster_name);
    let host = primary_address(&options.interfaces);
    let bound = Bound { data: data_plane.addr(), api: options.api_addr };
    if host.is_none() && bound.data.ip().is_unspecified() {
        tracing::warn!(
            "no usable network interface yet (only loopback): serving alone; peers can join as soon as one comes up"
        );
    }
    let (data_addr, api_addr) = bound.announced(host);
    let data_paths = data_paths(bound.data, data_addr, &options.interfaces);
    let me = NodeInfo {
        node_id: node_id.clone(),
        data_addr,
        api_addr,
        usable_memory_bytes: options.usable_memory_bytes,
        backend: options.backend.as_str().to_string(),
        model_id: model.id().to_string(),
        ready_epoch: None,
        following_epoch: None,
        data_paths,
        hops: Vec::new(),
        prepared: None,
    };
    let config = ControlConfig {
        keypair: identity.keypair().clone(),
        listen: options.control_listen,
        cluster_hash: cluster_hash.to_string(),
        cluster_key: options.cluster_key.clone(),
    };
    let (control, control_events, control_addr) = start_control_plane(config, &me).await?;
    tracing::info!(
        node = %node_id,
        cluster = %options.cluster_name,
        %data_addr,
        control = %control_addr,
        memory = %format_bytes(options.usable_memory_bytes),
        "joining the cluster"
    );

    let advert = PeerAdvert {
        node_id: identity.node_id(),
        addresses: Vec::new(),
        control_port: control_addr.port(),
        data_port: data_addr.port(),
        api_port: api_addr.port(),
        usable_memory_bytes: options.usable_memory_bytes,
        backend: options.backend,
        cluster_hash,
    };
    let discovery = DiscoveryConfig { interfaces: options.interfaces.clone(), ..DiscoveryConfig::default() };
    let started = if options.mdns { Some(Discovery::start(advert, discovery)) } else { None };
    let (discovery, discovery_events) = match started {
        Some(Ok((discovery, events))) => (Some(discovery), events),
        Some(Err(error)) => {
            tracing::warn!("mDNS discovery is off ({error}); only --peer addresses will be joined");
            (None, mpsc::channel(1).1)
        }
        None => (None, mpsc::channel(1).1),
    };

    let (route_tx, routes) = watch::channel(None);
    let (view_tx, view) = watch::channel(ClusterView { node: node_id.clone(), ..ClusterView::default() });
    let profile = model.source().map(|source| model_profile(&source, &device));
    let paths = Paths::start(data_plane.credentials(), data_plane.limits(), options.interfaces.clone());
    let (prepared_tx, prepared_rx) = mpsc::channel(1);
    let node = Node {
        me,
        control,
        model,
        device,
        data_plane,
        profile,
        members: Vec::new(),
        plan: None,
        route_tx,
        view_tx,
        problem: None,
        seen: std::collections::HashMap::new(),
        seen_data: std::collections::HashMap::new(),
        paths,
        prepared: None,
        preparing: None,
        prepared_tx,
        awaiting_plan_since: None,
        bound,
        interfaces: options.interfaces.clone(),
        host,
        _discovery: discovery,
    };
    tokio::spawn(node.run(control_events, discovery_events, prepared_rx, options.peers));
    Ok(ClusterHandles { routes, view, node_id })
}

/// Starts the control plane, trying again with backoff while its address cannot be
/// listened on (a network still coming up, a port not yet released by a process that
/// just ended): a node started at login must not give up before the network is there.
async fn start_control_plane(
    config: ControlConfig,
    me: &NodeInfo,
) -> anyhow::Result<(ControlPlane, mpsc::Receiver<ControlEvent>, SocketAddr)> {
    let mut wait = LISTEN_RETRY_FIRST;
    loop {
        match ControlPlane::start(config.clone(), me.clone()).await {
            Err(error @ hearth_mesh::control::ControlError::Listen { .. }) => {
                tracing::warn!("{error}; trying again in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(LISTEN_RETRY_MAX);
            }
            started => return started.context("starting the control plane"),
        }
    }
}

/// Where this node's data plane and API listen.
#[derive(Debug, Clone, Copy)]
struct Bound {
    data: SocketAddr,
    api: SocketAddr,
}

impl Bound {
    /// Where peers can connect, given this host's address on the network (`None` while it
    /// has none): each bound address, or the host's address when bound to every
    /// interface. With no such address the node is alone, and names loopback, which only
    /// it can use, until one comes.
    fn announced(self, host: Option<IpAddr>) -> (SocketAddr, SocketAddr) {
        let host = host.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let announce = |bound: SocketAddr| match bound.ip() {
            ip if ip.is_unspecified() => SocketAddr::new(host, bound.port()),
            _ => bound,
        };
        (announce(self.data), announce(self.api))
    }
}

/// Every address peers can reach the data plane on: each admitted interface's address
/// when bound to all of them, else the one bound address.
fn data_paths(bound: SocketAddr, announced: SocketAddr, interfaces: &InterfacePolicy) -> Vec<SocketAddr> {
    let mut paths = vec![announced];
    if bound.ip().is_unspecified() {
        for (_, ip) in local_addresses(interfaces) {
            let addr = SocketAddr::new(ip, bound.port());
            if !paths.contains(&addr) && paths.len() < MAX_DATA_PATHS {
                paths.push(addr);
            }
        }
    }
    paths
}

/// The placement profile of the model: what each part costs in memory. Each layer's KV
/// cache is counted with its weights, since a sliding layer's (Gemma 3) is bounded by its
/// window rather than the context.
fn model_profile(source: &ModelSource, device: &Device) -> ModelProfile {
    let footprint = source.footprint(device);
    let context_tokens = source.config().context_length as u64;
    let layer_bytes = footprint
        .layer_bytes
        .iter()
        .zip(footprint.kv_bytes_per_layer(context_tokens))
        .map(|(&weights, kv)| weights.saturating_add(kv))
        .collect();
    ModelProfile {
        num_layers: source.config().num_layers,
        layer_bytes,
        embedding_bytes: footprint.embedding_bytes,
        head_bytes: footprint.head_bytes,
        kv_bytes_per_token_per_layer: 0,
        context_tokens,
    }
}

/// Layers being loaded for the next plan, and the task loading them.
struct Preparing {
    layers: Range<usize>,
    task: tokio::task::AbortHandle,
}

/// What a preparation task reports: the layers it loaded, or why it could not.
type PreparedStage = (Range<usize>, anyhow::Result<Stage>);

struct Node {
    me: NodeInfo,
    control: ControlPlane,
    model: NodeModel,
    device: Device,
    data_plane: DataPlane,
    /// `None` while a node without the model file waits for its header from a peer.
    profile: Option<ModelProfile>,
    members: Vec<NodeInfo>,
    plan: Option<Plan>,
    route_tx: watch::Sender<Option<Route>>,
    view_tx: watch::Sender<ClusterView>,
    problem: Option<String>,
    /// Control addresses of the peers mDNS has found, by node id.
    seen: std::collections::HashMap<String, Vec<SocketAddr>>,
    /// Data-plane addresses of the peers mDNS has found, by node id.
    seen_data: std::collections::HashMap<String, Vec<SocketAddr>>,
    /// The measured paths to every peer.
    paths: Paths,
    /// Outside the plan in force: the layers loaded for the plan that will take this node
    /// in (`me.prepared` says which).
    prepared: Option<Stage>,
    /// The layers being loaded (or fetched) for that plan, on a task of their own, so that
    /// the node keeps following the cluster meanwhile: a fetch of many GB takes minutes, and
    /// this node may be the one that must re-plan if a node drops in the meantime.
    preparing: Option<Preparing>,
    /// Where preparation tasks report.
    prepared_tx: mpsc::Sender<PreparedStage>,
    /// Since when this node, coordinating without a plan, has waited for its peers' plan.
    awaiting_plan_since: Option<tokio::time::Instant>,
    /// Where the data plane and API listen, the interfaces this node may use, and the
    /// host address it last announced them on (`None`: it had none).
    bound: Bound,
    interfaces: InterfacePolicy,
    host: Option<IpAddr>,
    /// Kept alive for as long as the node runs: dropping it says goodbye on mDNS.
    _discovery: Option<Discovery>,
}

impl Node {
    async fn run(
        mut self,
        mut control_events: mpsc::Receiver<ControlEvent>,
        mut discovery_events: mpsc::Receiver<DiscoveryEvent>,
        mut prepared: mpsc::Receiver<PreparedStage>,
        peers: Vec<ManualPeer>,
    ) {
        let mut redial = tokio::time::interval(REDIAL);
        let mut path_changes = self.paths.changes();
        let mut report_hops = tokio::time::interval(HOP_REPORT_INTERVAL);
        let mut look_at_interfaces = tokio::time::interval(INTERFACE_LOOK);
        let settle = tokio::time::sleep(FIRST_SETTLE);
        tokio::pin!(settle);
        let mut settling = true;
        loop {
            tokio::select! {
                event = control_events.recv() => match event {
                    Some(ControlEvent::Members(members)) => {
                        self.members = members;
                        self.learn_model().await;
                        self.update_paths();
                        self.prepare();
                        // Alone and planless, wait for peers; once there are peers or a plan,
                        // the usual settling time (each change restarts it).
                        let alone = self.plan.is_none() && self.members.len() <= 1;
                        let wait = if alone { FIRST_SETTLE } else { SETTLE };
                        settle.as_mut().reset(tokio::time::Instant::now() + wait);
                        settling = true;
                        self.publish_view();
                    }
                    Some(ControlEvent::Plan(plan)) => self.follow(plan).await,
                    None => {
                        tracing::error!("the control plane stopped");
                        return;
                    }
                },
                Some(event) = discovery_events.recv() => self.discovered(event),
                Some((layers, stage)) = prepared.recv() => self.preparation_done(layers, stage),
                _ = redial.tick() => {
                    self.redial(&peers).await;
                    // A node without the model tries again for its header.
                    if self.learn_model().await {
                        self.prepare();
                        if !settling {
                            self.plan_if_coordinator();
                        }
                    } else if !settling && self.plan.is_none() {
                        // Still waiting for the plan peers serve, or done waiting.
                        self.plan_if_coordinator();
                    }
                }
                Ok(()) = path_changes.changed() => {
                    self.report_hops();
                    self.publish_view();
                }
                _ = report_hops.tick() => self.report_hops(),
                _ = look_at_interfaces.tick() => self.follow_interfaces(),
                () = &mut settle, if settling => {
                    settling = false;
                    self.plan_if_coordinator();
                }
            }
        }
    }

    fn discovered(&mut self, event: DiscoveryEvent) {
        match event {
            DiscoveryEvent::Found(advert) => {
                let addresses: Vec<SocketAddr> =
                    advert.addresses.iter().map(|ip| SocketAddr::new(*ip, advert.control_port)).collect();
                addresses.iter().for_each(|addr| self.control.dial(*addr));
                let data = advert.addresses.iter().map(|ip| SocketAddr::new(*ip, advert.data_port)).collect();
                self.seen.insert(advert.node_id.to_string(), addresses);
                self.seen_data.insert(advert.node_id.to_string(), data);
                self.update_paths();
            }
            // The node said goodbye: stop dialling it. (Departures without a goodbye are
            // the control plane's to notice, faster than mDNS.)
            DiscoveryEvent::Lost(node_id) => {
                self.seen.remove(&node_id.to_string());
                self.seen_data.remove(&node_id.to_string());
            }
            DiscoveryEvent::DuplicateId { addresses } => {
                let ours: Vec<IpAddr> = vec![self.me.data_addr.ip()];
                let id = hearth_mesh::NodeId(self.me.node_id.clone());
                tracing::error!("{}", duplicate_id_error(&id, &ours, &addresses));
            }
        }
    }

    /// Dials the --peer addresses, and the peers mDNS found that are not members now: a
    /// link that went down and came back leaves no new mDNS record to react to, so the
    /// halves of a healed partition find each other this way.
    async fn redial(&self, peers: &[ManualPeer]) {
        for (node_id, addresses) in &self.seen {
            if !self.members.iter().any(|member| &member.node_id == node_id) {
                addresses.iter().for_each(|addr| self.control.dial(*addr));
            }
        }
        for peer in peers {
            match peer.resolve().await {
                Ok(addresses) => addresses.into_iter().for_each(|addr| self.control.dial(addr)),
                Err(error) => tracing::warn!("cannot resolve --peer {:?} port {}: {error}", peer.host(), peer.port()),
            }
        }
    }

    /// Tells the path prober every address each member's data plane can be reached on:
    /// what the member lists itself, and what mDNS found for it.
    fn update_paths(&self) {
        let peers: Vec<&NodeInfo> = self.members.iter().filter(|m| m.node_id != self.me.node_id).collect();
        for member in &peers {
            let mut addresses = member.data_paths.clone();
            if let Some(found) = self.seen_data.get(&member.node_id) {
                addresses.extend(found.iter().filter(|addr| addr.port() == member.data_addr.port()));
            }
            self.paths.set_peer(&member.node_id, member.data_addr, &addresses);
        }
        let ids: Vec<&str> = peers.iter().map(|m| m.node_id.as_str()).collect();
        self.paths.retain(&ids);
    }

    /// Announces this node's new addresses when its interfaces changed: peers then reach
    /// its data plane at the new address (the coordinator re-plans for a moved data plane,
    /// and requests in flight are replayed as after a link failure), and a node that
    /// started before its network joins once the network is there.
    fn follow_interfaces(&mut self) {
        let host = primary_address(&self.interfaces);
        let data_paths = data_paths(self.bound.data, self.bound.announced(host).0, &self.interfaces);
        if host == self.host && data_paths == self.me.data_paths {
            return;
        }
        match (self.host, host) {
            (None, Some(ip)) => tracing::info!(%ip, "a network interface came up: announcing this node on it"),
            (Some(old), Some(new)) if old != new => tracing::info!(%old, %new, "this node's address moved"),
            (Some(old), None) => tracing::warn!(%old, "no usable network interface left: serving alone until one returns"),
            _ => tracing::info!(paths = ?data_paths, "this node's network addresses changed"),
        }
        self.host = host;
        (self.me.data_addr, self.me.api_addr) = self.bound.announced(host);
        self.me.data_paths = data_paths;
        if let Err(error) = self.control.update_me(self.me.clone()) {
            tracing::warn!("cannot announce this node's new addresses: {error}");
        }
        self.publish_view();
    }

    /// Gossips the paths this node uses, when they changed.
    fn report_hops(&mut self) {
        let hops = self.paths.hops();
        if hops != self.me.hops {
            self.me.hops = hops;
            if let Err(error) = self.control.update_me(self.me.clone()) {
                tracing::debug!("cannot report the measured paths: {error}");
            }
        }
    }

    /// On the coordinator: publishes a new plan when the membership calls for one.
    fn plan_if_coordinator(&mut self) {
        let Some(profile) = &self.profile else { return };
        // Peers serve a plan this node has not heard yet (it just joined, and coordinates
        // by its id): wait a little for it, so as to join it rather than replace it blind.
        let others_serve =
            self.plan.is_none() && self.members.iter().any(|m| m.node_id != self.me.node_id && m.ready_epoch.is_some());
        if others_serve {
            let since = *self.awaiting_plan_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() < PLAN_IN_FORCE_WAIT {
                return;
            }
        }
        match next_plan(&self.me.node_id, &self.members, profile, self.plan.as_ref()) {
            Ok(Some(plan)) => {
                tracing::info!(epoch = plan.epoch, stages = plan.stages.len(), "publishing a new plan");
                if let Err(error) = self.control.publish_plan(plan) {
                    tracing::error!("cannot publish the plan: {error}");
                }
                self.problem = None;
            }
            // Not the coordinator, or nothing changed: whatever kept an earlier plan from
            // forming is the coordinator's to report now.
            Ok(None) => {
                if self.problem.take().is_some() {
                    self.publish_view();
                }
            }
            Err(error) => {
                tracing::error!("the cluster cannot hold the model: {error}");
                self.problem = Some(error.to_string());
                self.publish_view();
            }
        }
    }

    /// Takes up this node's part of a new plan: loads its layers (keeping the ones it
    /// already holds when the range is unchanged) and reports ready.
    async fn follow(&mut self, plan: Plan) {
        tracing::info!(epoch = plan.epoch, coordinator = %plan.coordinator, "following a new plan");
        // A plan exists, so the cluster holds the model again.
        self.problem = None;
        let position = plan.stages.iter().position(|stage| stage.node_id == self.me.node_id);
        self.plan = Some(plan.clone());
        // Before loading, which can take minutes: a coordinator whose plan this node now
        // ignores plans above this one at once, rather than wait for the load.
        self.me.following_epoch = Some(plan.epoch);
        if let Err(error) = self.control.update_me(self.me.clone()) {
            tracing::debug!("cannot announce the plan followed: {error}");
        }
        self.publish_view();
        let Some(index) = position else {
            // Left out: free the layers for good, and get ready for the plan that will
            // take this node in, if the members can hold it.
            drop(self.data_plane.uninstall().await);
            release_freed_memory();
            self.prepare();
            return;
        };
        let layers = plan.stages[index].layers.clone();
        let previous = self.data_plane.uninstall().await;
        let stage = match previous {
            Some(role) if role.stage.layers() == layers => role.stage,
            previous => {
                // Layers loaded ahead of this plan, if they are the ones it gives. One still
                // loading is stopped and loaded here instead (a fetch resumes from the
                // tensors it completed).
                self.stop_preparing();
                let prepared = self.prepared.take().filter(|stage| stage.layers() == layers);
                // Otherwise the new stage is made from the previous one: the layers both
                // ranges share move over, and only the others load.
                let previous = previous.and_then(|role| Arc::into_inner(role.stage));
                let loaded = match prepared {
                    Some(stage) => {
                        drop(previous);
                        Ok(stage)
                    }
                    None => self.loader(layers.clone(), previous).await,
                };
                release_freed_memory();
                match loaded {
                    Ok(stage) => Arc::new(stage),
                    Err(error) => {
                        tracing::error!("cannot load layers {layers:?}: {error:#}");
                        self.problem = Some(format!("{error:#}"));
                        self.publish_view();
                        return;
                    }
                }
            }
        };
        let neighbour = |stage: &hearth_mesh::control::PlanStage| {
            Neighbour::Path { node_id: stage.node_id.clone(), choice: self.paths.watch(&stage.node_id, stage.data_addr) }
        };
        let next = plan.stages.get(index + 1).map(neighbour);
        let first = if index == 0 { Neighbour::Local } else { neighbour(&plan.stages[0]) };
        if let Err(error) = self.data_plane.install(StageRole { epoch: plan.epoch, stage, next, first }).await {
            tracing::error!("cannot install the stage: {error:#}");
            return;
        }
        self.me.ready_epoch = Some(plan.epoch);
        self.me.prepared = None;
        if let Err(error) = self.control.update_me(self.me.clone()) {
            tracing::error!("cannot announce readiness: {error}");
        }
        self.publish_view();
    }

    /// Outside the plan in force: loads (or, without the model file, fetches) the layers
    /// the next plan will give this node, on a task of its own, and announces them once
    /// loaded ([`Node::preparation_done`]). The coordinator takes the node in only then, so the plan
    /// in force serves while it loads.
    fn prepare(&mut self) {
        let Some(profile) = &self.profile else { return };
        let Some(layers) = prospective_layers(&self.me.node_id, &self.members, profile, self.plan.as_ref()) else {
            return;
        };
        let loading = self.preparing.as_ref().is_some_and(|preparing| preparing.layers == layers);
        if self.me.prepared.as_ref() == Some(&layers) || loading {
            return;
        }
        // Prepared, or preparing, for another placement: of no use now.
        self.stop_preparing();
        self.prepared = None;
        release_freed_memory();
        let load = self.loader(layers.clone(), None);
        let report = self.prepared_tx.clone();
        let reported = layers.clone();
        let task = tokio::spawn(async move {
            let stage = load.await;
            let _ = report.send((reported, stage)).await;
        });
        self.preparing = Some(Preparing { layers, task: task.abort_handle() });
    }

    /// A preparation task finished: keeps and announces its layers, unless they are no
    /// longer the ones wanted.
    fn preparation_done(&mut self, layers: Range<usize>, stage: anyhow::Result<Stage>) {
        if self.preparing.as_ref().is_none_or(|preparing| preparing.layers != layers) {
            return;
        }
        self.preparing = None;
        match stage {
            Ok(stage) => {
                tracing::info!(?layers, "loaded the layers the next plan will give this node; the plan in force serves meanwhile");
                self.prepared = Some(stage);
                self.me.prepared = Some(layers);
                if let Err(error) = self.control.update_me(self.me.clone()) {
                    tracing::error!("cannot announce the prepared layers: {error}");
                }
            }
            // Tried again on the next change of members.
            Err(error) => tracing::error!("cannot load layers {layers:?} for the next plan: {error:#}"),
        }
    }

    fn stop_preparing(&mut self) {
        if let Some(preparing) = self.preparing.take() {
            preparing.task.abort();
        }
    }

    /// For a node without the model file: gets the header from a peer, if it has not yet.
    /// Returns whether the model just became known.
    async fn learn_model(&mut self) -> bool {
        if self.profile.is_some() {
            return false;
        }
        self.model.learn(&self.members, &self.me.node_id).await;
        self.profile = self.model.source().map(|source| model_profile(&source, &self.device));
        self.profile.is_some()
    }

    /// Loading `layers` (made from `previous`, if given: see `ModelSource::reshape_stage`),
    /// as a future of its own that borrows nothing from the node.
    fn loader(
        &self,
        layers: Range<usize>,
        previous: Option<Stage>,
    ) -> impl Future<Output = anyhow::Result<Stage>> + Send + 'static {
        let (model, plan, members) = (self.model.clone(), self.plan.clone(), self.members.clone());
        let (me, device) = (self.me.node_id.clone(), self.device.clone());
        async move {
            // A node without the model file fetches the stage's tensors from peers first.
            let source = model.for_stage(layers.clone(), plan.as_ref(), &members, &me).await?;
            let started = std::time::Instant::now();
            let kept = previous.as_ref().map(Stage::layers);
            let stage = tokio::task::spawn_blocking(move || match previous {
                Some(previous) => source.reshape_stage(previous, layers),
                None => source.load_stage(layers, &device),
            })
            .await??;
            let ms = started.elapsed().as_millis() as u64;
            tracing::info!(layers = ?stage.layers(), previous = ?kept, ms, "loaded layers");
            Ok(stage)
        }
    }

    /// Recomputes what the API shows and which pipeline requests take.
    fn publish_view(&self) {
        let member = |id: &str| self.members.iter().find(|m| m.node_id == id);
        let mut nodes = Vec::new();
        let mut ready = false;
        if let Some(plan) = &self.plan {
            ready = plan_is_ready(plan, &self.members);
            for stage in &plan.stages {
                let info = member(&stage.node_id);
                nodes.push(NodeView {
                    id: stage.node_id.clone(),
                    addr: stage.data_addr,
                    api_addr: info.map_or(stage.data_addr, |m| m.api_addr),
                    usable_memory_bytes: info.map_or(0, |m| m.usable_memory_bytes),
                    backend: info.map_or_else(String::new, |m| m.backend.clone()),
                    layers: Some([stage.layers.start, stage.layers.end]),
                    ready: info.is_some_and(|m| m.ready_epoch >= Some(plan.epoch)),
                });
            }
        }
        for info in &self.members {
            if !nodes.iter().any(|n| n.id == info.node_id) {
                nodes.push(NodeView {
                    id: info.node_id.clone(),
                    addr: info.data_addr,
                    api_addr: info.api_addr,
                    usable_memory_bytes: info.usable_memory_bytes,
                    backend: info.backend.clone(),
                    layers: None,
                    ready: false,
                });
            }
        }
        let route = match &self.plan {
            Some(plan) if ready => plan.stages.first().map(|first| {
                // A remote first stage is reached over its best path, as the stages are.
                let path = (first.node_id != self.me.node_id).then(|| self.paths.current(&first.node_id)).flatten();
                Route {
                    epoch: plan.epoch,
                    first_node: first.node_id.clone(),
                    first_stage: path.map_or(first.data_addr, |path| path.addr),
                    failovers: path.map_or(0, |path| path.failovers),
                }
            }),
            _ => None,
        };
        let hops = self.plan.as_ref().map_or_else(Vec::new, |plan| self.hops(plan));
        self.route_tx.send_if_modified(|current| {
            let changed = *current != route;
            *current = route;
            changed
        });
        self.view_tx.send_replace(ClusterView {
            epoch: self.plan.as_ref().map_or(0, |plan| plan.epoch),
            coordinator: self.plan.as_ref().map(|plan| plan.coordinator.clone()),
            ready,
            node: self.me.node_id.clone(),
            problem: self.problem.clone(),
            nodes,
            hops,
            paths: self.paths.view(),
        });
    }
}

impl Node {
    /// The plan's hops with the paths their senders report.
    fn hops(&self, plan: &Plan) -> Vec<HopView> {
        let stages = &plan.stages;
        let mut pairs: Vec<(&str, &str)> =
            stages.windows(2).map(|pair| (pair[0].node_id.as_str(), pair[1].node_id.as_str())).collect();
        if let (Some(first), Some(last)) = (stages.first(), stages.last()) {
            if stages.len() > 1 {
                pairs.push((&last.node_id, &first.node_id));
            }
        }
        pairs
            .into_iter()
            .map(|(from, to)| {
                let reports = if from == self.me.node_id {
                    &self.me.hops
                } else {
                    match self.members.iter().find(|m| m.node_id == from) {
                        Some(member) => &member.hops,
                        None => return HopView { from: from.into(), to: to.into(), path: None },
                    }
                };
                let path = reports.iter().find(|hop| hop.to == to).cloned();
                HopView { from: from.into(), to: to.into(), path }
            })
            .collect()
    }
}

/// Hands memory freed by dropped layers back to the operating system. glibc keeps large
/// freed blocks in its heap once it has raised its mmap threshold, so without this a node
/// whose share of layers shrank would go on holding its old share.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap pages; it is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
