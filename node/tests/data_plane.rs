//! Stages on separate data planes, linked over real gRPC streams, generate exactly what
//! the whole model generates in one process.

mod common;

use common::{default_model, loopback};

use std::ops::ControlFlow;

use candle_core::Device;
use hearth_models::sampling::SamplingParams;
use hearth_models::ModelSource;
use hearth_node::data_plane::{DataPlane, Neighbour, StageRole};
use hearth_node::engine::{collect, Counters, Generation, Model};
use hearth_node::holder::{Holder, ModelInfo, Route};
use hearth_proto::Limits;




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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_stages_over_grpc_generate_what_one_process_does() {
    let source = default_model();
    let info = ModelInfo::from_source(&source).expect("model info");
    let n = source.config().num_layers;
    let cuts = [0, 5, 17, n];
    let limits = Limits::default();
    let planes: Vec<DataPlane> =
        cuts.windows(2).map(|_| DataPlane::start(loopback(), limits, None).expect("data plane starts")).collect();
    for (i, window) in cuts.windows(2).enumerate() {
        let stage = source.load_stage(window[0]..window[1], &Device::Cpu).expect("stage loads");
        let next = planes.get(i + 1).map(|p| Neighbour::Remote(p.addr()));
        let first = if i == 0 { Neighbour::Local } else { Neighbour::Remote(planes[0].addr()) };
        planes[i].install(StageRole { epoch: 3, stage, next, first }).await.expect("installs");
    }
    let (_routes, route) = tokio::sync::watch::channel(Some(Route { epoch: 3, first_stage: planes[0].addr(), failovers: 0 }));
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_frame_is_refused_and_the_stage_keeps_serving() {
    use hearth_proto::pb;
    let source = default_model();
    let n = source.config().num_layers;
    let plane = DataPlane::start(loopback(), Limits::default(), None).expect("starts");
    let stage = source.load_stage(0..n, &Device::Cpu).expect("loads");
    plane.install(StageRole { epoch: 1, stage, next: None, first: Neighbour::Local }).await.expect("installs");

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
        })),
    };
    let mut replies = client.stream(tokio_stream::iter([frame])).await.expect("stream opens").into_inner();
    let status = replies.message().await.expect_err("the frame is refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");

    // The stage still serves a well-formed request.
    let info = ModelInfo::from_source(&source).expect("model info");
    let (_routes, route) = tokio::sync::watch::channel(Some(Route { epoch: 1, first_stage: plane.addr(), failovers: 0 }));
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
