//! How much a peer may send, and the matching gRPC message size limits.
//!
//! Two layers enforce the limits. tonic refuses a message longer than its configured
//! maximum before decoding it (and before buffering more than that much of it); then
//! validation refuses a decoded frame whose parts break [`Limits`]. Both must be set
//! from the same [`Limits`], which `with_limits` on the generated servers and clients
//! does:
//!
//! ```no_run
//! # async fn connect() -> Result<(), Box<dyn std::error::Error>> {
//! use hearth_proto::pb::pipeline_client::PipelineClient;
//! use hearth_proto::Limits;
//!
//! let limits = Limits::default();
//! let client = PipelineClient::connect("http://10.0.0.2:5281").await?.with_limits(&limits);
//! # Ok(()) }
//! ```

use crate::pb::auth_client::AuthClient;
use crate::pb::auth_server::AuthServer;
use crate::pb::pipeline_client::PipelineClient;
use crate::pb::pipeline_server::PipelineServer;

/// The default largest activation payload: 64 MiB, which is 4096 positions of an f32
/// model 4096 wide.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 64 << 20;

/// The default most positions in one frame. Longer prompts travel in several frames.
pub const DEFAULT_MAX_POSITIONS: usize = 4096;

/// The default largest weight chunk payload: 4 MiB.
pub const DEFAULT_MAX_CHUNK_BYTES: usize = 4 << 20;

/// The message size limit of the [`Auth`](crate::pb::auth_server) service, both ways.
///
/// The handshake is the one exchange a node has with peers that have proven nothing,
/// so it gets only what its largest message needs (a `Hello` with a 128-byte id, or a
/// `Session` with a 256-byte ticket) and a little room.
pub const MAX_HANDSHAKE_MESSAGE_BYTES: usize = 1024;

/// Room in a message for everything besides its payload: ids, shape, generation
/// settings (at most 64 stop tokens), tensor names (at most 512 bytes).
const ENVELOPE_BYTES: usize = 64 << 10;

/// The most bytes a token id takes in a packed field: a varint of a `u32`.
const MAX_TOKEN_ID_BYTES: usize = 5;

/// How much a peer may send in one message.
///
/// The defaults suit any model Hearth runs; build others with struct update syntax:
///
/// ```
/// let limits = hearth_proto::Limits { max_positions: 512, ..Default::default() };
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest activation payload (the `data` of an `ActivationFrame`), in bytes.
    pub max_frame_bytes: usize,
    /// The most positions in one frame: rows of an `ActivationFrame`, tokens of a
    /// `Prefill`.
    pub max_positions: usize,
    /// The largest weight chunk payload (the `data` of a `WeightChunk`), in bytes.
    pub max_chunk_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_positions: DEFAULT_MAX_POSITIONS,
            max_chunk_bytes: DEFAULT_MAX_CHUNK_BYTES,
        }
    }
}

impl Limits {
    /// The gRPC message size limit of the `Pipeline` service: room for the largest
    /// payload these limits allow, plus its envelope.
    pub fn max_message_bytes(&self) -> usize {
        self.max_frame_bytes
            .max(self.max_chunk_bytes)
            .max(self.max_positions.saturating_mul(MAX_TOKEN_ID_BYTES))
            .saturating_add(ENVELOPE_BYTES)
    }
}

impl<T> PipelineServer<T> {
    /// Refuses to decode, or to encode, messages larger than `limits` allow.
    #[must_use]
    pub fn with_limits(self, limits: &Limits) -> Self {
        let max = limits.max_message_bytes();
        self.max_decoding_message_size(max).max_encoding_message_size(max)
    }
}

impl<T> PipelineClient<T>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    /// Refuses to encode, or to decode, messages larger than `limits` allow.
    #[must_use]
    pub fn with_limits(self, limits: &Limits) -> Self {
        let max = limits.max_message_bytes();
        self.max_decoding_message_size(max).max_encoding_message_size(max)
    }
}

impl<T> AuthServer<T> {
    /// Refuses to decode, or to encode, messages larger than
    /// [`MAX_HANDSHAKE_MESSAGE_BYTES`].
    #[must_use]
    pub fn with_handshake_limits(self) -> Self {
        self.max_decoding_message_size(MAX_HANDSHAKE_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_HANDSHAKE_MESSAGE_BYTES)
    }
}

impl<T> AuthClient<T>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    /// Refuses to encode, or to decode, messages larger than
    /// [`MAX_HANDSHAKE_MESSAGE_BYTES`].
    #[must_use]
    pub fn with_handshake_limits(self) -> Self {
        self.max_decoding_message_size(MAX_HANDSHAKE_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_HANDSHAKE_MESSAGE_BYTES)
    }
}
