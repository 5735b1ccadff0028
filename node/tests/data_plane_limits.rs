//! The data plane bounds what peers can hold open: streams per connection, connections
//! overall, and silent connections; past the bounds, peers wait, and the server goes on
//! serving everyone else.

mod common;

use std::time::Duration;

use common::loopback;
use hearth_mesh::identity::Identity;
use hearth_node::data_plane::connections::{self, MAX_STREAMS_PER_CONNECTION, PREFACE_TIMEOUT};
use hearth_node::data_plane::DataPlane;
use hearth_proto::pb::pipeline_client::PipelineClient;
use hearth_proto::{pb, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

const PATIENCE: Duration = Duration::from_secs(10);

async fn channel(plane: &DataPlane) -> Channel {
    Endpoint::from_shared(format!("http://{}", plane.addr())).unwrap().connect().await.expect("connects")
}

/// Opens a `Stream` call and waits until the server answers it.
async fn open_stream(
    channel: &Channel,
) -> Result<(mpsc::Sender<pb::StageMessage>, tonic::Streaming<pb::StageMessage>), tonic::Status> {
    let (frames, outbound) = mpsc::channel(1);
    let replies = PipelineClient::new(channel.clone()).stream(ReceiverStream::new(outbound)).await?.into_inner();
    Ok((frames, replies))
}

async fn probe(channel: &Channel) -> u64 {
    let request = pb::ProbeRequest { payload: vec![0; 16].into(), ..Default::default() };
    let reply = timeout(PATIENCE, PipelineClient::new(channel.clone()).probe(request)).await.expect("answered in time");
    reply.expect("probe succeeds").into_inner().received_bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_per_connection_limit_wait_for_a_free_one() {
    let plane = DataPlane::start(loopback(), Limits::default(), None, Identity::generate()).expect("data plane starts");
    let crowded = channel(&plane).await;
    let mut open = Vec::new();
    for _ in 0..MAX_STREAMS_PER_CONNECTION {
        open.push(timeout(PATIENCE, open_stream(&crowded)).await.expect("answered in time").expect("accepted"));
    }

    let extra = tokio::spawn({
        let crowded = crowded.clone();
        async move { open_stream(&crowded).await }
    });
    sleep(Duration::from_millis(500)).await;
    assert!(!extra.is_finished(), "a stream past the limit of {MAX_STREAMS_PER_CONNECTION} was answered at once");

    // Everyone else is still served, and so is the crowded connection's next turn.
    assert_eq!(probe(&channel(&plane).await).await, 16);
    drop(open.pop());
    let extra = timeout(PATIENCE, extra).await.expect("the waiting stream gets a turn").unwrap();
    assert!(extra.is_ok(), "{:?}", extra.err());
}

#[tokio::test]
async fn connections_past_the_limit_wait_in_the_backlog() {
    let listener = TcpListener::bind(loopback()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut incoming = connections::incoming(listener, 2);
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = TcpStream::connect(addr).await.expect("connects");
        client.write_all(b"x").await.unwrap();
        clients.push(client);
    }
    let first = timeout(PATIENCE, incoming.next()).await.expect("accepted in time").unwrap().unwrap();
    let _second = timeout(PATIENCE, incoming.next()).await.expect("accepted in time").unwrap().unwrap();
    assert!(
        timeout(Duration::from_millis(500), incoming.next()).await.is_err(),
        "a connection past the limit was accepted"
    );
    drop(first);
    let mut third = timeout(PATIENCE, incoming.next()).await.expect("a place freed up").unwrap().unwrap();
    let mut byte = [0; 1];
    assert_eq!(third.read(&mut byte).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_talking_ones_kept() {
    let plane = DataPlane::start(loopback(), Limits::default(), None, Identity::generate()).expect("data plane starts");
    let silent = TcpStream::connect(plane.addr()).await.expect("connects");
    let mut dribbling = TcpStream::connect(plane.addr()).await.expect("connects");
    dribbling.write_all(b"PRI * HTTP/2.0").await.unwrap();
    let talking = channel(&plane).await;
    // The server speaks first (its HTTP/2 settings), then gives up on a peer that does
    // not open HTTP/2 in time.
    let until_closed = |mut connection: TcpStream| async move {
        let mut buffer = [0; 256];
        while let Ok(1..) = connection.read(&mut buffer).await {}
    };
    for connection in [silent, dribbling] {
        timeout(PREFACE_TIMEOUT + PATIENCE, until_closed(connection)).await.expect("closed in time");
    }
    assert_eq!(probe(&talking).await, 16, "a connection that spoke was closed");
}
