//! The data plane: this node's stage of the current plan, linked to its neighbours by
//! long-lived gRPC streams.
//!
//! Tokens go round a ring. The node that holds a request sends its prompt to the first
//! stage; each stage runs its layers and streams the hidden states to the next; the last
//! stage samples and sends the token straight back to the first stage, which passes it to
//! the holder and embeds it for the next step. A token costs one hop per stage.
//!
//! Everything here runs on one dedicated thread with its own single-threaded runtime: the
//! gRPC server, the links to the neighbours and the model's forward passes. Wakeups across
//! threads cost far more than a stage's network hop on a fast link, so the tensor path
//! never leaves this thread.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use candle_core::Tensor;
use hearth_models::sampling::{Sampler, SamplerState, SamplingParams};
use hearth_models::{Stage, StageCache, StageInput, StageOutput};
use hearth_proto::frame::{
    Activation, DType, ErrorCode, Expect, FinishReason, Generation, HiddenStates, Prefill, Reset, StageError,
    StageFrame, Token,
};
use hearth_mesh::identity::Identity;
use hearth_proto::probe::{challenge_from_wire, ProbeAnswer};
use hearth_proto::{pb, FrameError, Limits};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{AuthedChannel, Credentials};
use crate::paths::Choice;
use crate::weights::WeightServer;

pub mod connections;

/// Frames waiting to go out on one link before the sender waits.
const LINK_BUFFER: usize = 64;

/// Where a neighbouring stage runs.
#[derive(Debug, Clone)]
pub enum Neighbour {
    /// On this node: frames stay in memory.
    Local,
    /// The data plane of the node `node_id`, at one fixed address.
    Remote { node_id: String, addr: SocketAddr },
    /// The data plane of the node `node_id`, over whichever of its paths
    /// [`crate::paths`] chooses; the link moves when the choice does, between two frames.
    Path { node_id: String, choice: watch::Receiver<Choice> },
}

impl Neighbour {
    fn is_remote(&self) -> bool {
        !matches!(self, Self::Local)
    }
}

/// This node's part in one plan.
pub struct StageRole {
    pub epoch: u64,
    /// Behind an `Arc` so that a step can run it while it changes the rest of the data
    /// plane (its sequences, its links).
    pub stage: Arc<Stage>,
    /// The next stage, or `None` when this is the last one.
    pub next: Option<Neighbour>,
    /// The first stage, where the last stage sends the tokens it samples.
    pub first: Neighbour,
}

/// A handle to the data plane thread.
#[derive(Clone)]
pub struct DataPlane {
    commands: mpsc::UnboundedSender<Command>,
    addr: SocketAddr,
    stats: Arc<DataPlaneStats>,
    limits: Limits,
    credentials: Option<Arc<Credentials>>,
    node_id: String,
    weights: WeightServer,
}

/// What the data plane has received, for `/health`: a node outside the cluster (no key,
/// wrong key) must show none accepted.
#[derive(Debug, Default)]
pub struct DataPlaneStats {
    /// Frames that passed validation and were acted on.
    pub frames_accepted: AtomicU64,
    /// Frames refused: malformed, over a limit, for another epoch, or with no stage here.
    pub frames_refused: AtomicU64,
}

enum Command {
    /// Run this stage from now on; sequences of the previous role are dropped.
    Install(Box<StageRole>, oneshot::Sender<()>),
    /// Hand this node's stage back (the plan moved on); replies with it so its layers can
    /// be reused.
    Uninstall(oneshot::Sender<Option<StageRole>>),
}

/// Something for the worker to do.
enum Work {
    Command(Command),
    /// A message from an inbound stream, with the way back to its sender.
    Inbound { message: pb::StageMessage, upstream: Upstream },
    /// A neighbour refused a frame of ours.
    Downstream(StageError),
    /// The connection of the link `link` broke (links that were replaced since are
    /// ignored: their sequences moved on).
    LinkBroke { link: u64, error: StageError },
    /// The path chosen for one of the links changed.
    PathChanged(Direction),
}

/// Which of the worker's links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// To the next stage.
    Next,
    /// From the last stage round to the first.
    Ring,
}

/// The reply direction of an inbound stream.
type Upstream = mpsc::UnboundedSender<Result<pb::StageMessage, Status>>;

impl DataPlane {
    /// Binds `listen` and starts the data plane thread. With `credentials` (a cluster
    /// key), peers must prove they hold the key, both ways (see [`crate::auth`]); with or
    /// without, it proves to probing peers that it is `identity`
    /// ([`crate::peer_identity`]).
    pub fn start(
        listen: SocketAddr,
        limits: Limits,
        credentials: Option<Arc<Credentials>>,
        identity: Identity,
    ) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(listen).with_context(|| format!("binding the data plane to {listen}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let (commands, command_rx) = mpsc::unbounded_channel();
        let stats = Arc::new(DataPlaneStats::default());
        let worker_stats = stats.clone();
        let worker_credentials = credentials.clone();
        let weights = WeightServer::default();
        let served_weights = weights.clone();
        let node_id = identity.node_id().to_string();
        std::thread::Builder::new()
            .name("hearth-data-plane".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::error!("cannot start the data plane runtime: {error}");
                        return;
                    }
                };
                let stats = worker_stats;
                runtime.block_on(run(listener, limits, worker_credentials, command_rx, stats, served_weights, identity));
            })
            .context("starting the data plane thread")?;
        Ok(Self { commands, addr, stats, limits, credentials, node_id, weights })
    }

    /// The node id it proves to peers.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The weights this node serves to peers that fetch them.
    pub fn weights(&self) -> &WeightServer {
        &self.weights
    }

    /// Counts of the frames received so far.
    pub fn stats(&self) -> &Arc<DataPlaneStats> {
        &self.stats
    }

    /// The frame limits it applies, which links to other nodes apply too.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// What it proves itself to other nodes with (with a cluster key).
    pub fn credentials(&self) -> Option<Arc<Credentials>> {
        self.credentials.clone()
    }

    /// The address the data plane listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes this node run `role`; returns once the role is in place.
    pub async fn install(&self, role: StageRole) -> anyhow::Result<()> {
        let (done, installed) = oneshot::channel();
        self.commands
            .send(Command::Install(Box::new(role), done))
            .map_err(|_| anyhow::anyhow!("the data plane has stopped"))?;
        installed.await.map_err(|_| anyhow::anyhow!("the data plane has stopped"))
    }

    /// Takes this node's stage out of service and returns it.
    pub async fn uninstall(&self) -> Option<StageRole> {
        let (done, role) = oneshot::channel();
        self.commands.send(Command::Uninstall(done)).ok()?;
        role.await.ok().flatten()
    }
}

async fn run(
    listener: std::net::TcpListener,
    limits: Limits,
    credentials: Option<Arc<Credentials>>,
    commands: mpsc::UnboundedReceiver<Command>,
    stats: Arc<DataPlaneStats>,
    weights: WeightServer,
    identity: Identity,
) {
    let (work, work_rx) = mpsc::unbounded_channel();
    let service = Service { work: work.clone(), weights, identity };
    let (auth, session_check) = crate::auth::server(credentials.clone());
    let server = InterceptedService::new(pb::pipeline_server::PipelineServer::new(service).with_limits(&limits), session_check);
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            tracing::error!("data plane listener: {error}");
            return;
        }
    };
    let incoming = connections::incoming(listener, connections::MAX_CONNECTIONS);
    tokio::spawn(async move {
        if let Err(error) = connections::server()
            .add_optional_service(auth)
            .add_service(server)
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!("data plane server stopped: {error}");
        }
    });
    let mut commands = commands;
    let forward = work.clone();
    tokio::spawn(async move {
        while let Some(command) = commands.recv().await {
            if forward.send(Work::Command(command)).is_err() {
                break;
            }
        }
    });
    Worker { role: None, sequences: HashMap::new(), next: None, ring: None, limits, credentials, work, stats }.run(work_rx).await;
}

/// The gRPC face of the data plane: every inbound stage message goes to the worker;
/// weight requests go to the weight server, which reads off this thread.
struct Service {
    work: mpsc::UnboundedSender<Work>,
    weights: WeightServer,
    /// What probes are answered with: a probe with a nonce gets this node's proof.
    identity: Identity,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::StageMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::pipeline_server::Pipeline for Service {
    type StreamStream = ResponseStream;
    type FetchWeightsStream = Pin<Box<dyn Stream<Item = Result<pb::WeightChunk, Status>> + Send>>;

    async fn stream(&self, request: Request<Streaming<pb::StageMessage>>) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let (upstream, replies) = mpsc::unbounded_channel();
        let work = self.work.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(message)) => {
                        if work.send(Work::Inbound { message, upstream: upstream.clone() }).is_err() {
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(status) => {
                        // Undecodable or over the size limit: refuse it to the sender's face.
                        tracing::warn!("refusing an inbound stream: {status}");
                        let _ = upstream.send(Err(status));
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(replies))))
    }

    async fn probe(&self, request: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeReply>, Status> {
        let request = request.into_inner();
        let proof = challenge_from_wire(&request)?.and_then(|nonce| crate::peer_identity::prove(&self.identity, &nonce));
        let received_bytes = request.payload.len() as u64;
        Ok(Response::new(ProbeAnswer { received_bytes, proof }.into_wire()))
    }

    async fn fetch_weights(&self, request: Request<pb::WeightRequest>) -> Result<Response<Self::FetchWeightsStream>, Status> {
        Ok(Response::new(Box::pin(self.weights.fetch(request.into_inner())?)))
    }
}

/// One sequence's state in this stage.
struct Sequence {
    cache: StageCache,
    /// Where refusals (and, on the first stage, tokens) for this sequence go.
    upstream: Upstream,
    /// The last stage's sampler and stopping rules.
    sampling: Option<(Sampler, Generation)>,
    /// On the first stage of a replay: the tokens generated before the failure, which go
    /// down the pipeline together once the first of them comes round.
    replay: Vec<u32>,
}

/// A replay's known tokens go down the pipeline in frames of this many steps, so that the
/// stages work on them at once, each on its own frame.
const STEPS_PER_FRAME: usize = 16;

/// A stream to a neighbour's data plane.
struct Link {
    stream: LinkStream,
    // What it takes to open the link again after its connection broke: a neighbour that
    // restarts into the same plan must be reachable again without a new plan.
    addr: SocketAddr,
    /// The neighbour's node id, which whatever answers at `addr` must prove.
    peer: String,
    limits: Limits,
    credentials: Option<Arc<Credentials>>,
    epoch: u64,
    work: mpsc::UnboundedSender<Work>,
    /// The chosen path, for a neighbour reached over measured paths.
    path: Option<watch::Receiver<Choice>>,
    /// The path's failover count when the link last moved.
    failovers: u64,
    /// Wakes the worker when the chosen path changes.
    watcher: Option<JoinHandle<()>>,
}

/// One gRPC stream of a link: a link moves to a new one when its path changes.
struct LinkStream {
    frames: mpsc::Sender<pb::StageMessage>,
    /// Tells this stream's failures from those of streams the link had before.
    id: u64,
    task: JoinHandle<()>,
}

impl LinkStream {
    /// Opens a stream to the node `peer` at `addr`. Messages queue until the connection
    /// is up and the other end has proved it is `peer`; refusals and failures (another
    /// node answering included) come back to the worker as [`Work::Downstream`] and
    /// [`Work::LinkBroke`].
    fn open(
        addr: SocketAddr,
        peer: &str,
        limits: Limits,
        credentials: Option<Arc<Credentials>>,
        epoch: u64,
        work: mpsc::UnboundedSender<Work>,
    ) -> Self {
        static STREAM_IDS: AtomicU64 = AtomicU64::new(1);
        let id = STREAM_IDS.fetch_add(1, Ordering::Relaxed);
        let (frames, outbound) = mpsc::channel(LINK_BUFFER);
        let task = tokio::spawn(run_stream(addr, peer.to_string(), limits, credentials, epoch, work, id, outbound));
        Self { frames, id, task }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(watcher) = &self.watcher {
            watcher.abort();
        }
    }
}

impl Link {
    /// A link to `neighbour`, or `None` if it runs on this node.
    fn to(
        neighbour: &Neighbour,
        direction: Direction,
        limits: Limits,
        credentials: Option<Arc<Credentials>>,
        epoch: u64,
        work: mpsc::UnboundedSender<Work>,
    ) -> Option<Self> {
        let (addr, peer, path) = match neighbour {
            Neighbour::Local => return None,
            Neighbour::Remote { node_id, addr } => (*addr, node_id.clone(), None),
            Neighbour::Path { node_id, choice } => (choice.borrow().addr, node_id.clone(), Some(choice.clone())),
        };
        let stream = LinkStream::open(addr, &peer, limits, credentials.clone(), epoch, work.clone());
        let mut link = Self {
            stream,
            addr,
            peer,
            limits,
            credentials,
            epoch,
            work: work.clone(),
            path: None,
            failovers: 0,
            watcher: None,
        };
        if let Some(path) = path {
            link.failovers = path.borrow().failovers;
            let mut changes = path.clone();
            link.watcher = Some(tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    if work.send(Work::PathChanged(direction)).is_err() {
                        break;
                    }
                }
            }));
            link.path = Some(path);
        }
        Some(link)
    }

    /// Moves the link to the path chosen now. Returns whether it failed over, in which
    /// case frames sent on the old path may never have arrived.
    fn follow_path(&mut self) -> bool {
        let Some(choice) = self.path.as_mut().map(|path| *path.borrow_and_update()) else { return false };
        if choice.addr == self.addr && choice.failovers == self.failovers {
            return false;
        }
        let failed_over = choice.failovers != self.failovers;
        tracing::info!(from = %self.addr, to = %choice.addr, failed_over, "moving the link to the next stage's new path");
        let moved = self.open(choice.addr);
        let old = std::mem::replace(&mut self.stream, moved);
        if failed_over {
            // The old path is dead: nothing on it will arrive.
            old.task.abort();
        }
        // Otherwise the old stream delivers what it holds, and ends once its sender is gone.
        self.addr = choice.addr;
        self.failovers = choice.failovers;
        failed_over
    }

    /// A new stream of this link, to the neighbour at `addr`.
    fn open(&self, addr: SocketAddr) -> LinkStream {
        LinkStream::open(addr, &self.peer, self.limits, self.credentials.clone(), self.epoch, self.work.clone())
    }

    /// Sends a frame, first opening the link again if its connection has gone.
    async fn send(&mut self, frame: StageFrame) -> bool {
        if self.stream.frames.is_closed() {
            tracing::info!(addr = %self.addr, "opening the link to the neighbouring stage again");
            self.stream = self.open(self.addr);
        }
        self.stream.frames.send(frame.into_wire()).await.is_ok()
    }
}

/// Runs one stream to the node `peer` at `addr` until it ends or breaks.
#[allow(clippy::too_many_arguments)]
async fn run_stream(
    addr: SocketAddr,
    peer: String,
    limits: Limits,
    credentials: Option<Arc<Credentials>>,
    epoch: u64,
    work: mpsc::UnboundedSender<Work>,
    link: u64,
    outbound: mpsc::Receiver<pb::StageMessage>,
) {
    let broke = |message: String| {
        let error = StageError { epoch, sequence_id: 0, code: ErrorCode::Internal, message };
        let _ = work.send(Work::LinkBroke { link, error });
    };
    // The connection is confirmed to reach `peer` before any frame goes out on it.
    let channel = match AuthedChannel::connect(addr, peer, credentials).await {
        Ok(channel) => channel,
        Err(error) => return broke(format!("cannot link to the stage at {addr}: {error:#}")),
    };
    let mut client = pb::pipeline_client::PipelineClient::new(channel.channel()).with_limits(&limits);
    let request = match channel.request(ReceiverStream::new(outbound)).await {
        Ok(request) => request,
        Err(error) => return broke(format!("cannot link to the stage at {addr}: {error}")),
    };
    let mut replies = match client.stream(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return broke(format!("the stage at {addr} refused the link: {status}")),
    };
    loop {
        match replies.message().await {
            Ok(Some(pb::StageMessage { kind: Some(pb::stage_message::Kind::Error(error)) })) => {
                let _ = work.send(Work::Downstream(StageError::from_wire(error)));
            }
            Ok(Some(_)) => tracing::debug!("ignoring a non-error reply from {addr}"),
            Ok(None) => break,
            Err(status) => return broke(format!("the link to {addr} broke: {status}")),
        }
    }
}

struct Worker {
    stats: Arc<DataPlaneStats>,
    role: Option<StageRole>,
    sequences: HashMap<u64, Sequence>,
    next: Option<Link>,
    /// The last stage's link to a remote first stage.
    ring: Option<Link>,
    limits: Limits,
    credentials: Option<Arc<Credentials>>,
    work: mpsc::UnboundedSender<Work>,
}

impl Worker {
    async fn run(mut self, mut work: mpsc::UnboundedReceiver<Work>) {
        while let Some(item) = work.recv().await {
            match item {
                Work::Command(Command::Install(role, done)) => {
                    self.install(*role);
                    let _ = done.send(());
                }
                Work::Command(Command::Uninstall(done)) => {
                    self.drop_sequences("this stage left the plan");
                    self.next = None;
                    self.ring = None;
                    let _ = done.send(self.role.take());
                }
                Work::Inbound { message, upstream } => {
                    self.inbound(message, upstream).await;
                    // Let the network tasks on this thread send what the step produced before
                    // the next step starts: the worker would otherwise hold the thread while
                    // work keeps arriving.
                    tokio::task::yield_now().await;
                }
                Work::Downstream(error) => self.downstream_failed(error),
                Work::LinkBroke { link, error } => {
                    let current = [&self.next, &self.ring].into_iter().flatten().any(|l| l.stream.id == link);
                    if current {
                        self.downstream_failed(error);
                    } else {
                        tracing::debug!("a replaced link broke: {}", error.message);
                    }
                }
                Work::PathChanged(direction) => self.path_changed(direction),
            }
        }
    }

    fn install(&mut self, role: StageRole) {
        // Sequences of an older plan cannot continue here: their holders replay them.
        self.drop_sequences("the plan changed");
        let link = |neighbour: &Neighbour, direction| {
            Link::to(neighbour, direction, self.limits, self.credentials.clone(), role.epoch, self.work.clone())
        };
        self.next = role.next.as_ref().and_then(|next| link(next, Direction::Next));
        // The last stage sends its tokens round to the first.
        self.ring = match &role.next {
            None if role.first.is_remote() => link(&role.first, Direction::Ring),
            _ => None,
        };
        tracing::info!(epoch = role.epoch, layers = ?role.stage.layers(), "data plane serving its stage");
        self.role = Some(role);
    }

    /// A link's path changed: the link moves to it between two frames. After a failover
    /// the frames in flight on the dead path are lost, so every sequence here fails and
    /// is replayed by its holder, now over the new path.
    fn path_changed(&mut self, direction: Direction) {
        let link = match direction {
            Direction::Next => self.next.as_mut(),
            Direction::Ring => self.ring.as_mut(),
        };
        let Some(link) = link else { return };
        if link.follow_path() {
            let epoch = self.role.as_ref().map_or(0, |role| role.epoch);
            let message = format!("the path to the {direction:?} stage failed over to {}", link.addr);
            self.downstream_failed(StageError { epoch, sequence_id: 0, code: ErrorCode::PathChanged, message });
        }
    }

    fn expect(&self) -> Option<Expect> {
        let role = self.role.as_ref()?;
        let config = role.stage.config();
        Some(Expect {
            epoch: role.epoch,
            hidden_size: config.hidden_size,
            vocab_size: config.vocab_size.try_into().unwrap_or(u32::MAX),
        })
    }

    async fn inbound(&mut self, message: pb::StageMessage, upstream: Upstream) {
        let Some(expect) = self.expect() else {
            self.stats.frames_refused.fetch_add(1, Ordering::Relaxed);
            let _ = upstream.send(Err(Status::unavailable("this node has no stage in the current plan yet")));
            return;
        };
        let frame = StageFrame::from_wire(message, &self.limits, &expect);
        let counter = if frame.is_ok() { &self.stats.frames_accepted } else { &self.stats.frames_refused };
        counter.fetch_add(1, Ordering::Relaxed);
        let frame = match frame {
            Ok(frame) => frame,
            // A frame for another epoch is a stale sender, not a broken one: refuse it in-stream.
            Err(error @ (FrameError::StaleEpoch { .. } | FrameError::EpochAhead { .. })) => {
                let refusal = StageError::refusing(&error, expect.epoch, 0);
                let _ = upstream.send(Ok(StageFrame::Error(refusal).into_wire()));
                return;
            }
            Err(error) => {
                tracing::warn!("refusing a malformed frame: {error}");
                let _ = upstream.send(Err(error.to_status()));
                return;
            }
        };
        let sequence_id = frame.sequence_id();
        if let Err(error) = self.handle(frame, upstream.clone()).await {
            tracing::warn!(sequence_id, "stage failed: {error:#}");
            // Tell whoever is waiting on the sequence: its holder, on the first stage.
            let upstream = self.sequences.remove(&sequence_id).map_or(upstream, |s| s.upstream);
            let refusal =
                StageError { epoch: expect.epoch, sequence_id, code: ErrorCode::Internal, message: format!("{error:#}") };
            let _ = upstream.send(Ok(StageFrame::Error(refusal).into_wire()));
        }
    }

    async fn handle(&mut self, frame: StageFrame, upstream: Upstream) -> anyhow::Result<()> {
        let Some(role) = &self.role else { return Ok(()) };
        let epoch = role.epoch;
        match frame {
            StageFrame::Prefill(Prefill { sequence_id, start_position, tokens, generation, .. }) => {
                anyhow::ensure!(role.stage.is_first(), "this stage takes hidden states, not tokens");
                let generation = self.open_or_continue(sequence_id, start_position, generation, upstream)?;
                self.step(sequence_id, Input::Tokens(&tokens), generation, false).await
            }
            StageFrame::Activation(Activation { sequence_id, start_position, hidden, generation, steps, .. }) => {
                anyhow::ensure!(!role.stage.is_first(), "the first stage takes tokens, not hidden states");
                let generation = self.open_or_continue(sequence_id, start_position, generation, upstream)?;
                self.step(sequence_id, Input::Hidden(hidden), generation, steps).await
            }
            StageFrame::Token(token) => {
                // Only the first stage receives tokens: from the last stage, round the ring.
                self.token_arrived(token).await
            }
            StageFrame::Reset(Reset { sequence_id, .. }) => {
                self.sequences.remove(&sequence_id);
                if let Some(next) = &mut self.next {
                    next.send(StageFrame::Reset(Reset { epoch, sequence_id })).await;
                }
                Ok(())
            }
            StageFrame::Error(error) => {
                self.downstream_failed(error);
                Ok(())
            }
        }
    }

    /// Starts a sequence at position 0 (replacing any cache of an earlier attempt), or
    /// checks that a later frame continues one this stage knows. Returns the generation
    /// settings to pass on to the next stage.
    fn open_or_continue(
        &mut self,
        sequence_id: u64,
        start_position: u32,
        generation: Option<Generation>,
        upstream: Upstream,
    ) -> anyhow::Result<Option<Generation>> {
        let Some(role) = &self.role else { anyhow::bail!("no stage") };
        if start_position == 0 {
            let sampling = match (&generation, role.stage.is_last()) {
                (Some(g), true) => {
                    // Reversed, so that each step pops the next forced token off the end.
                    let mut settings = g.clone();
                    settings.forced_tokens.reverse();
                    Some((sampler_from(g), settings))
                }
                _ => None,
            };
            let replay = match &generation {
                Some(g) if role.stage.is_first() => g.forced_tokens.clone(),
                _ => Vec::new(),
            };
            let sequence = Sequence { cache: role.stage.new_cache(), upstream, sampling, replay };
            self.sequences.insert(sequence_id, sequence);
            return Ok(generation);
        }
        let sequence =
            self.sequences.get_mut(&sequence_id).ok_or_else(|| anyhow::anyhow!("unknown sequence {sequence_id}"))?;
        anyhow::ensure!(
            sequence.cache.positions() == start_position as usize,
            "sequence {sequence_id} is at position {}, the frame starts at {start_position}",
            sequence.cache.positions()
        );
        // The previous stage may have moved its link to another path: refusals go back
        // the way the latest frame came.
        if !role.stage.is_first() {
            sequence.upstream = upstream;
        }
        Ok(None)
    }

    /// Runs new positions of a sequence through this stage and sends the result on: hidden
    /// states to the next stage, or a sampled token round the ring. With `steps`, each row
    /// is a decoding step of its own (a replay's known tokens): the rows run one at a time,
    /// exactly as they ran when they were decoded, and their hidden states go on together.
    async fn step(
        &mut self,
        sequence_id: u64,
        input: Input<'_>,
        generation: Option<Generation>,
        steps: bool,
    ) -> anyhow::Result<()> {
        let Some(role) = &self.role else { return Ok(()) };
        let stage = role.stage.clone();
        let start_position =
            self.sequences.get(&sequence_id).ok_or_else(|| anyhow::anyhow!("unknown sequence {sequence_id}"))?.cache.positions()
                as u32;
        let hidden_input = match &input {
            Input::Tokens(_) => None,
            Input::Hidden(hidden) => {
                Some(Tensor::from_vec(hidden.to_f32_vec(), (hidden.rows(), hidden.cols()), stage.device())?)
            }
        };
        let rows = match &input {
            Input::Tokens(tokens) => tokens.len(),
            Input::Hidden(hidden) => hidden.rows(),
        };
        // Steps run one row at a time; anything else in one go.
        let run_rows = if steps { 1 } else { rows.max(1) };
        let mut hidden_out: Vec<f32> = Vec::new();
        let mut cols = 0;
        for start in (0..rows).step_by(run_rows) {
            let run = start..(start + run_rows).min(rows);
            let sequence = self
                .sequences
                .get_mut(&sequence_id)
                .ok_or_else(|| anyhow::anyhow!("unknown sequence {sequence_id}"))?;
            let row_input;
            let stage_input = match (&input, &hidden_input) {
                (Input::Tokens(tokens), _) => StageInput::Tokens(&tokens[run]),
                (_, Some(hidden)) => {
                    row_input = if run.len() == rows { hidden.clone() } else { hidden.narrow(0, run.start, run.len())? };
                    StageInput::Hidden(&row_input)
                }
                (Input::Hidden(_), None) => unreachable!("hidden input is always converted above"),
            };
            match stage.forward(stage_input, &mut sequence.cache)? {
                StageOutput::Hidden(hidden) => {
                    cols = hidden.dims2()?.1;
                    let values = hidden.flatten_all()?.to_vec1::<f32>()?;
                    // One run (every step but a replay's): its values are the frame's, uncopied.
                    if hidden_out.is_empty() {
                        hidden_out = values;
                    } else {
                        hidden_out.extend(values);
                    }
                }
                StageOutput::Logits(logits) => {
                    if self.sample(sequence_id, &logits).await? {
                        // Finished (it cannot be within a replay's known tokens).
                        break;
                    }
                }
            }
        }
        if hidden_out.is_empty() {
            return Ok(());
        }
        let epoch = self.role.as_ref().map_or(0, |role| role.epoch);
        let hidden = HiddenStates::from_f32(hidden_out.len() / cols, cols, &hidden_out, DType::F32)?;
        let frame = Activation { epoch, sequence_id, start_position, hidden, generation, steps };
        let next = self.next.as_mut().ok_or_else(|| anyhow::anyhow!("this stage has no next stage"))?;
        anyhow::ensure!(next.send(StageFrame::Activation(frame)).await, "the link to the next stage is closed");
        Ok(())
    }

    /// On the last stage: picks the sequence's next token from `logits` (a replay's known
    /// token, or the sampler's) and sends it round the ring. Returns whether the sequence
    /// finished.
    async fn sample(&mut self, sequence_id: u64, logits: &Tensor) -> anyhow::Result<bool> {
        let Some(role) = &self.role else { return Ok(true) };
        let (epoch, is_first) = (role.epoch, role.stage.is_first());
        let sequence =
            self.sequences.get_mut(&sequence_id).ok_or_else(|| anyhow::anyhow!("unknown sequence {sequence_id}"))?;
        let (sampler, settings) = sequence
            .sampling
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("sequence {sequence_id} reached the last stage without its sampling settings"))?;
        // A replay's known tokens come first, without drawing from the sampler.
        let id = match settings.forced_tokens.pop() {
            Some(forced) => forced,
            None => crate::engine::with_host_slice(logits, |values| sampler.sample(values))?,
        };
        let position = sequence.cache.positions() as u32;
        let finish = if settings.stop_tokens.contains(&id) {
            Some(FinishReason::Stop)
        } else if position + 1 >= settings.max_len {
            Some(FinishReason::Length)
        } else {
            None
        };
        let token = Token { epoch, sequence_id, position, id, finish, word_pos: sampler.state().word_pos };
        // A finished sequence is forgotten here, unless this stage is also the first, which
        // still has to pass the token to the holder.
        let upstream = sequence.upstream.clone();
        if finish.is_some() && !is_first {
            self.sequences.remove(&sequence_id);
        }
        match &mut self.ring {
            // The first stage is here too: queue the token behind other work, so that
            // sequences take turns.
            None => {
                let _ = self.work.send(Work::Inbound { message: StageFrame::Token(token).into_wire(), upstream });
            }
            Some(ring) => {
                anyhow::ensure!(ring.send(StageFrame::Token(token)).await, "the link to the first stage is closed")
            }
        }
        Ok(finish.is_some())
    }

    /// On the first stage: a sampled token came round. The holder gets it first, then it
    /// becomes the input of the sequence's next step, unless the sequence is finished.
    async fn token_arrived(&mut self, token: Token) -> anyhow::Result<()> {
        let Some(role) = &self.role else { return Ok(()) };
        anyhow::ensure!(role.stage.is_first(), "tokens go to the first stage");
        let epoch = role.epoch;
        let sequence_id = token.sequence_id;
        let Some(sequence) = self.sequences.get(&sequence_id) else {
            // Reset while the token was on its way: nothing to do.
            return Ok(());
        };
        let holder_gone = sequence.upstream.send(Ok(StageFrame::Token(token.clone()).into_wire())).is_err();
        if token.finish.is_some() || holder_gone {
            self.sequences.remove(&sequence_id);
            if let Some(next) = &mut self.next {
                next.send(StageFrame::Reset(Reset { epoch, sequence_id })).await;
            }
            return Ok(());
        }
        let Some(sequence) = self.sequences.get_mut(&sequence_id) else { return Ok(()) };
        let next_position = sequence.cache.positions() as u32;
        if token.position < next_position {
            // One of a replay's known tokens, which went down the pipeline already.
            return Ok(());
        }
        anyhow::ensure!(
            token.position == next_position,
            "a token for position {} came round to a sequence at position {next_position}",
            token.position
        );
        let known = std::mem::take(&mut sequence.replay);
        if known.is_empty() {
            return self.step(sequence_id, Input::Tokens(&[token.id]), None, false).await;
        }
        // The first token of a replay came round: all the tokens generated before the
        // failure go down now, as the steps they were, rather than one trip round the ring
        // each.
        anyhow::ensure!(known[0] == token.id, "the replay produced token {} instead of {}", token.id, known[0]);
        for steps in known.chunks(STEPS_PER_FRAME) {
            self.step(sequence_id, Input::Tokens(steps), None, true).await?;
        }
        Ok(())
    }

    /// Forgets every sequence, telling whoever waits on each (its holder, on the first
    /// stage) so that it replays it instead of waiting for ever.
    fn drop_sequences(&mut self, why: &str) {
        let epoch = self.role.as_ref().map_or(0, |role| role.epoch);
        for (sequence_id, sequence) in self.sequences.drain() {
            let refusal = StageError { epoch, sequence_id, code: ErrorCode::StaleEpoch, message: why.to_string() };
            let _ = sequence.upstream.send(Ok(StageFrame::Error(refusal).into_wire()));
        }
    }

    /// A neighbour refused a frame, or a link broke: the sequences concerned fail, and their
    /// holders hear of it (they replay them).
    fn downstream_failed(&mut self, error: StageError) {
        tracing::warn!(sequence_id = error.sequence_id, "downstream: {}", error.message);
        let failed: Vec<u64> = if error.sequence_id == 0 {
            self.sequences.keys().copied().collect()
        } else {
            vec![error.sequence_id]
        };
        for sequence_id in failed {
            if let Some(sequence) = self.sequences.remove(&sequence_id) {
                let refusal = StageError { sequence_id, ..error.clone() };
                let _ = sequence.upstream.send(Ok(StageFrame::Error(refusal).into_wire()));
            }
        }
    }

}

enum Input<'a> {
    Tokens(&'a [u32]),
    Hidden(HiddenStates),
}

fn sampler_from(generation: &Generation) -> Sampler {
    let s = generation.sampling;
    Sampler::from_state(&SamplerState {
        params: SamplingParams { temperature: s.temperature, top_p: s.top_p, top_k: s.top_k as usize, seed: s.seed },
        word_pos: s.word_pos,
    })
}
