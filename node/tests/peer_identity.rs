//! Knowing whom an address reaches: a channel, a path or a pipeline hop to an address
//! where another node answers is refused, with or without a cluster key.

mod common;

use common::{default_model, loopback};

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;
use hearth_mesh::cluster_key::ClusterKey;
use hearth_mesh::discovery::InterfacePolicy;
use hearth_mesh::identity::Identity;
use hearth_models::sampling::SamplingParams;
use hearth_node::auth::{AuthError, AuthedChannel, Credentials};
use hearth_node::data_plane::{DataPlane, Neighbour, StageRole};
use hearth_node::engine::{Event, Generation};
use hearth_node::holder::{Holder, ModelInfo, Route};
use hearth_node::paths::Paths;
use hearth_node::peer_identity::NotThePeer;
use hearth_proto::Limits;

fn plane(credentials: Option<Arc<Credentials>>) -> DataPlane {
    DataPlane::start(loopback(), Limits::default(), credentials, Identity::generate()).expect("data plane starts")
}

/// What connecting to `plane` as if it were the node `meant` ends in.
async fn connect_as(plane: &DataPlane, meant: &str, credentials: Option<Arc<Credentials>>) -> Result<(), AuthError> {
    match AuthedChannel::connect(plane.addr(), meant, credentials).await {
        Ok(_) => Ok(()),
        Err(error) => Err(error.downcast::<AuthError>().expect("an authentication error")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_reaches_the_node_meant_and_no_other() {
    let open = plane(None);
    connect_as(&open, open.node_id(), None).await.expect("the node meant is accepted");
    let someone_else = Identity::generate().node_id().to_string();
    let refused = connect_as(&open, &someone_else, None).await.expect_err("another node is refused");
    let AuthError::NotThePeer { expected, why: NotThePeer::OtherNode { answered }, .. } = refused else {
        panic!("not refused as another node: {refused}");
    };
    assert_eq!((expected.as_str(), answered.as_str()), (someone_else.as_str(), open.node_id()));

    // With a cluster key, holding the key proves membership, not which member.
    let key = ClusterKey::generate();
    let keyed = plane(Some(Arc::new(Credentials::new(&key, "server"))));
    let client = Some(Arc::new(Credentials::new(&key, "client")));
    connect_as(&keyed, keyed.node_id(), client.clone()).await.expect("the node meant is accepted");
    let refused = connect_as(&keyed, &someone_else, client).await.expect_err("another member is refused");
    assert!(matches!(refused, AuthError::NotThePeer { why: NotThePeer::OtherNode { .. }, .. }), "{refused}");
    // Without the key no connection is made at all: the handshake fails first.
    let outsider = Some(Arc::new(Credentials::new(&ClusterKey::generate(), "outsider")));
    let refused = connect_as(&keyed, keyed.node_id(), outsider).await.expect_err("no key, no connection");
    assert!(matches!(refused, AuthError::PeerLacksKey { .. }), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_where_another_node_answers_is_never_alive() {
    let here = plane(None);
    let elsewhere = plane(None);
    let paths = Paths::start(None, Limits::default(), InterfacePolicy::Only("lo".into()));
    // Peer A's address is really A's; peer B's listed address is where A answers (as
    // when a peer's old address now belongs to another machine, or is this node's own
    // loopback).
    let (a, b) = (here.node_id().to_string(), Identity::generate().node_id().to_string());
    paths.set_peer(&a, here.addr(), &[]);
    paths.set_peer(&b, here.addr(), &[elsewhere.addr()]);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let view = paths.view();
        let a_alive = view.iter().any(|path| path.to == a && path.alive);
        let b_at_a = view.iter().find(|path| path.to == b && path.addr == here.addr());
        let b_refused = b_at_a.and_then(|path| path.not_the_peer.clone());
        if a_alive && b_refused.is_some() {
            assert_eq!(b_refused.as_deref(), Some(format!("node {a} answered instead").as_str()));
            break;
        }
        assert!(Instant::now() < deadline, "no verdict within 5 s: {view:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // However long it is probed, the impostor's address never becomes B's path, and
    // the address where another node (not B either) answers is not alive.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for path in paths.view().iter().filter(|path| path.to == b) {
        assert!(!path.alive, "{path:?}");
        assert!(path.not_the_peer.is_some(), "{path:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_activation_goes_to_a_stage_that_is_not_the_plans() {
    let source = default_model();
    let info = ModelInfo::from_source(&source).expect("model info");
    let n = source.config().num_layers;
    let (first, second) = (plane(None), plane(None));
    // The plan says the second stage is some other node; the node at its address is
    // not it.
    let meant = Identity::generate().node_id().to_string();
    let next = Some(Neighbour::Remote { node_id: meant, addr: second.addr() });
    let head = source.load_stage(0..11, &Device::Cpu).expect("loads");
    first.install(StageRole { epoch: 4, stage: head.into(), next, first: Neighbour::Local }).await.expect("installs");
    let first_stage = Neighbour::Remote { node_id: first.node_id().into(), addr: first.addr() };
    let tail = source.load_stage(11..n, &Device::Cpu).expect("loads");
    second.install(StageRole { epoch: 4, stage: tail.into(), next: None, first: first_stage }).await.expect("installs");

    let route = Route { epoch: 4, first_node: first.node_id().into(), first_stage: first.addr(), failovers: 0 };
    let (_routes, routes) = tokio::sync::watch::channel(Some(route));
    let holder = Holder::new(info, routes, Limits::default(), None);
    let request = Generation {
        prompt: holder.tokenizer().encode("The capital of France is").expect("encodes"),
        sampling: SamplingParams::greedy(),
        max_tokens: 4,
        stop: Vec::new(),
    };
    let mut events = holder.submit(request).expect("submits");
    // The holder replays for a while before it gives up; a few of its attempts are
    // enough to show that none gets through.
    let first_event = tokio::time::timeout(Duration::from_secs(4), events.recv()).await;
    let outcome = first_event.map(|event| match event {
        Some(Event::Text(text)) => Some(text),
        Some(Event::Failed(_) | Event::Done(_)) | None => None,
    });
    assert!(!matches!(outcome, Ok(Some(_))), "text came through a stage that is not the plan's: {outcome:?}");
    assert!(first.stats().frames_accepted.load(Ordering::Relaxed) > 0, "the first stage ran the prompt");
    assert_eq!(second.stats().frames_accepted.load(Ordering::Relaxed), 0, "the wrong node got activations");
}
