//! The limits at work over a real connection: a server that validates what it receives
//! and echoes it back refuses an oversized message with a status, refuses a malformed
//! frame with the validation error, and keeps serving.

use std::net::SocketAddr;
use std::pin::Pin;

use hearth_proto::frame::{Activation, DType, Expect, HiddenStates, StageFrame};
use hearth_proto::handshake::{HandshakeStep, Hello, NONCE_LEN};
use hearth_proto::pb::auth_client::AuthClient;
use hearth_proto::pb::auth_server::{Auth, AuthServer};
use hearth_proto::pb::pipeline_client::PipelineClient;
use hearth_proto::pb::pipeline_server::{Pipeline, PipelineServer};
use hearth_proto::{pb, Limits};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status, Streaming};

type Echoes<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

const EXPECT: Expect = Expect { epoch: 2, hidden_size: 64, vocab_size: 1000 };

/// Room for 16 positions of f32 hidden states.
const LIMITS: Limits =
    Limits { max_frame_bytes: 16 * 64 * 4, max_positions: 16, max_chunk_bytes: 1024 };

/// Validates every message it receives and sends it back; ends the call at the first
/// one it refuses.
struct Echo;

#[tonic::async_trait]
impl Pipeline for Echo {
    type StreamStream = Echoes<pb::StageMessage>;
    type FetchWeightsStream = Echoes<pb::WeightChunk>;

    async fn stream(
        &self,
        request: Request<Streaming<pb::StageMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let echoes = request.into_inner().map(|message| {
            let frame = StageFrame::from_wire(message?, &LIMITS, &EXPECT)?;
            Ok(frame.into_wire())
        });
        Ok(Response::new(Box::pin(echoes)))
    }

    async fn fetch_weights(
        &self,
        _: Request<pb::WeightRequest>,
    ) -> Result<Response<Self::FetchWeightsStream>, Status> {
        Err(Status::unimplemented("no weights here"))
    }

    async fn probe(&self, request: Request<pb::ProbeRequest>) -> Result<Response<pb::ProbeReply>, Status> {
        let received_bytes = request.get_ref().payload.len() as u64;
        Ok(Response::new(pb::ProbeReply { received_bytes, ..Default::default() }))
    }
}

#[tonic::async_trait]
impl Auth for Echo {
    type HandshakeStream = Echoes<pb::HandshakeMessage>;

    async fn handshake(
        &self,
        request: Request<Streaming<pb::HandshakeMessage>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        let echoes =
            request.into_inner().map(|message| Ok(HandshakeStep::from_wire(message?)?.into_wire()));
        Ok(Response::new(Box::pin(echoes)))
    }
}

async fn serve() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::builder()
        .add_service(PipelineServer::new(Echo).with_limits(&LIMITS))
        .add_service(AuthServer::new(Echo).with_handshake_limits())
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    addr
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

fn activation(rows: usize, hidden_size: usize) -> pb::StageMessage {
    let values = vec![0.25; rows * hidden_size];
    let hidden = HiddenStates::from_f32(rows, hidden_size, &values, DType::F32).unwrap();
    StageFrame::from(Activation {
        epoch: EXPECT.epoch,
        sequence_id: 11,
        start_position: 3,
        hidden,
        generation: None,
        steps: false,
    })
    .into_wire()
}

/// Sends `message` alone on a new stream; returns the echo, or the status ending the
/// call.
async fn echo(
    client: &mut PipelineClient<Channel>,
    message: pb::StageMessage,
) -> Result<pb::StageMessage, Status> {
    let mut echoes = client.stream(tokio_stream::iter([message])).await?.into_inner();
    Ok(echoes.message().await?.expect("an echo or a status"))
}

#[tokio::test]
async fn refuses_oversized_and_malformed_frames_and_keeps_serving() {
    let addr = serve().await;
    // The client is not limited, to be able to send what the server must refuse.
    let mut client = PipelineClient::new(channel(addr).await);

    let fits = activation(LIMITS.max_positions, EXPECT.hidden_size);
    assert_eq!(echo(&mut client, fits.clone()).await.unwrap(), fits);

    // Far over the limit: refused by tonic from the length prefix, before decoding.
    let oversized = echo(&mut client, activation(1024, EXPECT.hidden_size)).await.unwrap_err();
    assert_eq!(oversized.code(), Code::OutOfRange, "{oversized:?}");

    // Small enough to decode, refused by validation.
    let malformed = echo(&mut client, activation(2, 32)).await.unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    assert_eq!(
        malformed.message(),
        "hidden states are 32 wide, but this model's hidden size is 64"
    );

    // The server goes on serving, on the same connection.
    assert_eq!(echo(&mut client, fits.clone()).await.unwrap(), fits);
}

#[tokio::test]
async fn a_limited_client_refuses_to_send_oversized_frames() {
    let addr = serve().await;
    let mut client = PipelineClient::new(channel(addr).await).with_limits(&LIMITS);
    let refused = echo(&mut client, activation(1024, EXPECT.hidden_size)).await;
    // The client's encoder refuses it and resets the stream; the server, which would
    // answer OUT_OF_RANGE, never sees it.
    let refused = refused.unwrap_err();
    assert_ne!(refused.code(), Code::OutOfRange, "{refused:?}");
    let fits = activation(1, EXPECT.hidden_size);
    assert_eq!(echo(&mut client, fits.clone()).await.unwrap(), fits);
}

#[tokio::test]
async fn the_handshake_service_takes_only_small_messages() {
    let addr = serve().await;
    let mut client = AuthClient::new(channel(addr).await);
    let hello = |node_id: String| HandshakeStep::Hello(Hello { node_id, nonce: [5; NONCE_LEN] });

    let small = hello("node-a".into()).into_wire();
    let mut echoes =
        client.handshake(tokio_stream::iter([small.clone()])).await.unwrap().into_inner();
    assert_eq!(echoes.message().await.unwrap(), Some(small));

    // A peer that has proven nothing cannot make the server buffer a large message.
    let large = hello("x".repeat(4096)).into_wire();
    let status = match client.handshake(tokio_stream::iter([large])).await {
        Ok(response) => response.into_inner().message().await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
}

#[tokio::test]
async fn path_probes_are_bounded_by_the_message_limit() {
    let addr = serve().await;
    let mut client = PipelineClient::new(channel(addr).await);
    let probe = |len: usize| pb::ProbeRequest { payload: vec![7u8; len].into(), ..Default::default() };

    let reply = client.probe(probe(LIMITS.max_frame_bytes)).await.unwrap();
    assert_eq!(reply.get_ref().received_bytes, LIMITS.max_frame_bytes as u64);

    // A burst over the message limit is refused from its length prefix.
    let oversized = client.probe(probe(LIMITS.max_message_bytes() + 1)).await.unwrap_err();
    assert_eq!(oversized.code(), Code::OutOfRange, "{oversized:?}");

    // And the server goes on answering.
    assert_eq!(client.probe(probe(0)).await.unwrap().get_ref().received_bytes, 0);
}
