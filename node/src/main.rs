//! `hearth`: run a language model too big for one machine on the machines you own.

use std::io::Write as _;
use std::net::SocketAddr;
use std::ops::ControlFlow;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use hearth_models::chat_template::ChatMessage;
use hearth_models::sampling::SamplingParams;
use hearth_models::ModelSource;

use std::sync::{Arc, OnceLock};

use hearth_mesh::discovery::{Backend, InterfacePolicy, ManualPeer};
use hearth_node::cluster::{self, ClusterOptions};
use hearth_node::data_plane::DataPlane;
use hearth_node::device::{self, DeviceChoice};
use hearth_node::engine::{Counters, Generation, Model};
use hearth_node::holder::{Holder, ModelInfo};
use hearth_node::model_store::{ModelSpec, ModelStore};
use hearth_node::weights::NodeModel;
use hearth_node::{api, auth, bench, status};

/// The API's default address: loopback only, so nothing on the network reaches a node
/// unless its owner says so.
const DEFAULT_API_ADDR: &str = "127.0.0.1:5280";
/// The data plane listens on every interface: other nodes' stages connect to it.
const DEFAULT_DATA_ADDR: &str = "0.0.0.0:5282";
/// The control plane likewise: peers connect to it.
const DEFAULT_CONTROL_ADDR: &str = "0.0.0.0:5281";

#[derive(Parser)]
#[command(name = "hearth", version, about = "A private inference mesh: one model across the machines you own")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // Parsed once per process.
enum Command {
    /// Load a model and serve the OpenAI-compatible API.
    Serve(ServeArgs),
    /// Generate a continuation of a prompt and print it to stdout.
    Generate(GenerateArgs),
    /// Measure prefill and decode speed; prints one JSON object.
    Bench(BenchArgs),
    /// Fetch a model into the local cache (and verify it) without running it.
    Pull(PullArgs),
    /// Show the cluster a running node is part of: nodes, layers, epoch, coordinator.
    Status(StatusArgs),
    /// Manage the cluster key.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a fresh random cluster key (32 bytes, hex): written to --out with mode
    /// 0600, or printed.
    New {
        /// The file to write; refused if it exists, unless --force.
        #[arg(long, value_name = "PATH")]
        out: Option<std::path::PathBuf>,
        /// Replace an existing file.
        #[arg(long, requires = "out")]
        force: bool,
    },
}

/// How to find and run the model: shared by every command that loads one.
#[derive(Args, Clone)]
struct ModelArgs {
    /// `default` (SmolLM2-135M-Instruct Q4_1), a .gguf file, a Hugging Face folder, or a
    /// Hugging Face repo id (`owner/name`, `owner/name@revision`, `owner/name:FILE.gguf`).
    #[arg(long, default_value = "default")]
    model: ModelSpec,
    /// Where to run the model: cpu, metal, cuda, or auto (Metal on a Mac, else CPU).
    /// For tests, HEARTH_COMPUTE=candle-ops runs candle's ops (the path of Metal and CUDA)
    /// instead of the native CPU kernels.
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// Compute threads (default: one per physical core).
    #[arg(long)]
    threads: Option<usize>,
    /// Cap the context (prompt + completion) below the model's own, in tokens.
    #[arg(long)]
    context: Option<usize>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Address the API listens on. Loopback by default: to serve the LAN, bind another
    /// address, and set an API key.
    #[arg(long, default_value = DEFAULT_API_ADDR)]
    api_addr: SocketAddr,
    /// Require `Authorization: Bearer <KEY>` on every API request.
    #[arg(long, env = "HEARTH_API_KEY", hide_env_values = true, conflicts_with = "api_key_file")]
    api_key: Option<String>,
    /// Read the API key from this file (its first line).
    #[arg(long)]
    api_key_file: Option<std::path::PathBuf>,
    /// Let web pages from ORIGIN (scheme://host[:port]) call the API from a browser
    /// (repeatable; `*` for any page). Without it, browsers refuse other pages' requests.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<api::CorsOrigin>,
    /// Address the data plane (hidden states between stages) listens on.
    #[arg(long, default_value = DEFAULT_DATA_ADDR)]
    data_addr: SocketAddr,
    /// Address the control plane (membership, plans) listens on.
    #[arg(long, default_value = DEFAULT_CONTROL_ADDR)]
    control_addr: SocketAddr,
    /// Only nodes with the same cluster name form a cluster.
    #[arg(long, default_value = "hearth")]
    cluster: String,
    /// Another node's control address (HOST:PORT), for networks where mDNS does not
    /// reach (repeatable).
    #[arg(long = "peer", value_name = "HOST:PORT")]
    peers: Vec<ManualPeer>,
    /// The network interface to find peers on (default: every LAN interface, skipping
    /// loopback, container and VM bridges).
    #[arg(long)]
    interface: Option<String>,
    /// Do not advertise or look for peers with mDNS; only --peer addresses are joined.
    #[arg(long)]
    no_mdns: bool,
    /// Memory this node offers for model layers and KV caches, its OS reserve already
    /// taken off (e.g. 300MiB, 24GiB; default: physical memory less a reserve).
    #[arg(long, value_parser = parse_memory_limit)]
    memory_limit: Option<u64>,
    /// Where this node keeps its identity key (default: $HEARTH_DATA_DIR, else the
    /// platform's data folder).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
    /// The cluster key (from `hearth key new`): only nodes holding it join the cluster.
    /// Also read, in hex, from $HEARTH_CLUSTER_KEY. Without one, anyone on the link can.
    #[arg(long, value_name = "PATH")]
    cluster_key_file: Option<std::path::PathBuf>,
}

#[derive(Args)]
struct StatusArgs {
    /// The API of any node of the cluster.
    #[arg(long, default_value = "http://127.0.0.1:5280")]
    api: String,
    /// Print the raw JSON of GET /v1/cluster.
    #[arg(long)]
    json: bool,
}

fn parse_memory_limit(text: &str) -> Result<u64, String> {
    hearth_mesh::parse_size(text).map_err(|e| e.to_string())
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt to continue.
    #[arg(long)]
    prompt: String,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Seed for sampling: the same seed gives the same output.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Treat the prompt as a user message and apply the model's chat template.
    #[arg(long)]
    chat: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens to decode for the decode figure.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Times to repeat each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

#[derive(Args)]
struct PullArgs {
    #[arg(long, default_value = "default")]
    model: ModelSpec,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Serve(_) | Command::Pull(_) => "info",
        Command::Generate(_) | Command::Bench(_) | Command::Status(_) | Command::Key(_) => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Generate(args) => generate(args),
        Command::Bench(args) => bench::run(open_model(&args.model)?, args.decode_tokens, args.repeat),
        Command::Status(args) => status::print(&args.api, args.json),
        Command::Key(KeyCommand::New { out, force }) => auth::new_key(out.as_deref(), force),
        Command::Pull(args) => {
            let store = ModelStore::from_env()?;
            tracing::info!(cache = %store.cache_dir().display(), "resolving {:?}", args.model);
            let local = store.resolve(&args.model)?;
            println!("{}", local.path().display());
            Ok(())
        }
    }
}

/// Resolves, opens and loads the model a command asked for.
fn open_model(args: &ModelArgs) -> anyhow::Result<Model> {
    let (source, device) = open_source(args)?;
    Model::load(&source, &device)
}

/// Resolves and opens the model a command asked for (reading headers only), and the device.
fn open_source(args: &ModelArgs) -> anyhow::Result<(ModelSource, candle_core::Device)> {
    let device = open_device(args)?;
    Ok((open_local(args)?, device))
}

fn open_device(args: &ModelArgs) -> anyhow::Result<candle_core::Device> {
    // Refused before anything loads, and before a serving node could fall back to its peers.
    device::compute_path_from_env()?;
    if let Some(threads) = args.threads {
        device::set_compute_threads(threads)?;
    }
    args.device.open()
}

/// Resolves (fetching it if need be) and opens the model, reading headers only.
fn open_local(args: &ModelArgs) -> anyhow::Result<ModelSource> {
    let local = ModelStore::from_env()?.resolve(&args.model)?;
    let mut source = ModelSource::open(local.path())
        .with_context(|| format!("opening the model at {}", local.path().display()))?;
    if let Some(context) = args.context {
        source.limit_context(context);
    }
    device::apply_compute_path_from_env(&mut source)?;
    tracing::info!(
        model = source.name(),
        layers = source.config().num_layers,
        context = source.config().context_length,
        device = ?args.device,
        "opened the model"
    );
    Ok(source)
}

/// Where a serving node's model comes from.
enum ModelOrigin {
    /// A file of its own.
    File(Box<ModelSource>),
    /// Its peers, which serve the model under this id.
    Peers(String),
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let device = open_device(&args.model)?;
    // A node that cannot get the model itself (no network, no pip) can still join: its
    // peers have the model, and give it the weights of its layers.
    let origin = match open_local(&args.model) {
        Ok(source) => ModelOrigin::File(Box::new(source)),
        Err(error) => match args.model.model.peer_model_id() {
            Some(id) => {
                tracing::warn!("{error:#}");
                tracing::warn!("joining the cluster without the model: its weights will come from peers serving {id}");
                ModelOrigin::Peers(id)
            }
            None => return Err(error),
        },
    };
    let data_dir = match args.data_dir {
        Some(dir) => dir,
        None => hearth_mesh::identity::default_data_dir()?,
    };
    let identity = hearth_mesh::identity::Identity::load_or_create(&data_dir)?;
    let node_id = identity.node_id().to_string();
    let cluster_key = auth::load_cluster_key(args.cluster_key_file.as_deref())?;
    let credentials = cluster_key.as_ref().map(|key| Arc::new(auth::Credentials::new(key, node_id.clone())));
    let options = ClusterOptions {
        cluster_name: args.cluster,
        data_dir,
        control_listen: args.control_addr,
        peers: args.peers,
        interfaces: args.interface.map_or(InterfacePolicy::Auto, InterfacePolicy::Only),
        mdns: !args.no_mdns,
        usable_memory_bytes: args.memory_limit.unwrap_or_else(hearth_node::system::default_usable_memory),
        backend: backend_of(&device),
        api_addr: args.api_addr,
        cluster_key,
    };
    let api_key = match (args.api_key, &args.api_key_file) {
        (Some(key), _) => Some(key),
        (None, Some(path)) => Some(read_key_file(path)?),
        (None, None) => None,
    };
    if api_key.is_none() && !args.api_addr.ip().is_loopback() {
        tracing::warn!("the API listens on {} without an API key: anyone who can reach it can use the model", args.api_addr);
    }
    let cors_origins = args.cors_origins;
    let limits = hearth_proto::Limits::default();
    let data_plane = DataPlane::start(args.data_addr, limits, credentials.clone(), identity)?;
    let data_plane_stats = data_plane.stats().clone();
    let model = match origin {
        ModelOrigin::File(source) => NodeModel::from_file(*source, data_plane.weights().clone()),
        ModelOrigin::Peers(id) => {
            // A folder of its own: nodes on one machine may share the cache, and must not
            // write each other's file.
            let dir = ModelStore::from_env()?.cache_dir().join("from-peers").join(&node_id);
            NodeModel::from_peers(id, &dir, args.model.context, credentials.clone(), limits, data_plane.weights().clone())
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.api_addr)
            .await
            .with_context(|| format!("binding the API to {}", args.api_addr))?;
        let cluster = cluster::join(options, model.clone(), device, data_plane).await?;
        let holder = holder_once_known(&model, cluster.routes, limits, credentials)?;
        tracing::info!(
            "serving {} on http://{}/v1 (OpenAI-compatible)",
            model.id(),
            listener.local_addr().unwrap_or(args.api_addr)
        );
        axum::serve(listener, api::router(api::AppState { holder, cluster: cluster.view, data_plane: data_plane_stats }, api_key, &cors_origins))
            .with_graceful_shutdown(shutdown_signal())
            .await
            .context("serving the API")
    })
}

/// The request holder: at once for a node with the model file, and for one without, as
/// soon as a peer has given it the file's header (the tokenizer is in it). Until then
/// the API answers 503.
fn holder_once_known(
    model: &NodeModel,
    routes: tokio::sync::watch::Receiver<Option<hearth_node::holder::Route>>,
    limits: hearth_proto::Limits,
    credentials: Option<Arc<auth::Credentials>>,
) -> anyhow::Result<Arc<OnceLock<Holder>>> {
    let holder = Arc::new(OnceLock::new());
    if let Some(source) = model.source() {
        let _ = holder.set(Holder::new(ModelInfo::from_source(&source)?, routes, limits, credentials));
        return Ok(holder);
    }
    let (mut known, slot) = (model.watch(), holder.clone());
    tokio::spawn(async move {
        let Ok(Some(source)) = known.wait_for(Option::is_some).await.map(|source| source.clone()) else { return };
        match ModelInfo::from_source(&source) {
            Ok(info) => {
                let _ = slot.set(Holder::new(info, routes, limits, credentials));
                tracing::info!("serving requests for {}", source.name());
            }
            Err(error) => tracing::error!("the model from the peers cannot serve requests: {error:#}"),
        }
    });
    Ok(holder)
}

fn read_key_file(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the API key from {}", path.display()))?;
    let key = text.lines().next().unwrap_or_default().trim().to_string();
    anyhow::ensure!(!key.is_empty(), "{} holds no API key", path.display());
    Ok(key)
}

fn backend_of(device: &candle_core::Device) -> Backend {
    if device.is_metal() {
        Backend::Metal
    } else if device.is_cuda() {
        Backend::Cuda
    } else {
        Backend::Cpu
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutting down");
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let sampling = SamplingParams { temperature: args.temperature, top_p: args.top_p, top_k: args.top_k, seed: args.seed };
    sampling.validate()?;
    let model = open_model(&args.model)?;
    let prompt_text = if args.chat {
        model.render_chat(&[ChatMessage { role: "user".into(), content: args.prompt }])?
    } else {
        args.prompt
    };
    let prompt = model.tokenizer().encode(&prompt_text)?;
    anyhow::ensure!(!prompt.is_empty(), "the prompt is empty");
    let room = model.context_length().saturating_sub(prompt.len());
    anyhow::ensure!(
        room > 0,
        "the prompt is {} tokens; the context holds {}",
        prompt.len(),
        model.context_length()
    );
    let request = Generation { prompt, sampling, max_tokens: args.max_tokens.min(room), stop: args.stop };
    let mut stdout = std::io::stdout().lock();
    model.generate(&request, &Counters::default(), |text| {
        match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
            Ok(()) => ControlFlow::Continue(()),
            // stdout closed (e.g. piped into `head`): stop generating.
            Err(_) => ControlFlow::Break(()),
        }
    })?;
    // A newline for the terminal's sake; piped output is exactly the continuation.
    if std::io::IsTerminal::is_terminal(&stdout) {
        let _ = writeln!(stdout);
    }
    Ok(())
}
