//! Data planes with a cluster key: only peers that prove they hold it get to stream.

mod common;

use common::{default_model, loopback};

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;

use candle_core::Device;
use hearth_mesh::identity::Identity;
use hearth_mesh::cluster_key::ClusterKey;
use hearth_models::sampling::SamplingParams;
use hearth_node::auth::{AuthError, AuthedChannel, Credentials};
use hearth_node::data_plane::{DataPlane, Neighbour, StageRole};
use hearth_node::engine::{collect, Counters, Generation, Model};
use hearth_node::holder::{Holder, ModelInfo, Route};
use hearth_proto::handshake::{transcript, HandshakeStep, Hello, Proof, Role, SESSION_METADATA_KEY};
use hearth_proto::{pb, Limits};
use hmac::{Hmac, Mac as _};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::{Code, Request};


fn credentials(key: &ClusterKey, id: &str) -> Option<Arc<Credentials>> {
    Some(Arc::new(Credentials::new(key, id)))
}

fn keyed_plane(key: &ClusterKey) -> DataPlane {
    DataPlane::start(loopback(), Limits::default(), credentials(key, "server"), Identity::generate()).expect("data plane starts")
}

async fn pipeline_client(addr: SocketAddr) -> pb::pipeline_client::PipelineClient<tonic::transport::Channel> {
    pb::pipeline_client::PipelineClient::connect(format!("http://{addr}")).await.expect("connects")
}

/// A stream call's outcome: the status it was refused with, or `None` if accepted.
async fn stream_refusal(
    client: &mut pb::pipeline_client::PipelineClient<tonic::transport::Channel>,
    request: Request<ReceiverStream<pb::StageMessage>>,
) -> Option<tonic::Status> {
    client.stream(request).await.err()
}

fn silent_stream() -> ReceiverStream<pb::StageMessage> {
    // The sender is dropped: the call ends after its (empty) request stream.
    ReceiverStream::new(mpsc::channel(1).1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_a_valid_ticket_is_refused() {
    let key = ClusterKey::generate();
    let plane = keyed_plane(&key);
    let mut client = pipeline_client(plane.addr()).await;

    let status = stream_refusal(&mut client, Request::new(silent_stream())).await.expect("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");

    let mut forged = Request::new(silent_stream());
    forged.metadata_mut().insert_bin(SESSION_METADATA_KEY, MetadataValue::from_bytes(&[7; 32]));
    let status = stream_refusal(&mut client, forged).await.expect("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");

    let status = client
        .fetch_weights(Request::new(pb::WeightRequest::default()))
        .await
        .expect_err("refused");
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_the_key_gets_a_ticket_that_opens_streams() {
    let key = ClusterKey::generate();
    let plane = keyed_plane(&key);
    let channel = AuthedChannel::connect(plane.addr(), plane.node_id(), credentials(&key, "client")).await.expect("shakes hands");
    let mut client = pb::pipeline_client::PipelineClient::new(channel.channel());
    for _ in 0..2 {
        let request = channel.request(silent_stream()).await.expect("has a ticket");
        assert!(request.metadata().get_bin(SESSION_METADATA_KEY).is_some());
        assert!(stream_refusal(&mut client, request).await.is_none(), "the ticket opens a stream");
    }
    // A ticket the server forgot (as after a restart) is refused; forgetting it on our
    // side makes the next call shake hands again.
    let status = stream_refusal(&mut client, {
        let mut request = Request::new(silent_stream());
        request.metadata_mut().insert_bin(SESSION_METADATA_KEY, MetadataValue::from_bytes(&[1; 32]));
        request
    })
    .await
    .expect("refused");
    channel.check_status(&status).await;
    let request = channel.request(silent_stream()).await.expect("shakes hands again");
    assert!(stream_refusal(&mut client, request).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_detects_a_server_with_another_key() {
    let plane = keyed_plane(&ClusterKey::generate());
    let error = match AuthedChannel::connect(plane.addr(), plane.node_id(), credentials(&ClusterKey::generate(), "client")).await {
        Ok(_) => panic!("the handshake must fail"),
        Err(error) => error,
    };
    assert!(
        matches!(error.downcast_ref::<AuthError>(), Some(AuthError::PeerLacksKey { .. })),
        "{error:#}"
    );
}

/// Plays the client's side by hand, sending whatever proof `forge` makes: a server must
/// end the call with UNAUTHENTICATED and issue no session.
async fn server_answer(addr: SocketAddr, forge: impl FnOnce(&Hello, &Hello) -> Proof) -> tonic::Status {
    let mut client = pb::auth_client::AuthClient::connect(format!("http://{addr}")).await.expect("connects");
    let (outbound, rx) = mpsc::channel(2);
    let hello = Hello { node_id: "intruder".into(), nonce: [9; 32] };
    outbound.send(HandshakeStep::Hello(hello.clone()).into_wire()).await.unwrap();
    let mut replies = client.handshake(ReceiverStream::new(rx)).await.expect("handshake opens").into_inner();
    let step = |message: Option<pb::HandshakeMessage>| HandshakeStep::from_wire(message.expect("a reply")).expect("valid");
    let HandshakeStep::Hello(server) = step(replies.message().await.expect("hello")) else { panic!("expected a hello") };
    let HandshakeStep::Proof(_) = step(replies.message().await.expect("proof")) else { panic!("expected a proof") };
    outbound.send(HandshakeStep::Proof(forge(&hello, &server)).into_wire()).await.unwrap();
    match replies.message().await {
        Err(status) => status,
        Ok(reply) => panic!("the server answered a forged proof with {reply:?}"),
    }
}

fn mac_with(mac_key: &[u8], role: Role, client: &Hello, server: &Hello) -> Proof {
    let mut mac = Hmac::<Sha256>::new_from_slice(mac_key).unwrap();
    mac.update(&transcript(role, client, server));
    Proof { mac: mac.finalize().into_bytes().into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_refuses_wrong_replayed_and_garbled_proofs() {
    let key = ClusterKey::generate();
    let plane = keyed_plane(&key);
    let good_key = key.derive(b"hearth-auth-v1");
    let wrong_key = ClusterKey::generate().derive(b"hearth-auth-v1");

    // Another cluster's key.
    let status = server_answer(plane.addr(), |c, s| mac_with(&wrong_key, Role::Client, c, s)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    // The raw cluster key instead of the derived one.
    let raw: [u8; 32] = Sha256::digest(b"not the key").into();
    let status = server_answer(plane.addr(), |c, s| mac_with(&raw, Role::Client, c, s)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    // Right key, wrong role: the server's own proof reflected.
    let status = server_answer(plane.addr(), |c, s| mac_with(&good_key, Role::Server, c, s)).await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    // Garbled.
    let status = server_answer(plane.addr(), |c, s| {
        let mut proof = mac_with(&good_key, Role::Client, c, s);
        proof.mac[0] ^= 0x80;
        proof
    })
    .await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    // Replayed: a proof good for an earlier exchange (an earlier server nonce).
    let mut earlier = None;
    let status = server_answer(plane.addr(), |c, s| {
        earlier = Some(s.clone());
        mac_with(&wrong_key, Role::Client, c, s)
    })
    .await;
    assert_eq!(status.code(), Code::Unauthenticated);
    let earlier = earlier.unwrap();
    let status = server_answer(plane.addr(), |c, s| {
        assert_ne!(s.nonce, earlier.nonce, "every handshake has a fresh nonce");
        mac_with(&good_key, Role::Client, c, &earlier)
    })
    .await;
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");

    // And the honest proof gets a session.
    let mut client = pb::auth_client::AuthClient::connect(format!("http://{}", plane.addr())).await.unwrap();
    let (outbound, rx) = mpsc::channel(2);
    let hello = Hello { node_id: "friend".into(), nonce: [3; 32] };
    outbound.send(HandshakeStep::Hello(hello.clone()).into_wire()).await.unwrap();
    let mut replies = client.handshake(ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut next = async || HandshakeStep::from_wire(replies.message().await.unwrap().unwrap()).unwrap();
    let HandshakeStep::Hello(server) = next().await else { panic!() };
    let HandshakeStep::Proof(proof) = next().await else { panic!() };
    assert_eq!(proof, mac_with(&good_key, Role::Server, &hello, &server), "the server proves itself");
    outbound.send(HandshakeStep::Proof(mac_with(&good_key, Role::Client, &hello, &server)).into_wire()).await.unwrap();
    let HandshakeStep::Session(session) = next().await else { panic!("expected a session") };
    assert_eq!(session.ticket.len(), 32);
    assert!(session.ttl_seconds > 0);
}


/// Two keyed stages and a keyed holder: every link shakes hands, and the ring generates
/// what one process does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_ring_generates_what_one_process_does() {
    let key = ClusterKey::generate();
    let source = default_model();
    let n = source.config().num_layers;
    let cuts = [0, 11, n];
    let limits = Limits::default();
    let planes: Vec<DataPlane> = (0..2)
        .map(|i| DataPlane::start(loopback(), limits, credentials(&key, &format!("stage-{i}")), Identity::generate()).expect("starts"))
        .collect();
    for (i, window) in cuts.windows(2).enumerate() {
        let stage = source.load_stage(window[0]..window[1], &Device::Cpu).expect("stage loads");
        let next = planes.get(i + 1).map(|p| Neighbour::Remote { node_id: p.node_id().into(), addr: p.addr() });
        let first = if i == 0 { Neighbour::Local } else { Neighbour::Remote { node_id: planes[0].node_id().into(), addr: planes[0].addr() } };
        planes[i].install(StageRole { epoch: 2, stage: stage.into(), next, first }).await.expect("installs");
    }
    let tokenizer = source.tokenizer().expect("tokenizer");
    let chat_template = source.chat_template(&tokenizer).expect("template").expect("the model has one");
    let config = source.config();
    let info = ModelInfo {
        id: source.name().into(),
        context_length: config.context_length,
        hidden_size: config.hidden_size,
        vocab_size: config.vocab_size,
        tokenizer,
        chat_template,
    };
    let (_routes, route) = tokio::sync::watch::channel(Some(Route { epoch: 2, first_node: planes[0].node_id().into(), first_stage: planes[0].addr(), failovers: 0 }));
    let holder = Holder::new(info, route, limits, credentials(&key, "holder"));
    let request = Generation {
        prompt: holder.tokenizer().encode("The capital of France is").expect("encodes"),
        sampling: SamplingParams::greedy(),
        max_tokens: 8,
        stop: Vec::new(),
    };
    let model = Model::load(&source, &Device::Cpu).expect("model loads");
    let mut expected = String::new();
    model
        .generate(&request, &Counters::default(), |piece| {
            expected.push_str(piece);
            ControlFlow::Continue(())
        })
        .expect("generates");
    let (text, _) = collect(holder.submit(request).expect("submits")).await.expect("generates");
    assert_eq!(text, expected);
}
