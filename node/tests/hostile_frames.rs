//! Frames that claim enormous shapes, or carry payloads at and over the frame limit, are
//! refused without the data plane allocating what they claim; the stage keeps serving.
//!
//! The whole test (client, server, stage) runs in this process, so its resident set
//! (`VmRSS` in /proc/self/status) bounds what the data plane allocated for the frames.

mod common;

use common::default_model;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use hearth_mesh::identity::Identity;
use hearth_models::sampling::SamplingParams;
use hearth_node::data_plane::{DataPlane, Neighbour, StageRole};
use hearth_node::engine::{collect, Generation};
use hearth_node::holder::{Holder, ModelInfo, Route};
use hearth_proto::{pb, Limits};

const MIB: u64 = 1 << 20;



/// This process's resident set, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status.lines().find(|line| line.starts_with("VmRSS:")).expect("VmRSS");
    let kib: u64 = line.split_whitespace().nth(1).expect("a number").parse().expect("kB");
    kib * 1024
}

/// Samples the resident set every few milliseconds until dropped; keeps the peak.
struct PeakRss {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PeakRss {
    fn start() -> Self {
        let peak = Arc::new(AtomicU64::new(rss()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(2));
                }
            })
        };
        Self { peak, stop, thread: Some(thread) }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().expect("running").join().expect("the sampler ends");
        self.peak.load(Ordering::Relaxed).max(rss())
    }
}

fn activation(epoch: u64, sequence_id: u64, shape: Vec<u64>, data: Vec<u8>) -> pb::StageMessage {
    pb::StageMessage {
        kind: Some(pb::stage_message::Kind::Activation(pb::ActivationFrame {
            epoch,
            sequence_id,
            start_position: 0,
            dtype: pb::Dtype::F32.into(),
            shape,
            data: data.into(),
            generation: None,
            steps: false,
        })),
    }
}

type Client = pb::pipeline_client::PipelineClient<tonic::transport::Channel>;

/// Sends `frame` alone on a new stream and returns how the data plane answered: the
/// stream's error status, or `None` if it ended without one.
async fn send_one(client: &mut Client, frame: pb::StageMessage) -> Result<Option<pb::StageMessage>, tonic::Status> {
    let call = async {
        let mut replies = client.stream(tokio_stream::iter([frame])).await?.into_inner();
        replies.message().await
    };
    tokio::time::timeout(Duration::from_secs(60), call).await.expect("the data plane answers within 60 s")
}

fn assert_refused(what: &str, answer: Result<Option<pb::StageMessage>, tonic::Status>) -> tonic::Code {
    match answer {
        Err(status) => {
            assert!(
                matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::OutOfRange),
                "{what}: refused with {status}, not InvalidArgument/OutOfRange"
            );
            status.code()
        }
        Ok(reply) => panic!("{what}: not refused with an error status; the stream answered {reply:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enormous_frames_are_refused_without_allocating_what_they_claim() {
    let source = default_model();
    let n = source.config().num_layers;
    let hidden = source.config().hidden_size as u64;
    let limits = Limits::default();
    let max_frame = limits.max_frame_bytes;
    let epoch = 1;
    let plane = DataPlane::start(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0), limits, None, Identity::generate()).expect("starts");
    // The last stage: it takes hidden states (activation frames) and samples.
    let stage = source.load_stage(1..n, &Device::Cpu).expect("loads");
    plane.install(StageRole { epoch, stage: stage.into(), next: None, first: Neighbour::Local }).await.expect("installs");

    // No client-side limits: the client sends whatever it is given, as a hostile peer would.
    let mut client = Client::connect(format!("http://{}", plane.addr()))
        .await
        .expect("connects")
        .max_encoding_message_size(usize::MAX)
        .max_decoding_message_size(usize::MAX);

    // Warm up the connection and the refusal path so that the baseline includes them.
    assert_refused("warm-up", send_one(&mut client, activation(epoch, 1, vec![2, 2], vec![0; 3])).await);
    let accepted_before = plane.stats().frames_accepted.load(Ordering::Relaxed);
    let refused_before = plane.stats().frames_refused.load(Ordering::Relaxed);
    let baseline = rss();

    // 1. Enormous claimed shapes, tiny payloads: 50 frames. Nothing here may grow the
    // resident set beyond noise.
    let sampler = PeakRss::start();
    let shapes: [Vec<u64>; 5] = [
        vec![1_000_000, 1_000_000],
        vec![u64::MAX, 2],
        vec![2, u64::MAX],
        vec![u64::MAX, hidden],
        vec![1 << 32, 1 << 32],
    ];
    let mut enormous = 0;
    for i in 0..50u64 {
        let shape = shapes[i as usize % shapes.len()].clone();
        let payload = vec![0u8; 16 + (i as usize % 4) * 4];
        assert_refused(&format!("shape {shape:?}"), send_one(&mut client, activation(epoch, 100 + i, shape, payload)).await);
        enormous += 1;
    }
    let peak_enormous = sampler.finish();
    let after_enormous = rss();
    eprintln!(
        "{enormous} enormous-shape frames: RSS {} MiB -> {} MiB, peak {} MiB",
        baseline / MIB,
        after_enormous / MIB,
        peak_enormous / MIB
    );
    assert!(
        peak_enormous.saturating_sub(baseline) < 100 * MIB,
        "enormous claimed shapes grew the resident set by {} MiB",
        peak_enormous.saturating_sub(baseline) / MIB
    );

    // 2. Payloads just under the frame limit, mismatched with their (plausible) shapes,
    // then payloads over the frame limit but within the gRPC message limit (refused by
    // validation), then a message over the gRPC message limit (refused by tonic).
    let sampler = PeakRss::start();
    let under = max_frame - 1;
    let big_cases: Vec<(String, Vec<u64>, usize)> = vec![
        (format!("{under} bytes for 1 x {hidden}"), vec![1, hidden], under),
        (format!("{under} bytes for 4096 x {hidden}"), vec![4096, hidden], under),
        (format!("{under} bytes for 10^6 x 10^6"), vec![1_000_000, 1_000_000], under),
        (format!("{} bytes (4 over the frame limit) for a matching-size shape", max_frame + 4), vec![1, (max_frame as u64 + 4) / 4], max_frame + 4),
    ];
    let mut big = 0;
    for (i, (what, shape, len)) in big_cases.into_iter().enumerate() {
        let answer = send_one(&mut client, activation(epoch, 200 + i as u64, shape, vec![0x3f; len])).await;
        let code = assert_refused(&what, answer);
        eprintln!("{what}: {code:?}");
        big += 1;
    }
    // Over the gRPC message limit: tonic on the data plane refuses to decode it, and the
    // sender is told so with an error status.
    let over = limits.max_message_bytes() + 1024;
    let answer = send_one(&mut client, activation(epoch, 300, vec![1, over as u64 / 4], vec![0x3f; over])).await;
    eprintln!("{over} bytes (over the message limit): {answer:?}");
    let over_status = assert_refused(&format!("{over} bytes, over the message limit"), answer);
    big += 1;
    let peak_big = sampler.finish();
    // Give the allocator a moment to hand freed payload buffers back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_big = rss();
    eprintln!(
        "{big} large-payload frames (over-limit refused with {over_status:?}): RSS {} MiB -> {} MiB, peak {} MiB",
        after_enormous / MIB,
        after_big / MIB,
        peak_big / MIB
    );

    // 3. Nothing was accepted; every decodable frame was counted as refused.
    let accepted = plane.stats().frames_accepted.load(Ordering::Relaxed) - accepted_before;
    let refused = plane.stats().frames_refused.load(Ordering::Relaxed) - refused_before;
    eprintln!("frames accepted {accepted}, refused {refused}");
    assert_eq!(accepted, 0, "no hostile frame was accepted");
    assert!(refused >= enormous + 4, "the data plane counted {refused} refusals");

    let growth = after_big.saturating_sub(baseline);
    assert!(growth < 100 * MIB, "the resident set grew by {} MiB overall", growth / MIB);

    // 4. The data plane still serves: a holder talks to a first stage, so install every
    // layer (a new plan) on the same data plane and generate through it.
    let stage = source.load_stage(0..n, &Device::Cpu).expect("loads");
    plane.install(StageRole { epoch: epoch + 1, stage: stage.into(), next: None, first: Neighbour::Local }).await.expect("installs");
    let info = ModelInfo::from_source(&source).expect("model info");
    let (_routes, route) = tokio::sync::watch::channel(Some(Route { epoch: epoch + 1, first_node: plane.node_id().into(), first_stage: plane.addr(), failovers: 0 }));
    let holder = Holder::new(info, route, limits, None);
    let request = Generation {
        prompt: holder.tokenizer().encode("The capital of France is").expect("encodes"),
        sampling: SamplingParams::greedy(),
        max_tokens: 4,
        stop: Vec::new(),
    };
    let (text, outcome) = tokio::time::timeout(Duration::from_secs(60), collect(holder.submit(request).expect("submits")))
        .await
        .expect("generates within 60 s")
        .expect("generates");
    assert!(!text.is_empty() && outcome.completion_tokens > 0, "generated {text:?}");
}
