//! Stages on separate data planes, linked over real gRPC streams, generate exactly what
//! the whole model generates in one process.

mod common;

use common::{default_model, loopback};

use std::ops::ControlFlow;

use candle_core::Device;
use hearth_mesh::identity::Identity;
use hearth_models::sampling::SamplingParams;
use hearth_models::ModelSource;
use hearth_node::data_plane::{DataPlane, Neighbour, StageRole};
use hearth_node::engine::{collect, Counters, Generation, Model};
use hearth_node::holder::{Holder, ModelInfo, Route};
use hearth_proto::frame::{Expect, Generation as WireGeneration, Prefill, Sampling, StageFrame};
use hearth_proto::Limits;
use tokio_stream::StreamExt as _;




/// The reference: the whole model in this process.
fn local_text(source: &ModelSource, request: &Generation) -> String {
    let model = Model::load(source, &Device::Cpu).expect("model loads");
    let mut text = String::new();
    model
        .generate(request, &Counters::default(), |piece| {
            text.push_str(piece);
            ControlFlow::Continue(())
        })
        .expect("generates");
    text
}

/// Data planes on loopback running the stages between `cuts`, linked into a pipeline (epoch 3).
async fn pipeline(source: &ModelSource, cuts: &[usize], limits: Limits) -> Vec<DataPlane> {
    let planes: Vec<DataPlane> =
        cuts.windows(2).map(|_| DataPlane::start(loopback(), limits, None, Identity::generate()).expect("data plane starts")).collect();
    for (i, window) in cuts.windows(2).enumerate() {
        let stage = source.load_stage(window[0]..window[1], &Device::Cpu).expect("stage loads");
        let next = planes.get(i + 1).map(|p| Neighbour::Remote { node_id: p.node_id().into(), addr: p.addr() });
        let first = if i == 0 { Neighbour::Local } else { Neighbour::Remote { node_id: planes[0].node_id().into(), addr: planes[0].addr() } };
        planes[i].install(StageRole { epoch: 3, stage: stage.into(), next, first }).await.expect("installs");
    }
    planes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_stages_over_grpc_generate_what_one_process_does() {
    let source = default_model();
    let info = ModelInfo::from_source(&source).expect("model info");
    let n = source.config().num_layers;
    let limits = Limits::default();
    let planes = pipeline(&source, &[0, 5, 17, n], limits).await;
    let (_routes, route) = tokio::sync::watch::channel(Some(Route { epoch: 3, first_node: planes[0].node_id().into(), first_stage: planes[0].addr(), failovers: 0 }));
    let holder = Holder::new(info, route, limits, None);

    for (prompt, sampling) in [
        ("The capital of France is", SamplingParams::greedy()),
        ("Once upon a time", SamplingParams { temperature: 0.8, top_p: 0.95, top_k: 40, seed: 7 }),
    ] {
        let request = Generation {
            prompt: holder.tokenizer().encode(prompt).expect("encodes"),
            sampling,
            max_tokens: 16,
            stop: Vec::new(),
        };
        let expected = local_text(&source, &request);
        let (text, outcome) = collect(holder.submit(request).expect("submits")).await.expect("generates");
        assert_eq!(text, expected, "{prompt:?} over three stages");
        assert!(outcome.completion_tokens > 0);
    }
}

/// What a holder sees of one pass of a sequence: each token and the sampler's word
/// position after it.
async fn run_sequence(
    first_stage: std::net::SocketAddr,
    expect: &Expect,
    sequence_id: u64,
    prompt: &[u32],
    sampling: Sampling,
    forced_tokens: Vec<u32>,
    completion: usize,
) -> Vec<(u32, u128)> {
    use hearth_proto::pb;
    let prefill = Prefill {
        epoch: 3,
        sequence_id,
        start_position: 0,
        tokens: prompt.to_vec(),
        generation: Some(WireGeneration {
            sampling,
            max_len: (prompt.len() + completion) as u32,
            stop_tokens: Vec::new(),
            forced_tokens,
        }),
    };
    let mut client =
        pb::pipeline_client::PipelineClient::connect(format!("http://{first_stage}")).await.expect("connects");
    let frames = tokio_stream::iter([StageFrame::Prefill(prefill).into_wire()]).chain(tokio_stream::pending());
    let mut replies = client.stream(frames).await.expect("stream opens").into_inner();
    let mut tokens = Vec::new();
    while tokens.len() < completion {
        let reply = tokio::time::timeout(std::time::Duration::from_secs(60), replies.message());
        let message = reply.await.expect("a token within a minute").expect("a reply").expect("the stream stays open");
        match StageFrame::from_wire(message, &Limits::default(), expect).expect("a valid frame") {
            StageFrame::Token(token) => tokens.push((token.id, token.word_pos)),
            other => panic!("not a token: {other:?}"),
        }
    }
    tokens
}

/// A replay (the prompt again, the tokens generated so far forced) gives the tokens of the
/// first pass, then goes on exactly as the first pass did; and its known tokens go down
/// the pipeline together, in far fewer frames than one per token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_continues_exactly_and_sends_its_known_tokens_together() {
    let source = default_model();
    let n = source.config().num_layers;
    let limits = Limits::default();
    let planes = pipeline(&source, &[0, 9, 20, n], limits).await;
    let info = ModelInfo::from_source(&source).expect("model info");
    let prompt = info.tokenizer.encode("Once upon a time, in a village by the sea,").expect("encodes");
    let completion = 40;
    let expect = Expect { epoch: 3, hidden_size: info.hidden_size, vocab_size: info.vocab_size as u32 };
    let last = planes[2].stats().clone();
    let frames = || last.frames_accepted.load(std::sync::atomic::Ordering::Relaxed);
    // The frames the last stage took since `before`, once the `expected` have come (the
    // reset that ends a sequence may trail its last token) and a moment more has passed.
    let frames_since = |before: u64, expected: u64| async move {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while frames() - before < expected && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        frames() - before
    };
    for (seed, temperature) in [(0, 0.0), (7, 0.9)] {
        let sampling = Sampling { temperature, top_p: 0.95, top_k: 40, seed, word_pos: 0 };
        let before = frames();
        let first = run_sequence(planes[0].addr(), &expect, 100 + seed, &prompt, sampling, Vec::new(), completion).await;
        // One frame for the prompt, one per generated token but the last, and the reset.
        let expected = completion as u64 + 1;
        assert_eq!(frames_since(before, expected).await, expected, "seed {seed}");

        for known in [1, 17, 33] {
            let forced: Vec<u32> = first[..known].iter().map(|&(id, _)| id).collect();
            let resumed = Sampling { word_pos: first[known - 1].1, ..sampling };
            let before = frames();
            let replay = run_sequence(planes[0].addr(), &expect, 200 + seed + known as u64, &prompt, resumed, forced, completion).await;
            let replay_ids: Vec<u32> = replay.iter().map(|&(id, _)| id).collect();
            let first_ids: Vec<u32> = first.iter().map(|&(id, _)| id).collect();
            assert_eq!(replay_ids, first_ids, "seed {seed}, {known} known tokens");
            // The prompt, the known tokens in frames of 16 steps, one per new token but the
            // last, and the reset.
            let expected = 1 + known.div_ceil(16) as u64 + (completion - known - 1) as u64 + 1;
            assert_eq!(frames_since(before, expected).await, expected, "seed {seed}, {known} known tokens");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_is_refused_and_the_stage_keeps_serving() {
    use hearth_proto::pb;
    let source = default_model();
    let n = source.config().num_layers;
    let plane = DataPlane::start(loopback(), Limits::default(), None, Identity::generate()).expect("starts");
    let stage = source.load_stage(0..n, &Device::Cpu).expect("loads");
    plane.install(StageRole { epoch: 1, stage: stage.into(), next: None, first: Neighbour::Local }).await.expect("installs");

    let mut client = pb::pipeline_client::PipelineClient::connect(format!("http://{}", plane.addr())).await.expect("connects");
    // Claims 10^12 elements of hidden state and carries 16 bytes.
    let frame = pb::StageMessage {
        kind: Some(pb::stage_message::Kind::Activation(pb::ActivationFrame {
            epoch: 1,
            sequence_id: 9,
            start_position: 0,
            dtype: pb::Dtype::F32.into(),
            shape: vec![1_000_000, 1_000_000],
            data: vec![0u8; 16].into(),
            generation: None,
            steps: false,
        })),
    };
    let mut replies = client.stream(tokio_stream::iter([frame])).await.expect("stream opens").into_inner();
    let status = replies.message().await.expect_err("the frame is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");

    // The stage still serves a well-formed request.
    let info = ModelInfo::from_source(&source).expect("model info");
    let (_routes, route) = tokio::sync::watch::channel(Some(Route { epoch: 1, first_node: plane.node_id().into(), first_stage: plane.addr(), failovers: 0 }));
    let holder = Holder::new(info, route, Limits::default(), None);
    let request = Generation {
        prompt: holder.tokenizer().encode("The capital of France is").expect("encodes"),
        sampling: SamplingParams::greedy(),
        max_tokens: 4,
        stop: Vec::new(),
    };
    let (text, _) = collect(holder.submit(request).expect("submits")).await.expect("generates");
    assert!(!text.is_empty());
}
