//! Weights between nodes: a node serves its model file's tensors to peers that lack
//! them, and a node that joined without a model file fetches what it needs from them.
//!
//! A node without the model first fetches the file's header (metadata, tokenizer and
//! tensor infos): from it alone the node knows the model as well as any peer does, its
//! placement profile and its tokenizer. It writes the header into a sparse file laid out
//! like the real one, whose data section is a hole. When a plan gives it layers, it
//! fetches exactly the tensors of its stage into that file, checking each chunk's
//! SHA-256 and each tensor's size and place against the header, then loads the stage
//! from the file as any node loads from its own. Tensors it has fetched it serves in
//! turn.
//!
//! A request names tensors, never paths: a server reads only the byte ranges its own
//! file's header gives the tensors it is asked for.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use hearth_mesh::control::{NodeInfo, Plan};
use hearth_models::{FileLayout, ModelSource};
use hearth_proto::weights::{WeightChunk, WeightPart, WeightRequest, HEADER_NAME, MAX_HEADER_BYTES};
use hearth_proto::{pb, Limits};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::auth::{AuthedChannel, Credentials};

/// The payload of one chunk: well below the gRPC message limit (see
/// `hearth_proto::Limits::max_chunk_bytes`), and small enough that a broken transfer
/// loses little.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Chunks a server reads ahead of a slow receiver.
const CHUNKS_AHEAD: usize = 4;

/// The largest model file a node lays out from a peer's header: the file is sparse, so
/// this bounds only what a lying header can make the node believe, not what it writes.
const MAX_MODEL_FILE_BYTES: u64 = 1 << 40;

/// A peer that sends nothing for this long is given up on.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Times a stage's fetch goes round every peer before it fails, and the pause between:
/// a peer may be restarting, or reloading its own layers.
const FETCH_ROUNDS: usize = 3;
const ROUND_PAUSE: Duration = Duration::from_millis(500);

/// The stream of chunks a server sends.
pub type ChunkStream = ReceiverStream<Result<pb::WeightChunk, Status>>;

// ---------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------

/// The weights this node serves to its peers: none until it has a model; every tensor
/// of a complete file; those it fetched so far of a file it got from peers.
#[derive(Clone, Default)]
pub struct WeightServer {
    shelf: Arc<RwLock<Option<Arc<Shelf>>>>,
}

struct Shelf {
    source: Arc<ModelSource>,
    layout: FileLayout,
    /// The tensors held in full, or `None` when the file is complete.
    held: Option<RwLock<BTreeSet<String>>>,
}

impl WeightServer {
    /// Serves every tensor of a complete model file (GGUF only: other formats are not
    /// served, and peers ask another node).
    pub fn serve_file(&self, source: Arc<ModelSource>) {
        match source.file_layout() {
            Ok(layout) => self.put(Shelf { source, layout, held: None }),
            Err(error) => tracing::info!("not serving weights to peers: {error}"),
        }
    }

    /// Serves the tensors of a file fetched from peers, as they arrive ([`Self::hold`]).
    fn serve_partial(&self, source: Arc<ModelSource>, layout: FileLayout) {
        self.put(Shelf { source, layout, held: Some(RwLock::new(BTreeSet::new())) });
    }

    /// Adds tensors that are now complete in a partial file.
    fn hold(&self, names: impl IntoIterator<Item = String>) {
        let Some(shelf) = self.current() else { return };
        let Some(held) = &shelf.held else { return };
        // A statement, so that the guard is dropped before `shelf`.
        if let Ok(mut held) = held.write() {
            held.extend(names);
        };
    }

    fn put(&self, shelf: Shelf) {
        if let Ok(mut slot) = self.shelf.write() {
            *slot = Some(Arc::new(shelf));
        }
    }

    fn current(&self) -> Option<Arc<Shelf>> {
        self.shelf.read().ok().and_then(|slot| slot.clone())
    }

    /// Answers a `FetchWeights` call: checks the request, then streams the chunks from a
    /// blocking thread. A malformed request, or layers the model does not have, is
    /// INVALID_ARGUMENT; another model, or a tensor that is not the stage's or not held
    /// here, NOT_FOUND.
    pub fn fetch(&self, request: pb::WeightRequest) -> Result<ChunkStream, Status> {
        let refused = |status: Status| {
            tracing::warn!("refusing a weight request: {}", status.message());
            status
        };
        let pieces = self.pieces(request).map_err(refused)?;
        let bytes: u64 = pieces.iter().map(|(_, range)| range.end - range.start).sum();
        tracing::info!(pieces = pieces.len(), mib = format!("{:.1}", bytes as f64 / (1 << 20) as f64), "serving weights to a peer");
        let (chunks, stream) = mpsc::channel(CHUNKS_AHEAD);
        tokio::task::spawn_blocking(move || send_chunks(&pieces, &chunks));
        Ok(ReceiverStream::new(stream))
    }

    /// The model file and the ranges of it a request asks for.
    fn pieces(&self, request: pb::WeightRequest) -> Result<Pieces, Status> {
        let request = WeightRequest::from_wire(request).map_err(|error| error.to_status())?;
        let shelf = self.current().ok_or_else(|| Status::not_found("this node has no model weights to serve"))?;
        if request.model != shelf.source.name() {
            return Err(Status::not_found(format!(
                "this node serves the model `{}`, not `{}`",
                shelf.source.name(),
                request.model.escape_default()
            )));
        }
        Ok(Pieces { path: shelf.source.location().to_path_buf(), ranges: shelf.ranges(request.part)? })
    }
}

/// What a request will be sent: ranges of the model file, by name, in order.
struct Pieces {
    path: PathBuf,
    ranges: Vec<(String, Range<u64>)>,
}

impl Pieces {
    fn len(&self) -> usize {
        self.ranges.len()
    }

    fn iter(&self) -> impl Iterator<Item = &(String, Range<u64>)> {
        self.ranges.iter()
    }
}

impl Shelf {
    /// The file ranges a request asks for, by name, in the order they are sent.
    fn ranges(&self, part: WeightPart) -> Result<Vec<(String, Range<u64>)>, Status> {
        let (layers, wanted) = match part {
            WeightPart::Header => return Ok(vec![(HEADER_NAME.to_string(), 0..self.layout.header_bytes)]),
            WeightPart::Stage { layers, tensors } => (layers, tensors),
        };
        let stage = self
            .source
            .stage_tensor_names(layers.start as usize..layers.end as usize)
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        let names = if wanted.is_empty() {
            stage
        } else {
            for name in &wanted {
                if !stage.contains(name) {
                    return Err(Status::not_found(format!(
                        "`{}` is not a tensor of layers {}..{}",
                        name.escape_default(),
                        layers.start,
                        layers.end
                    )));
                }
            }
            wanted
        };
        if let Some(held) = &self.held {
            let held = held.read().map_err(|_| Status::internal("poisoned"))?;
            if let Some(missing) = names.iter().find(|name| !held.contains(*name)) {
                return Err(Status::not_found(format!("this node does not hold `{missing}` (yet)")));
            }
        }
        names
            .into_iter()
            .map(|name| match self.layout.tensors.get(&name) {
                Some(range) => Ok((name, range.clone())),
                None => Err(Status::not_found(format!("the model has no tensor `{name}`"))),
            })
            .collect()
    }
}

/// Reads the pieces from the model file and sends them in chunks, until done, or the
/// receiver leaves, or the file fails.
fn send_chunks(pieces: &Pieces, chunks: &mpsc::Sender<Result<pb::WeightChunk, Status>>) {
    let path = &pieces.path;
    let result = (|| -> std::io::Result<()> {
        let mut file = File::open(path)?;
        for (name, range) in pieces.iter() {
            let size = range.end - range.start;
            let mut offset = 0;
            // An empty tensor still gets one (empty) chunk, so the receiver sees it.
            loop {
                let len = (size - offset).min(CHUNK_BYTES as u64) as usize;
                let mut data = vec![0; len];
                file.seek(SeekFrom::Start(range.start + offset))?;
                file.read_exact(&mut data)?;
                let chunk = WeightChunk {
                    tensor: name.clone(),
                    offset,
                    tensor_size: size,
                    sha256: Sha256::digest(&data).into(),
                    data: Bytes::from(data),
                };
                if chunks.blocking_send(Ok(chunk.into_wire())).is_err() {
                    return Ok(());
                }
                offset += len as u64;
                if offset >= size {
                    break;
                }
            }
        }
        Ok(())
    })();
    if let Err(error) = result {
        tracing::error!(path = %path.display(), "cannot read weights to serve: {error}");
        let _ = chunks.blocking_send(Err(Status::internal("this node cannot read its model file")));
    }
}

// ---------------------------------------------------------------------------------------
// Fetching
// ---------------------------------------------------------------------------------------

/// Why a peer's weights were refused: it sent something other than what it was asked
/// for, or than the model's header says.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("the peer sent a malformed chunk: {0}")]
    Malformed(#[from] hearth_proto::FrameError),
    #[error("the peer sent `{got}` where `{expected}` was due")]
    WrongTensor { expected: String, got: String },
    #[error("the peer says `{tensor}` is {claimed} bytes, but the model's header says {expected}")]
    WrongSize { tensor: String, claimed: u64, expected: u64 },
    #[error("the peer sent bytes {offset}.. of `{tensor}` where bytes {expected}.. were due")]
    OutOfOrder { tensor: String, offset: u64, expected: u64 },
    #[error("the SHA-256 of a chunk of `{tensor}` at offset {offset} does not match its data")]
    BadDigest { tensor: String, offset: u64 },
    #[error("the peer's header is {0} bytes, more than a node accepts")]
    HeaderTooLarge(u64),
    #[error("the peer ended the transfer before `{0}` was complete")]
    Incomplete(String),
    #[error("the peer sent nothing for {0:?}")]
    Idle(Duration),
}

/// Checks the chunks of one transfer, in order, against the pieces due: right name,
/// the size the model's header says, contiguous offsets, and each chunk's digest.
struct Receiver<'a> {
    /// Each piece due: its name and its size by the model's header, in request order.
    due: &'a [(String, u64)],
    /// The piece being received.
    next: usize,
    /// Bytes of it received so far.
    offset: u64,
    /// Whether any chunk of it came (an empty piece comes as one empty chunk).
    started: bool,
    limits: Limits,
}

impl<'a> Receiver<'a> {
    fn new(due: &'a [(String, u64)], limits: Limits) -> Self {
        Self { due, next: 0, offset: 0, started: false, limits }
    }

    /// Checks one chunk; returns it with the index of its piece.
    fn take(&mut self, chunk: pb::WeightChunk) -> Result<(usize, WeightChunk), FetchError> {
        let chunk = WeightChunk::from_wire(chunk, &self.limits)?;
        if self.current_complete() {
            self.next += 1;
            self.offset = 0;
            self.started = false;
        }
        let Some((name, size)) = self.due.get(self.next) else {
            return Err(FetchError::WrongTensor { expected: "the end of the transfer".into(), got: chunk.tensor });
        };
        if chunk.tensor != *name {
            return Err(FetchError::WrongTensor { expected: name.clone(), got: chunk.tensor });
        }
        if chunk.tensor_size != *size {
            return Err(FetchError::WrongSize { tensor: name.clone(), claimed: chunk.tensor_size, expected: *size });
        }
        if chunk.offset != self.offset {
            return Err(FetchError::OutOfOrder { tensor: name.clone(), offset: chunk.offset, expected: self.offset });
        }
        if <[u8; 32]>::from(Sha256::digest(&chunk.data)) != chunk.sha256 {
            return Err(FetchError::BadDigest { tensor: name.clone(), offset: chunk.offset });
        }
        self.offset += chunk.data.len() as u64;
        self.started = true;
        Ok((self.next, chunk))
    }

    fn current_complete(&self) -> bool {
        self.started && self.due.get(self.next).is_some_and(|(_, size)| self.offset == *size)
    }

    /// How many pieces, from the first, arrived in full.
    fn completed(&self) -> usize {
        self.next + usize::from(self.current_complete())
    }
}

/// A peer's data plane: which node, and where. Weights come only from the node meant
/// ([`crate::peer_identity`]), not from whoever holds its address now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataPeer {
    pub node_id: String,
    pub addr: SocketAddr,
}

/// Opens a `FetchWeights` call to `peer`.
async fn open_transfer(
    peer: &DataPeer,
    request: WeightRequest,
    credentials: Option<Arc<Credentials>>,
    limits: Limits,
) -> anyhow::Result<tonic::Streaming<pb::WeightChunk>> {
    let connect = AuthedChannel::connect(peer.addr, peer.node_id.as_str(), credentials);
    let channel = tokio::time::timeout(IDLE_TIMEOUT, connect)
        .await
        .map_err(|_| FetchError::Idle(IDLE_TIMEOUT))??;
    let mut client = pb::pipeline_client::PipelineClient::new(channel.channel()).with_limits(&limits);
    let request = channel.request(request.into_wire()).await?;
    Ok(client.fetch_weights(request).await?.into_inner())
}

/// The next chunk, or `None` at the end of the transfer.
async fn next_chunk(stream: &mut tonic::Streaming<pb::WeightChunk>) -> anyhow::Result<Option<pb::WeightChunk>> {
    match tokio::time::timeout(IDLE_TIMEOUT, stream.message()).await {
        Ok(message) => Ok(message?),
        Err(_) => Err(FetchError::Idle(IDLE_TIMEOUT).into()),
    }
}

/// Fetches the header of `model`'s file from `peer`, whole and checked.
pub async fn fetch_header(
    peer: &DataPeer,
    model: &str,
    credentials: Option<Arc<Credentials>>,
    limits: Limits,
) -> anyhow::Result<Vec<u8>> {
    let request = WeightRequest { model: model.to_string(), part: WeightPart::Header };
    let mut stream = open_transfer(peer, request, credentials, limits).await?;
    // The size is the peer's claim: bounded before it is believed, and never allocated
    // up front; the header grows by verified chunks only.
    let Some(first) = next_chunk(&mut stream).await? else {
        anyhow::bail!(FetchError::Incomplete(HEADER_NAME.into()));
    };
    if first.tensor_size > MAX_HEADER_BYTES {
        anyhow::bail!(FetchError::HeaderTooLarge(first.tensor_size));
    }
    let due = [(HEADER_NAME.to_string(), first.tensor_size)];
    let mut receiver = Receiver::new(&due, limits);
    let mut header = Vec::new();
    let mut message = Some(first);
    while let Some(chunk) = message {
        let (_, chunk) = receiver.take(chunk)?;
        header.extend_from_slice(&chunk.data);
        message = next_chunk(&mut stream).await?;
    }
    if receiver.completed() < due.len() {
        anyhow::bail!(FetchError::Incomplete(HEADER_NAME.into()));
    }
    Ok(header)
}

/// Fetches `names` of the stage `layers` from `peer` into `file`, laid out
/// by `layout`; adds each tensor to `done` once all of it is written. On an error the
/// tensors already in `done` are good, and the rest may be fetched elsewhere.
#[allow(clippy::too_many_arguments)]
pub async fn fetch_tensors(
    peer: &DataPeer,
    model: &str,
    layers: Range<usize>,
    names: &[String],
    file: &Arc<File>,
    layout: &FileLayout,
    credentials: Option<Arc<Credentials>>,
    limits: Limits,
    done: &mut BTreeSet<String>,
) -> anyhow::Result<()> {
    // An empty list would ask for the whole stage.
    if names.is_empty() {
        return Ok(());
    }
    // What is due, by the header: each tensor's size, and where it starts in the file.
    let mut due = Vec::with_capacity(names.len());
    let mut starts = Vec::with_capacity(names.len());
    for name in names {
        let range = layout.tensors.get(name).with_context(|| format!("the model has no tensor `{name}`"))?;
        due.push((name.clone(), range.end - range.start));
        starts.push(range.start);
    }
    let layers = u32::try_from(layers.start)?..u32::try_from(layers.end)?;
    let request = WeightRequest {
        model: model.to_string(),
        part: WeightPart::Stage { layers, tensors: names.to_vec() },
    };
    let mut stream = open_transfer(peer, request, credentials, limits).await?;
    let mut receiver = Receiver::new(&due, limits);
    let mut recorded = 0;
    while let Some(chunk) = next_chunk(&mut stream).await? {
        let (index, chunk) = receiver.take(chunk)?;
        let at = starts[index] + chunk.offset;
        let file = file.clone();
        tokio::task::spawn_blocking(move || write_at(&file, at, &chunk.data)).await??;
        for (name, _) in &due[recorded..receiver.completed()] {
            done.insert(name.clone());
        }
        recorded = receiver.completed();
    }
    if let Some((missing, _)) = due.iter().find(|(name, _)| !done.contains(name)) {
        anyhow::bail!(FetchError::Incomplete(missing.clone()));
    }
    Ok(())
}

fn write_at(mut file: &File, at: u64, data: &[u8]) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(at))?;
    file.write_all(data)
}

// ---------------------------------------------------------------------------------------
// The node's model
// ---------------------------------------------------------------------------------------

/// The model as this node has it: a complete file of its own, or one it gets from its
/// peers (first the header, then the tensors each plan gives it).
#[derive(Clone)]
pub struct NodeModel {
    id: String,
    known: watch::Sender<Option<Arc<ModelSource>>>,
    server: WeightServer,
    peers: Option<Arc<FromPeers>>,
}

/// What a node without the model file needs to fetch it.
struct FromPeers {
    /// The sparse file the model is laid out in.
    path: PathBuf,
    context: Option<usize>,
    credentials: Option<Arc<Credentials>>,
    limits: Limits,
    file: Mutex<Option<(Arc<File>, FileLayout)>>,
    /// Tensors complete in the file.
    held: Mutex<BTreeSet<String>>,
}

impl NodeModel {
    /// A node with its own complete model file, which it also serves to peers.
    pub fn from_file(source: ModelSource, server: WeightServer) -> Self {
        let source = Arc::new(source);
        server.serve_file(source.clone());
        Self { id: source.name().to_string(), known: watch::Sender::new(Some(source)), server, peers: None }
    }

    /// A node without the model `id`: it lays the model out in `dir` as it fetches it.
    pub fn from_peers(
        id: String,
        dir: &Path,
        context: Option<usize>,
        credentials: Option<Arc<Credentials>>,
        limits: Limits,
        server: WeightServer,
    ) -> Self {
        let peers = FromPeers {
            path: dir.join(format!("{id}.gguf")),
            context,
            credentials,
            limits,
            file: Mutex::new(None),
            held: Mutex::new(BTreeSet::new()),
        };
        Self { id, known: watch::Sender::new(None), server, peers: Some(Arc::new(peers)) }
    }

    /// The model's id in the cluster: the file's stem.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The opened model, once known (at once with a file of its own).
    pub fn source(&self) -> Option<Arc<ModelSource>> {
        self.known.borrow().clone()
    }

    /// Watches for the model to become known.
    pub fn watch(&self) -> watch::Receiver<Option<Arc<ModelSource>>> {
        self.known.subscribe()
    }

    /// For a node without the model: fetches the header from a member serving it, lays
    /// out the file and opens it. Returns whether the model just became known.
    pub async fn learn(&self, members: &[NodeInfo], me: &str) -> bool {
        let Some(peers) = &self.peers else { return false };
        if self.source().is_some() {
            return false;
        }
        // Ready members first: they are serving, so their data planes answer.
        let serving = members.iter().filter(|member| member.model_id == self.id).cloned().collect::<Vec<_>>();
        for peer in rank_peers(&(0..0), None, &serving, me) {
            let started = Instant::now();
            match peers.learn(&self.id, &peer).await {
                Ok((source, layout)) => {
                    tracing::info!(
                        peer = %peer.addr,
                        header_bytes = layout.header_bytes,
                        ms = started.elapsed().as_millis() as u64,
                        "got the model's header from a peer"
                    );
                    self.server.serve_partial(source.clone(), layout);
                    if let Ok(held) = peers.held.lock() {
                        self.server.hold(held.iter().cloned());
                    }
                    self.known.send_replace(Some(source));
                    return true;
                }
                Err(error) => tracing::warn!(peer = %peer.addr, "cannot get the model's header: {error:#}"),
            }
        }
        false
    }

    /// The model, with every tensor of the stage `layers` in its file: a node without the
    /// file fetches the ones it lacks first, from the peers most likely to hold them.
    pub async fn for_stage(
        &self,
        layers: Range<usize>,
        plan: Option<&Plan>,
        members: &[NodeInfo],
        me: &str,
    ) -> anyhow::Result<Arc<ModelSource>> {
        self.learn(members, me).await;
        let source = self.source().context("the model's header has not come from any peer yet")?;
        let Some(peers) = &self.peers else { return Ok(source) };
        let names = source.stage_tensor_names(layers.clone())?;
        let missing: Vec<String> = {
            let held = peers.held.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            names.into_iter().filter(|name| !held.contains(name)).collect()
        };
        if missing.is_empty() {
            return Ok(source);
        }
        let started = Instant::now();
        let bytes = peers.fetch(&self.id, layers.clone(), &missing, &rank_peers(&layers, plan, members, me)).await?;
        tracing::info!(
            ?layers,
            tensors = missing.len(),
            mib = format!("{:.1}", bytes as f64 / (1 << 20) as f64),
            ms = started.elapsed().as_millis() as u64,
            "fetched the stage's weights from peers"
        );
        self.server.hold(missing);
        Ok(source)
    }
}

impl FromPeers {
    /// Gets the header from `peer`, checks it, and lays the model out in a sparse file
    /// that holds the header and (once fetched) the tensors opening it reads.
    async fn learn(&self, model: &str, peer: &DataPeer) -> anyhow::Result<(Arc<ModelSource>, FileLayout)> {
        let header = fetch_header(peer, model, self.credentials.clone(), self.limits).await?;
        let path = self.path.clone();
        let (file, layout) = tokio::task::spawn_blocking(move || lay_out(&path, &header)).await??;
        let file = Arc::new(file);
        // Opening the model reads some tensors besides the header (RoPE factors, for
        // models that have them): those come first.
        let opening: Vec<String> =
            layout.tensors.keys().filter(|name| name.as_str() == "rope_freqs.weight").cloned().collect();
        if !opening.is_empty() {
            let mut done = BTreeSet::new();
            let limits = self.limits;
            fetch_tensors(peer, model, 0..1, &opening, &file, &layout, self.credentials.clone(), limits, &mut done)
                .await?;
            self.held.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.extend(done);
        }
        let (path, context) = (self.path.clone(), self.context);
        let source = tokio::task::spawn_blocking(move || -> anyhow::Result<ModelSource> {
            let mut source = ModelSource::open(&path)
                .with_context(|| format!("opening the model laid out from a peer's header at {}", path.display()))?;
            if let Some(context) = context {
                source.limit_context(context);
            }
            crate::device::apply_compute_path_from_env(&mut source)?;
            Ok(source)
        })
        .await??;
        anyhow::ensure!(source.name() == model, "the file laid out for `{model}` opened as `{}`", source.name());
        *self.file.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some((file, layout.clone()));
        Ok((Arc::new(source), layout))
    }

    /// Fetches `names` into the file, from the first of `peers` that has them, going on
    /// to the next when one fails or lies (keeping the tensors it completed), for a few
    /// rounds. Returns the bytes fetched.
    async fn fetch(
        &self,
        model: &str,
        layers: Range<usize>,
        names: &[String],
        peers: &[DataPeer],
    ) -> anyhow::Result<u64> {
        let (file, layout) =
            self.file.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone().context("the model is not laid out yet")?;
        let mut done = BTreeSet::new();
        let mut last_error = anyhow::anyhow!("no peer serves the model");
        for attempt in 0..FETCH_ROUNDS * peers.len() {
            let peer = &peers[attempt % peers.len()];
            if attempt > 0 && attempt % peers.len() == 0 {
                tokio::time::sleep(ROUND_PAUSE).await;
            }
            let remaining: Vec<String> = names.iter().filter(|name| !done.contains(*name)).cloned().collect();
            let fetched = fetch_tensors(
                peer,
                model,
                layers.clone(),
                &remaining,
                &file,
                &layout,
                self.credentials.clone(),
                self.limits,
                &mut done,
            )
            .await;
            self.held.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.extend(done.iter().cloned());
            match fetched {
                Ok(()) => {
                    let bytes = names.iter().filter_map(|name| layout.tensors.get(name)).map(|r| r.end - r.start).sum();
                    return Ok(bytes);
                }
                Err(error) => {
                    let (done, of) = (done.len(), names.len());
                    tracing::warn!(peer = %peer.addr, done, of, "fetching weights failed; trying another peer: {error:#}");
                    last_error = error;
                }
            }
        }
        Err(last_error.context(format!("no peer gave all {} tensors of layers {layers:?}", names.len())))
    }
}

/// Creates the sparse file: the header at its place, and the data section sized but
/// unwritten. Refuses a header that does not describe a model file it can lay out.
fn lay_out(path: &Path, header: &[u8]) -> anyhow::Result<(File, FileLayout)> {
    let (layout, _) = FileLayout::from_gguf_header(header)?;
    anyhow::ensure!(
        layout.file_bytes <= MAX_MODEL_FILE_BYTES,
        "the peer's header describes a model file of {} bytes, more than a node accepts",
        layout.file_bytes
    );
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.set_len(layout.file_bytes).with_context(|| format!("sizing {}", path.display()))?;
    file.write_all(header).with_context(|| format!("writing {}", path.display()))?;
    Ok((file, layout))
}

/// The peers to fetch a stage's weights from, best first: members that hold (in `plan`)
/// layers of the stage, then members serving a ready plan, then the rest.
fn rank_peers(layers: &Range<usize>, plan: Option<&Plan>, members: &[NodeInfo], me: &str) -> Vec<DataPeer> {
    let holds_layers = |member: &NodeInfo| {
        plan.is_some_and(|plan| {
            plan.stages.iter().any(|stage| {
                stage.node_id == member.node_id && stage.layers.start < layers.end && layers.start < stage.layers.end
            })
        })
    };
    let mut ranked: Vec<&NodeInfo> = members.iter().filter(|member| member.node_id != me).collect();
    ranked.sort_by_key(|member| (!holds_layers(member), member.ready_epoch.is_none()));
    ranked.into_iter().map(|member| DataPeer { node_id: member.node_id.clone(), addr: member.data_addr }).collect()
}
