//! A node without the model file gets its stage's weights from a peer over
//! `Pipeline.FetchWeights`: the stage it loads from them computes exactly what the stage
//! loaded from the full file does; lying peers are refused, and hostile requests too.

mod common;

use common::{default_model, loopback};

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use hearth_mesh::identity::Identity;
use hearth_mesh::cluster_key::ClusterKey;
use hearth_mesh::control::NodeInfo;
use hearth_models::{ModelSource, Stage, StageInput, StageOutput};
use hearth_node::auth::Credentials;
use hearth_node::data_plane::DataPlane;
use hearth_node::peer_identity;
use hearth_node::weights::{fetch_tensors, DataPeer, FetchError, NodeModel, WeightServer};
use hearth_proto::probe::{challenge_from_wire, ProbeAnswer};
use hearth_proto::{pb, Limits};
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Code, Request, Response, Status, Streaming};

/// A middle stage of the default model's 30 layers.
const MIDDLE: std::ops::Range<usize> = 11..19;

/// A folder of its own under the system's temporary folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("hearth-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temporary folder");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn member(id: &str, addr: SocketAddr, model: &str) -> NodeInfo {
    NodeInfo {
        node_id: id.into(),
        data_addr: addr,
        api_addr: addr,
        usable_memory_bytes: 1 << 30,
        backend: "cpu".into(),
        model_id: model.into(),
        ready_epoch: None,
        following_epoch: None,
        data_paths: Vec::new(),
        hops: Vec::new(),
        prepared: None,
    }
}

/// The stage's hidden states for a few positions of fixed input.
fn forward(stage: &Stage) -> Vec<f32> {
    let hidden = stage.config().hidden_size;
    let values: Vec<f32> = (0..3 * hidden).map(|i| ((i % 97) as f32 - 48.0) / 64.0).collect();
    let input = Tensor::from_vec(values, (3, hidden), &Device::Cpu).expect("input");
    let mut cache = stage.new_cache();
    match stage.forward(StageInput::Hidden(&input), &mut cache).expect("forward") {
        StageOutput::Hidden(out) => out.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("values"),
        StageOutput::Logits(_) => panic!("a middle stage returns hidden states"),
    }
}

fn read_range(path: &std::path::Path, range: &std::ops::Range<u64>) -> Vec<u8> {
    let mut file = File::open(path).expect("opens");
    file.seek(SeekFrom::Start(range.start)).expect("seeks");
    let mut bytes = vec![0; (range.end - range.start) as usize];
    file.read_exact(&mut bytes).expect("reads");
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_the_model_fetches_a_middle_stage_that_computes_the_same() {
    let full = Arc::new(default_model());
    let id = full.name().to_string();
    // Over an authenticated data plane: FetchWeights needs a ticket like Stream does.
    let key = ClusterKey::generate();
    let plane = DataPlane::start(loopback(), Limits::default(), Some(Arc::new(Credentials::new(&key, "server"))), Identity::generate())
        .expect("data plane starts");
    plane.weights().serve_file(full.clone());

    let dir = TempDir::new("fetch-middle");
    let credentials = Some(Arc::new(Credentials::new(&key, "client")));
    let model = NodeModel::from_peers(id.clone(), &dir.0, None, credentials, Limits::default(), WeightServer::default());
    let members = [member(plane.node_id(), plane.addr(), &id), member("client", loopback(), &id)];
    assert!(model.learn(&members, "client").await, "the header comes from the server");
    let source = model.source().expect("the model is known");
    assert_eq!(source.config().num_layers, full.config().num_layers);
    assert_eq!(source.tokenizer().expect("tokenizer").encode("Hello").ok(), full.tokenizer().expect("tokenizer").encode("Hello").ok());

    let fetched = model.for_stage(MIDDLE, None, &members, "client").await.expect("fetches the stage");
    let stage = fetched.load_stage(MIDDLE, &Device::Cpu).expect("loads from the sparse file");
    let reference = full.load_stage(MIDDLE, &Device::Cpu).expect("loads from the full file");
    assert_eq!(forward(&stage), forward(&reference), "the fetched stage computes what the full file's does");

    // The stage's tensors are byte for byte the full file's; the others were never sent.
    let layout = full.file_layout().expect("layout");
    assert_eq!(fetched.file_layout().expect("layout"), layout);
    let stage_names: BTreeSet<String> = full.stage_tensor_names(MIDDLE).expect("names").into_iter().collect();
    for (name, range) in &layout.tensors {
        let here = read_range(fetched.location(), range);
        if stage_names.contains(name) {
            assert!(here == read_range(full.location(), range), "`{name}` differs from the full file");
        } else {
            assert!(here.iter().all(|&b| b == 0), "`{name}` is not part of the stage, yet was fetched");
        }
    }
    let on_disk = std::fs::metadata(fetched.location()).expect("metadata");
    assert_eq!(on_disk.len(), layout.file_bytes, "the file is laid out at its full size");
}

/// How a lying peer corrupts the chunks of an honest one.
#[derive(Clone, Copy)]
enum Lie {
    FlipAByte,
    WrongSize,
    OtherTensor,
    /// Ends the transfer after a few chunks, as a peer that crashes would.
    StopsEarly,
}

struct Liar {
    honest: WeightServer,
    lie: Lie,
    /// A liar is a node of its own, and proves it: it is refused for what it sends.
    identity: Identity,
}

type Chunks = Pin<Box<dyn Stream<Item = Result<pb::WeightChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::pipeline_server::Pipeline for Liar {
    type StreamStream = Chunks2;
    type FetchWeightsStream = Chunks;

    async fn stream(&self, _: Request<Streaming<pb::StageMessage>>) -> Result<Response<Self::StreamStream>, Status> {
        Err(Status::unimplemented("a liar runs no stage"))
    }

    async fn probe(&self, request: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeReply>, Status> {
        let nonce = challenge_from_wire(request.get_ref())?;
        let proof = nonce.and_then(|nonce| peer_identity::prove(&self.identity, &nonce));
        Ok(Response::new(ProbeAnswer { received_bytes: 0, proof }.into_wire()))
    }

    async fn fetch_weights(&self, request: Request<pb::WeightRequest>) -> Result<Response<Self::FetchWeightsStream>, Status> {
        let lie = self.lie;
        let limit = if matches!(lie, Lie::StopsEarly) { 3 } else { usize::MAX };
        let chunks = self.honest.fetch(request.into_inner())?.take(limit).map(move |chunk| {
            chunk.map(|mut chunk| {
                match lie {
                    Lie::FlipAByte => {
                        let mut data = chunk.data.to_vec();
                        if let Some(byte) = data.last_mut() {
                            *byte ^= 1;
                        }
                        chunk.data = data.into();
                    }
                    Lie::WrongSize => chunk.tensor_size += 1,
                    Lie::OtherTensor => chunk.tensor = "blk.0.attn_q.weight".into(),
                    Lie::StopsEarly => {}
                }
                chunk
            })
        });
        Ok(Response::new(Box::pin(chunks)))
    }
}

type Chunks2 = Pin<Box<dyn Stream<Item = Result<pb::StageMessage, Status>> + Send>>;

/// A liar's node id and address.
async fn start_liar(full: &Arc<ModelSource>, lie: Lie) -> DataPeer {
    let honest = WeightServer::default();
    let identity = Identity::generate();
    let node_id = identity.node_id().to_string();
    honest.serve_file(full.clone());
    let listener = tokio::net::TcpListener::bind(loopback()).await.expect("binds");
    let addr = listener.local_addr().expect("address");
    let server = pb::pipeline_server::PipelineServer::new(Liar { honest, lie, identity }).with_limits(&Limits::default());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    DataPeer { node_id, addr }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_peer_is_refused_and_an_honest_one_completes_the_stage() {
    let full = Arc::new(default_model());
    let id = full.name().to_string();
    let layout = full.file_layout().expect("layout");
    let names = full.stage_tensor_names(MIDDLE).expect("names");
    let dir = TempDir::new("fetch-liars");

    let lies = [
        (Lie::FlipAByte, "BadDigest"),
        (Lie::WrongSize, "WrongSize"),
        (Lie::OtherTensor, "WrongTensor"),
        (Lie::StopsEarly, "Incomplete"),
    ];
    for (lie, expected) in lies {
        let liar = start_liar(&full, lie).await;
        let path = dir.0.join(format!("{expected}.gguf"));
        let file = File::options().read(true).write(true).create(true).truncate(true).open(&path).expect("creates");
        file.set_len(layout.file_bytes).expect("sizes");
        let mut done = BTreeSet::new();
        let error = fetch_tensors(&liar, &id, MIDDLE, &names, &Arc::new(file), &layout, None, Limits::default(), &mut done)
            .await
            .expect_err("a lying peer is refused");
        let refusal = error.downcast_ref::<FetchError>().unwrap_or_else(|| panic!("not a refusal: {error:#}"));
        assert!(format!("{refusal:?}").starts_with(expected), "{expected}: {refusal:?}");
        // What was verified in full is kept (a broken transfer resumes from there);
        // nothing of a tensor with a bad chunk is.
        assert!(done.len() < names.len(), "{expected}: {done:?}");
        if matches!(lie, Lie::FlipAByte | Lie::WrongSize | Lie::OtherTensor) {
            assert!(done.is_empty(), "{expected}: nothing of the liar's is kept");
        }
    }

    // A node that asks the liar first goes on to an honest peer, and gets a stage that
    // computes what the full file's does.
    let liar = start_liar(&full, Lie::FlipAByte).await;
    let honest = DataPlane::start(loopback(), Limits::default(), None, Identity::generate()).expect("starts");
    honest.weights().serve_file(full.clone());
    let model = NodeModel::from_peers(id.clone(), &dir.0.join("node"), None, None, Limits::default(), WeightServer::default());
    let members = [member(&liar.node_id, liar.addr, &id), member(honest.node_id(), honest.addr(), &id)];
    // The header comes from the liar as well, and is refused there.
    assert!(model.learn(&members, "me").await);
    let fetched = model.for_stage(MIDDLE, None, &members, "me").await.expect("the honest peer completes the stage");
    let stage = fetched.load_stage(MIDDLE, &Device::Cpu).expect("loads");
    let reference = full.load_stage(MIDDLE, &Device::Cpu).expect("loads");
    assert_eq!(forward(&stage), forward(&reference));
}

async fn refusal(client: &mut pb::pipeline_client::PipelineClient<tonic::transport::Channel>, request: pb::WeightRequest) -> Status {
    match client.fetch_weights(Request::new(request)).await {
        Ok(response) => {
            let mut chunks = response.into_inner();
            match chunks.message().await {
                Err(status) => status,
                Ok(chunk) => panic!("accepted, sending {chunk:?}"),
            }
        }
        Err(status) => status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_weight_requests_are_refused() {
    let full = Arc::new(default_model());
    let id = full.name().to_string();
    let plane = DataPlane::start(loopback(), Limits::default(), None, Identity::generate()).expect("starts");
    let mut client = pb::pipeline_client::PipelineClient::connect(format!("http://{}", plane.addr())).await.expect("connects");

    // No model yet: nothing to serve.
    let stage = |start, end, tensors: Vec<String>| pb::WeightRequest {
        model: id.clone(),
        layer_start: start,
        layer_end: end,
        tensors,
        header: false,
    };
    assert_eq!(refusal(&mut client, stage(0, 1, vec![])).await.code(), Code::NotFound);
    plane.weights().serve_file(full.clone());

    let cases = [
        ("an unknown tensor", stage(0, 1, vec!["blk.0.no_such.weight".into()]), Code::NotFound),
        ("a path", stage(0, 1, vec!["../../../../etc/passwd".into()]), Code::NotFound),
        ("a tensor of another stage", stage(0, 1, vec!["blk.5.attn_q.weight".into()]), Code::NotFound),
        ("the header as a tensor", stage(0, 1, vec!["<header>".into()]), Code::NotFound),
        ("layers past the model's", stage(0, 1_000_000_000, vec![]), Code::InvalidArgument),
        ("layers past the model's, at its end", stage(29, 31, vec![]), Code::InvalidArgument),
        ("an empty layer range", stage(7, 7, vec![]), Code::InvalidArgument),
        ("a reversed layer range", stage(9, 2, vec![]), Code::InvalidArgument),
        ("too many tensor names", stage(0, 1, vec!["blk.0.attn_q.weight".into(); 5000]), Code::InvalidArgument),
        ("an overlong tensor name", stage(0, 1, vec!["x".repeat(100_000)]), Code::InvalidArgument),
        ("another model", pb::WeightRequest { model: "other".into(), ..stage(0, 1, vec![]) }, Code::NotFound),
        ("no model", pb::WeightRequest { model: String::new(), ..stage(0, 1, vec![]) }, Code::InvalidArgument),
        ("a header with layers", pb::WeightRequest { header: true, ..stage(0, 1, vec![]) }, Code::InvalidArgument),
    ];
    for (what, request, code) in cases {
        let status = refusal(&mut client, request).await;
        assert_eq!(status.code(), code, "{what}: {status}");
    }

    // The server is unharmed: a good request is served, in chunks within the limit.
    let request = stage(0, 1, vec!["blk.0.attn_norm.weight".into()]);
    let mut chunks = client.fetch_weights(Request::new(request)).await.expect("served").into_inner();
    let chunk = chunks.message().await.expect("a chunk").expect("a chunk");
    assert_eq!(chunk.tensor, "blk.0.attn_norm.weight");
    assert!(chunks.message().await.expect("ends").is_none());
}
