//! Why a message was refused.

use tonic::{Code, Status};

use crate::frame::{DType, ErrorCode};

/// Why a received message was refused, or why a frame could not be built.
///
/// Every variant holds only numbers and static strings, so that refusing a message
/// allocates nothing: a flood of bad frames costs no more than reading them. The
/// messages are written for the person reading the log of either node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The message has no kind set: it is empty, or of a kind from a newer protocol.
    #[error("message carries no frame (it is empty, or of a kind this node does not know)")]
    Empty,
    /// A required part of the message is absent.
    #[error("message has no {0}")]
    Missing(&'static str),

    /// The frame's epoch is older than the receiver's.
    #[error(
        "frame is from epoch {got}, but this node is in epoch {current}: \
         its pipeline no longer exists"
    )]
    StaleEpoch { got: u64, current: u64 },
    /// The frame's epoch is newer than the receiver's.
    #[error("frame is from epoch {got}, but this node is still in epoch {current}")]
    EpochAhead { got: u64, current: u64 },
    /// Sequence id 0, which names no sequence.
    #[error("sequence id 0 is reserved and names no sequence")]
    ZeroSequenceId,
    /// The frame continues a sequence the receiver does not hold. Never returned by
    /// this crate, which does not track sequences: it is for the stage that does.
    #[error("sequence {0} is not open on this node")]
    UnknownSequence(u64),

    /// The dtype is not one of the [`DType`]s.
    #[error("dtype {0} is not one of f32 (1), f16 (2) or bf16 (3)")]
    UnknownDType(i32),
    /// Hidden states must be a matrix: positions × hidden size.
    #[error("hidden states must have 2 dimensions (positions × hidden size), not {0}")]
    Rank(usize),
    /// The claimed shape's byte size does not fit in 64 bits (or in this machine's
    /// address space).
    #[error("frame claims a shape of {rows} × {cols}, too large to even count")]
    ShapeOverflow { rows: u64, cols: u64 },
    /// The payload does not hold exactly the values the shape claims.
    #[error(
        "frame claims {elements} elements ({rows} × {cols}) of {dtype}, \
         which take {expected} bytes, but carries {bytes} bytes"
    )]
    LengthMismatch {
        rows: u64,
        cols: u64,
        elements: u64,
        dtype: DType,
        expected: u64,
        bytes: usize,
    },
    /// The hidden states are not as wide as the model's hidden size.
    #[error("hidden states are {got} wide, but this model's hidden size is {expected}")]
    HiddenSize { got: u64, expected: usize },
    /// A frame with no positions: no rows of hidden states, or no tokens.
    #[error("frame carries no positions")]
    NoPositions,
    /// The positions, and the one after them where the next token goes, do not all fit
    /// in a `u32`.
    #[error(
        "{count} positions from {start} on leave no position after them: positions end at {max}",
        max = u32::MAX
    )]
    PositionOverflow { start: u32, count: u64 },
    /// A frame at position 0 opens its sequence, so it must say how it generates.
    #[error(
        "frame opens its sequence (it starts at position 0) but carries no generation settings"
    )]
    MissingGeneration,
    /// Only a frame at position 0 may carry generation settings.
    #[error(
        "frame starts at position {0}, so it does not open its sequence, \
         yet carries generation settings"
    )]
    UnexpectedGeneration(u32),

    /// A token id past the end of the vocabulary.
    #[error("token {token} is out of range: the vocabulary has {vocab_size} tokens")]
    TokenOutOfRange { token: u32, vocab_size: u32 },
    /// The finish reason is not one of the [`FinishReason`](crate::frame::FinishReason)s.
    #[error("finish reason {0} is not one of none (0), stop (1) or length (2)")]
    UnknownFinishReason(i32),
    /// A sampling parameter is NaN or infinite.
    #[error("{0} is not a finite number")]
    NotFinite(&'static str),
    /// A sequence allowed no tokens at all.
    #[error("max_len is 0: a sequence must be allowed at least one token")]
    ZeroMaxLen,

    /// More items than the limit: positions in a frame, stop tokens, tensor names.
    #[error("{got} {what} is more than the limit of {max}")]
    TooMany { what: &'static str, got: u64, max: u64 },
    /// A payload over its byte limit.
    #[error("{what} of {bytes} bytes is over the limit of {max} bytes")]
    TooLarge { what: &'static str, bytes: usize, max: usize },
    /// A fixed-length field (nonce, MAC, digest) of the wrong length.
    #[error("{field} must be {expected} bytes long, not {got}")]
    WrongLength { field: &'static str, got: usize, expected: usize },
    /// A variable-length field (name, ticket) too short or too long.
    #[error("{field} must be {min} to {max} bytes long, not {got}")]
    LengthOutOfRange { field: &'static str, got: usize, min: usize, max: usize },

    /// The peer speaks another version of the protocol.
    #[error("peer speaks protocol version {got}, but this node speaks version {supported}")]
    UnsupportedVersion { got: u32, supported: u32 },

    /// A weight request for no layers.
    #[error("layer range {start}..{end} is empty")]
    EmptyLayerRange { start: u32, end: u32 },
    /// A request for a model file's header that also names layers or tensors.
    #[error("a request for the model's header names no layers or tensors")]
    HeaderWithStage,
    /// A weight chunk that does not lie within its tensor.
    #[error(
        "chunk of {len} bytes at offset {offset} does not lie within its tensor of {size} bytes"
    )]
    ChunkOutOfBounds { offset: u64, len: usize, size: u64 },
    /// An empty chunk of a tensor that is not empty: it would make no progress.
    #[error("chunk carries no data, but its tensor is not empty")]
    EmptyChunk,
}

impl FrameError {
    /// The code for a [`StageError`](crate::frame::StageError) refusing the frame.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::StaleEpoch { .. } => ErrorCode::StaleEpoch,
            Self::EpochAhead { .. } => ErrorCode::EpochAhead,
            Self::UnknownSequence(_) => ErrorCode::UnknownSequence,
            _ => ErrorCode::InvalidFrame,
        }
    }

    /// The gRPC status for ending a call because of this error.
    ///
    /// A malformed message is `INVALID_ARGUMENT`: resending it cannot help. A message
    /// that is well formed but does not fit the receiver's state is
    /// `FAILED_PRECONDITION` (stale epoch, unknown sequence, other protocol version),
    /// except a newer epoch, which is `UNAVAILABLE`: the same message succeeds once
    /// the receiver catches up.
    pub fn to_status(&self) -> Status {
        let code = match self {
            Self::StaleEpoch { .. }
            | Self::UnknownSequence(_)
            | Self::UnsupportedVersion { .. } => Code::FailedPrecondition,
            Self::EpochAhead { .. } => Code::Unavailable,
            _ => Code::InvalidArgument,
        };
        Status::new(code, self.to_string())
    }
}

impl From<FrameError> for Status {
    fn from(error: FrameError) -> Self {
        error.to_status()
    }
}

/// Checks that a variable-length field is `min..=max` bytes long.
pub(crate) fn check_len_range(
    field: &'static str,
    got: usize,
    min: usize,
    max: usize,
) -> Result<(), FrameError> {
    if !(min..=max).contains(&got) {
        return Err(FrameError::LengthOutOfRange { field, got, min, max });
    }
    Ok(())
}
