//! Typed, validated views of the messages on a pipeline `Stream`.
//!
//! A stage never acts on a [`pb::StageMessage`] directly: it turns each one into a
//! [`StageFrame`] with [`StageFrame::from_wire`], which checks everything a message can
//! be checked for on its own (see the .proto for the list, message by message), and
//! acts on that. Only what needs the stage's state is left to it: whether a sequence
//! is open, and whether a frame continues it at the right position.
//!
//! Validation reads only the integers a message carries and the length of the payload
//! it actually holds: nothing is allocated, let alone sized by what a frame claims. A
//! frame claiming 10¹² elements costs one multiplication to refuse. Valid frames keep
//! their payload where the decoder put it (a [`Bytes`] view, no copy).

use std::cmp::Ordering;
use std::fmt;

use bytes::Bytes;
use half::{bf16, f16};

use crate::limits::Limits;
use crate::pb;
use crate::pb::stage_message::Kind;
use crate::FrameError;

/// The most stop tokens one sequence may have.
pub const MAX_STOP_TOKENS: usize = 64;

/// A replay carries at most this many already generated tokens.
pub const MAX_FORCED_TOKENS: usize = 65_536;

/// A received [`pb::StageError`] keeps at most this many bytes of its message.
pub const MAX_ERROR_MESSAGE_BYTES: usize = 1024;

/// What a receiving stage expects of every frame, besides the [`Limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    /// The receiver's placement epoch: frames from any other are refused.
    pub epoch: u64,
    /// The model's hidden size: the width of every row of hidden states.
    pub hidden_size: usize,
    /// The model's vocabulary size: every token id is below it.
    pub vocab_size: u32,
}

/// The element type of hidden states on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub const fn size_in_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    fn from_wire(value: i32) -> Result<Self, FrameError> {
        match pb::Dtype::try_from(value) {
            Ok(pb::Dtype::F32) => Ok(Self::F32),
            Ok(pb::Dtype::F16) => Ok(Self::F16),
            Ok(pb::Dtype::Bf16) => Ok(Self::BF16),
            Ok(pb::Dtype::Unspecified) | Err(_) => Err(FrameError::UnknownDType(value)),
        }
    }

    fn into_wire(self) -> pb::Dtype {
        match self {
            Self::F32 => pb::Dtype::F32,
            Self::F16 => pb::Dtype::F16,
            Self::BF16 => pb::Dtype::Bf16,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        })
    }
}

/// A `rows × cols` matrix of hidden states, one row per position, stored row-major as
/// little-endian values of its [`DType`].
///
/// Its data always holds exactly `rows × cols` values: every constructor checks, and
/// nothing can change the fields afterwards.
#[derive(Clone, PartialEq, Eq)]
pub struct HiddenStates {
    rows: usize,
    cols: usize,
    dtype: DType,
    data: Bytes,
}

impl HiddenStates {
    /// Wraps `data`, which must hold exactly `rows × cols` little-endian values of
    /// `dtype`.
    pub fn new(
        rows: usize,
        cols: usize,
        dtype: DType,
        data: impl Into<Bytes>,
    ) -> Result<Self, FrameError> {
        let data = data.into();
        // usize to u64 never truncates on the platforms Rust supports (at most 64 bits).
        check_byte_len(rows as u64, cols as u64, dtype, data.len())?;
        Ok(Self { rows, cols, dtype, data })
    }

    /// Encodes `values`, `rows × cols` of them, as `dtype` (rounding to nearest for f16
    /// and bf16).
    pub fn from_f32(
        rows: usize,
        cols: usize,
        values: &[f32],
        dtype: DType,
    ) -> Result<Self, FrameError> {
        // Cannot overflow: `values` already takes 4 bytes per value in memory.
        let mut data = Vec::with_capacity(values.len() * dtype.size_in_bytes());
        for &value in values {
            match dtype {
                DType::F32 => data.extend_from_slice(&value.to_le_bytes()),
                DType::F16 => data.extend_from_slice(&f16::from_f32(value).to_le_bytes()),
                DType::BF16 => data.extend_from_slice(&bf16::from_f32(value).to_le_bytes()),
            }
        }
        Self::new(rows, cols, dtype, data)
    }

    /// Positions: one row each.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The hidden size.
    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The raw little-endian values, row-major: on a little-endian host, the memory
    /// layout of a contiguous `rows × cols` tensor of this dtype.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    pub fn into_data(self) -> Bytes {
        self.data
    }

    /// The values as f32 (exact: f16 and bf16 widen without rounding).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        // `chunks_exact` yields exactly `size_in_bytes` bytes per value, so the indexing
        // below cannot fail; the Vec's size comes from the data actually held.
        let values = self.data.chunks_exact(self.dtype.size_in_bytes());
        match self.dtype {
            DType::F32 => values.map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            DType::F16 => values.map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            DType::BF16 => values.map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        }
    }

    /// Checks a frame's tensor fields against the limits and the model, then wraps its
    /// payload.
    fn from_wire(
        dtype: i32,
        shape: &[u64],
        data: Bytes,
        limits: &Limits,
        hidden_size: usize,
    ) -> Result<Self, FrameError> {
        let dtype = DType::from_wire(dtype)?;
        let &[rows, cols] = shape else {
            return Err(FrameError::Rank(shape.len()));
        };
        if data.len() > limits.max_frame_bytes {
            return Err(FrameError::TooLarge {
                what: "activation payload",
                bytes: data.len(),
                max: limits.max_frame_bytes,
            });
        }
        check_byte_len(rows, cols, dtype, data.len())?;
        check_position_count(rows, limits)?;
        if cols != hidden_size as u64 {
            return Err(FrameError::HiddenSize { got: cols, expected: hidden_size });
        }
        // Both fit: `rows` is within `max_positions` and `cols` equals `hidden_size`.
        let overflow = || FrameError::ShapeOverflow { rows, cols };
        let rows = usize::try_from(rows).map_err(|_| overflow())?;
        let cols = usize::try_from(cols).map_err(|_| overflow())?;
        Ok(Self { rows, cols, dtype, data })
    }
}

/// Shows the shape, not the data.
impl fmt::Debug for HiddenStates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HiddenStates({} × {} {})", self.rows, self.cols, self.dtype)
    }
}

/// Checks that `bytes` is exactly the size of `rows × cols` values of `dtype`, with
/// checked arithmetic: a claimed shape is only ever multiplied, never allocated.
fn check_byte_len(rows: u64, cols: u64, dtype: DType, bytes: usize) -> Result<(), FrameError> {
    let elements = rows.checked_mul(cols).ok_or(FrameError::ShapeOverflow { rows, cols })?;
    let expected = elements
        .checked_mul(dtype.size_in_bytes() as u64)
        .ok_or(FrameError::ShapeOverflow { rows, cols })?;
    if expected != bytes as u64 {
        return Err(FrameError::LengthMismatch { rows, cols, elements, dtype, expected, bytes });
    }
    Ok(())
}

/// Checks the number of positions in one frame.
fn check_position_count(count: u64, limits: &Limits) -> Result<(), FrameError> {
    if count == 0 {
        return Err(FrameError::NoPositions);
    }
    if count > limits.max_positions as u64 {
        return Err(FrameError::TooMany {
            what: "positions",
            got: count,
            max: limits.max_positions as u64,
        });
    }
    Ok(())
}

/// Checks that positions `start..start + count` and the one after them, where the next
/// token goes, are all representable.
fn check_position_range(start: u32, count: u64) -> Result<(), FrameError> {
    match u64::from(start).checked_add(count) {
        Some(end) if end <= u64::from(u32::MAX) => Ok(()),
        _ => Err(FrameError::PositionOverflow { start, count }),
    }
}

/// Checks what every frame sent downstream carries: the epoch and a sequence id.
fn check_header(epoch: u64, sequence_id: u64, expect: &Expect) -> Result<(), FrameError> {
    let current = expect.epoch;
    match epoch.cmp(&current) {
        Ordering::Less => return Err(FrameError::StaleEpoch { got: epoch, current }),
        Ordering::Greater => return Err(FrameError::EpochAhead { got: epoch, current }),
        Ordering::Equal => {}
    }
    if sequence_id == 0 {
        return Err(FrameError::ZeroSequenceId);
    }
    Ok(())
}

fn check_token(token: u32, vocab_size: u32) -> Result<(), FrameError> {
    if token >= vocab_size {
        return Err(FrameError::TokenOutOfRange { token, vocab_size });
    }
    Ok(())
}

/// Checks that generation settings come with the frame that opens its sequence, and
/// only with it.
fn opening_generation(
    start_position: u32,
    generation: Option<pb::Generation>,
    vocab_size: u32,
) -> Result<Option<Generation>, FrameError> {
    match (start_position, generation) {
        (0, Some(generation)) => Generation::from_wire(generation, vocab_size).map(Some),
        (0, None) => Err(FrameError::MissingGeneration),
        (_, None) => Ok(None),
        (start, Some(_)) => Err(FrameError::UnexpectedGeneration(start)),
    }
}

fn join_word_pos(low: u64, high: u64) -> u128 {
    u128::from(high) << 64 | u128::from(low)
}

fn split_word_pos(word_pos: u128) -> (u64, u64) {
    // Truncation is the point: the low and the high 64 bits.
    (word_pos as u64, (word_pos >> 64) as u64)
}

/// Hidden states for the next stage; see [`pb::ActivationFrame`].
#[derive(Debug, Clone, PartialEq)]
pub struct Activation {
    pub epoch: u64,
    pub sequence_id: u64,
    /// The position of the first row; 0 opens the sequence.
    pub start_position: u32,
    pub hidden: HiddenStates,
    /// Present exactly when `start_position` is 0.
    pub generation: Option<Generation>,
    /// Each row is a decoding step of its own, to be run one at a time (see
    /// [`pb::ActivationFrame::steps`]).
    pub steps: bool,
}

impl Activation {
    pub fn from_wire(
        frame: pb::ActivationFrame,
        limits: &Limits,
        expect: &Expect,
    ) -> Result<Self, FrameError> {
        let pb::ActivationFrame {
            epoch,
            sequence_id,
            start_position,
            dtype,
            shape,
            data,
            generation,
            steps,
        } = frame;
        check_header(epoch, sequence_id, expect)?;
        let hidden = HiddenStates::from_wire(dtype, &shape, data, limits, expect.hidden_size)?;
        check_position_range(start_position, hidden.rows as u64)?;
        let generation = opening_generation(start_position, generation, expect.vocab_size)?;
        Ok(Self { epoch, sequence_id, start_position, hidden, generation, steps })
    }

    pub fn into_wire(self) -> pb::ActivationFrame {
        let Self { epoch, sequence_id, start_position, hidden, generation, steps } = self;
        pb::ActivationFrame {
            epoch,
            sequence_id,
            start_position,
            dtype: hidden.dtype.into_wire().into(),
            shape: vec![hidden.rows as u64, hidden.cols as u64],
            data: hidden.data,
            generation: generation.map(Generation::into_wire),
            steps,
        }
    }
}

/// Token ids for the first stage to embed; see [`pb::Prefill`].
#[derive(Debug, Clone, PartialEq)]
pub struct Prefill {
    pub epoch: u64,
    pub sequence_id: u64,
    /// The position of the first token; 0 opens the sequence.
    pub start_position: u32,
    /// At least one.
    pub tokens: Vec<u32>,
    /// Present exactly when `start_position` is 0.
    pub generation: Option<Generation>,
}

impl Prefill {
    pub fn from_wire(
        prefill: pb::Prefill,
        limits: &Limits,
        expect: &Expect,
    ) -> Result<Self, FrameError> {
        let pb::Prefill { epoch, sequence_id, start_position, tokens, generation } = prefill;
        check_header(epoch, sequence_id, expect)?;
        check_position_count(tokens.len() as u64, limits)?;
        check_position_range(start_position, tokens.len() as u64)?;
        tokens.iter().try_for_each(|&token| check_token(token, expect.vocab_size))?;
        let generation = opening_generation(start_position, generation, expect.vocab_size)?;
        Ok(Self { epoch, sequence_id, start_position, tokens, generation })
    }

    pub fn into_wire(self) -> pb::Prefill {
        let Self { epoch, sequence_id, start_position, tokens, generation } = self;
        pb::Prefill {
            epoch,
            sequence_id,
            start_position,
            tokens,
            generation: generation.map(Generation::into_wire),
        }
    }
}

/// How a sequence generates; see [`pb::Generation`].
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub sampling: Sampling,
    /// The sequence finishes once it holds this many tokens, prompt included.
    pub max_len: u32,
    /// Token ids that finish the sequence when sampled; at most [`MAX_STOP_TOKENS`].
    pub stop_tokens: Vec<u32>,
    /// A replay's already generated tokens, emitted in order before sampling resumes; at
    /// most [`MAX_FORCED_TOKENS`].
    pub forced_tokens: Vec<u32>,
}

impl Generation {
    fn from_wire(generation: pb::Generation, vocab_size: u32) -> Result<Self, FrameError> {
        let pb::Generation { sampling, max_len, stop_tokens, forced_tokens } = generation;
        let sampling = Sampling::from_wire(sampling.ok_or(FrameError::Missing("sampling state"))?)?;
        if max_len == 0 {
            return Err(FrameError::ZeroMaxLen);
        }
        if stop_tokens.len() > MAX_STOP_TOKENS {
            return Err(FrameError::TooMany {
                what: "stop tokens",
                got: stop_tokens.len() as u64,
                max: MAX_STOP_TOKENS as u64,
            });
        }
        stop_tokens.iter().try_for_each(|&token| check_token(token, vocab_size))?;
        if forced_tokens.len() > MAX_FORCED_TOKENS {
            return Err(FrameError::TooMany {
                what: "forced tokens",
                got: forced_tokens.len() as u64,
                max: MAX_FORCED_TOKENS as u64,
            });
        }
        forced_tokens.iter().try_for_each(|&token| check_token(token, vocab_size))?;
        Ok(Self { sampling, max_len, stop_tokens, forced_tokens })
    }

    fn into_wire(self) -> pb::Generation {
        let Self { sampling, max_len, stop_tokens, forced_tokens } = self;
        pb::Generation { sampling: Some(sampling.into_wire()), max_len, stop_tokens, forced_tokens }
    }
}

/// A sampler's parameters and its position in its random stream: all it takes to
/// resume it on another node. Mirrors hearth-models' `SamplerState`, which owns the
/// meaning and the valid ranges of the parameters; on the wire they are only checked
/// to be numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: u64,
    /// Position in the ChaCha20 stream seeded by `seed`, in 32-bit words.
    pub word_pos: u128,
}

impl Sampling {
    fn from_wire(sampling: pb::SamplingState) -> Result<Self, FrameError> {
        let pb::SamplingState { temperature, top_p, top_k, seed, word_pos_low, word_pos_high } =
            sampling;
        if !temperature.is_finite() {
            return Err(FrameError::NotFinite("temperature"));
        }
        if !top_p.is_finite() {
            return Err(FrameError::NotFinite("top_p"));
        }
        Ok(Self {
            temperature,
            top_p,
            top_k,
            seed,
            word_pos: join_word_pos(word_pos_low, word_pos_high),
        })
    }

    fn into_wire(self) -> pb::SamplingState {
        let Self { temperature, top_p, top_k, seed, word_pos } = self;
        let (word_pos_low, word_pos_high) = split_word_pos(word_pos);
        pb::SamplingState { temperature, top_p, top_k, seed, word_pos_low, word_pos_high }
    }
}

/// Why a sequence finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// A stop token was sampled.
    Stop,
    /// The sequence reached its `max_len`.
    Length,
}

/// A token the last stage sampled; see [`pb::TokenFrame`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub epoch: u64,
    pub sequence_id: u64,
    /// The position this token takes in its sequence.
    pub position: u32,
    /// The token id.
    pub id: u32,
    /// `None` while the sequence goes on.
    pub finish: Option<FinishReason>,
    /// The sampler's word position after drawing this token: where a replay resumes.
    pub word_pos: u128,
}

impl Token {
    pub fn from_wire(token: pb::TokenFrame, expect: &Expect) -> Result<Self, FrameError> {
        let pb::TokenFrame {
            epoch,
            sequence_id,
            position,
            token,
            finish,
            word_pos_low,
            word_pos_high,
        } = token;
        check_header(epoch, sequence_id, expect)?;
        check_token(token, expect.vocab_size)?;
        let finish = match pb::FinishReason::try_from(finish) {
            Ok(pb::FinishReason::None) => None,
            Ok(pb::FinishReason::Stop) => Some(FinishReason::Stop),
            Ok(pb::FinishReason::Length) => Some(FinishReason::Length),
            Err(_) => return Err(FrameError::UnknownFinishReason(finish)),
        };
        let word_pos = join_word_pos(word_pos_low, word_pos_high);
        Ok(Self { epoch, sequence_id, position, id: token, finish, word_pos })
    }

    pub fn into_wire(self) -> pb::TokenFrame {
        let Self { epoch, sequence_id, position, id, finish, word_pos } = self;
        let finish = match finish {
            None => pb::FinishReason::None,
            Some(FinishReason::Stop) => pb::FinishReason::Stop,
            Some(FinishReason::Length) => pb::FinishReason::Length,
        };
        let (word_pos_low, word_pos_high) = split_word_pos(word_pos);
        pb::TokenFrame {
            epoch,
            sequence_id,
            position,
            token: id,
            finish: finish.into(),
            word_pos_low,
            word_pos_high,
        }
    }
}

/// Forget a sequence and free its cache; see [`pb::ResetSequence`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reset {
    pub epoch: u64,
    pub sequence_id: u64,
}

impl Reset {
    pub fn from_wire(reset: pb::ResetSequence, expect: &Expect) -> Result<Self, FrameError> {
        let pb::ResetSequence { epoch, sequence_id } = reset;
        check_header(epoch, sequence_id, expect)?;
        Ok(Self { epoch, sequence_id })
    }

    pub fn into_wire(self) -> pb::ResetSequence {
        let Self { epoch, sequence_id } = self;
        pb::ResetSequence { epoch, sequence_id }
    }
}

/// What a [`StageError`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The frame broke the protocol.
    InvalidFrame,
    /// The frame's epoch is older than the receiver's: its pipeline is gone.
    StaleEpoch,
    /// The frame's epoch is newer than the receiver's: retry once it catches up.
    EpochAhead,
    /// The frame continues a sequence the receiver does not hold: replay it.
    UnknownSequence,
    /// The receiver has no room for another sequence now.
    Overloaded,
    /// A link of the pipeline failed over to another path, losing the frames in flight on
    /// the dead one: replay at once, on the same plan.
    PathChanged,
    /// Anything else, including codes this version of the protocol does not know.
    Internal,
}

impl ErrorCode {
    fn from_wire(code: i32) -> Self {
        match pb::ErrorCode::try_from(code) {
            Ok(pb::ErrorCode::InvalidFrame) => Self::InvalidFrame,
            Ok(pb::ErrorCode::StaleEpoch) => Self::StaleEpoch,
            Ok(pb::ErrorCode::EpochAhead) => Self::EpochAhead,
            Ok(pb::ErrorCode::UnknownSequence) => Self::UnknownSequence,
            Ok(pb::ErrorCode::Overloaded) => Self::Overloaded,
            Ok(pb::ErrorCode::PathChanged) => Self::PathChanged,
            Ok(pb::ErrorCode::Internal | pb::ErrorCode::Unspecified) | Err(_) => Self::Internal,
        }
    }

    fn into_wire(self) -> pb::ErrorCode {
        match self {
            Self::InvalidFrame => pb::ErrorCode::InvalidFrame,
            Self::StaleEpoch => pb::ErrorCode::StaleEpoch,
            Self::EpochAhead => pb::ErrorCode::EpochAhead,
            Self::UnknownSequence => pb::ErrorCode::UnknownSequence,
            Self::Overloaded => pb::ErrorCode::Overloaded,
            Self::PathChanged => pb::ErrorCode::PathChanged,
            Self::Internal => pb::ErrorCode::Internal,
        }
    }
}

/// A refusal, sent upstream; see [`pb::StageError`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageError {
    /// The epoch of the node that refused.
    pub epoch: u64,
    /// The sequence of the refused frame, or 0 for the stream as a whole.
    pub sequence_id: u64,
    pub code: ErrorCode,
    pub message: String,
}

impl StageError {
    /// Refuses a frame of `sequence_id` (0 for none) because of `error`, from a node in
    /// `epoch`.
    pub fn refusing(error: &FrameError, epoch: u64, sequence_id: u64) -> Self {
        Self { epoch, sequence_id, code: error.code(), message: error.to_string() }
    }

    /// Never fails: an error report is taken as it comes, its message cut to
    /// [`MAX_ERROR_MESSAGE_BYTES`] and an unknown code read as
    /// [`Internal`](ErrorCode::Internal). (Its epoch is not checked either: a
    /// [`StaleEpoch`](ErrorCode::StaleEpoch) report comes from a newer one.)
    pub fn from_wire(error: pb::StageError) -> Self {
        let pb::StageError { epoch, sequence_id, code, mut message } = error;
        truncate_at_char_boundary(&mut message, MAX_ERROR_MESSAGE_BYTES);
        Self { epoch, sequence_id, code: ErrorCode::from_wire(code), message }
    }

    pub fn into_wire(self) -> pb::StageError {
        let Self { epoch, sequence_id, code, message } = self;
        pb::StageError { epoch, sequence_id, code: code.into_wire().into(), message }
    }
}

fn truncate_at_char_boundary(text: &mut String, max: usize) {
    if text.len() > max {
        // Index 0 is always a boundary, so this stops.
        let end = (0..=max).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
        text.truncate(end);
    }
}

/// One validated message of a pipeline `Stream`.
#[derive(Debug, Clone, PartialEq)]
pub enum StageFrame {
    Activation(Activation),
    Prefill(Prefill),
    Token(Token),
    Reset(Reset),
    Error(StageError),
}

impl StageFrame {
    /// Checks a received message; see the [module docs](self).
    pub fn from_wire(
        message: pb::StageMessage,
        limits: &Limits,
        expect: &Expect,
    ) -> Result<Self, FrameError> {
        Ok(match message.kind.ok_or(FrameError::Empty)? {
            Kind::Activation(frame) => {
                Self::Activation(Activation::from_wire(frame, limits, expect)?)
            }
            Kind::Prefill(prefill) => Self::Prefill(Prefill::from_wire(prefill, limits, expect)?),
            Kind::Token(token) => Self::Token(Token::from_wire(token, expect)?),
            Kind::Reset(reset) => Self::Reset(Reset::from_wire(reset, expect)?),
            Kind::Error(error) => Self::Error(StageError::from_wire(error)),
        })
    }

    pub fn into_wire(self) -> pb::StageMessage {
        let kind = match self {
            Self::Activation(frame) => Kind::Activation(frame.into_wire()),
            Self::Prefill(prefill) => Kind::Prefill(prefill.into_wire()),
            Self::Token(token) => Kind::Token(token.into_wire()),
            Self::Reset(reset) => Kind::Reset(reset.into_wire()),
            Self::Error(error) => Kind::Error(error.into_wire()),
        };
        pb::StageMessage { kind: Some(kind) }
    }

    /// The sequence the frame belongs to; 0 for an error about a whole stream.
    pub fn sequence_id(&self) -> u64 {
        match self {
            Self::Activation(frame) => frame.sequence_id,
            Self::Prefill(prefill) => prefill.sequence_id,
            Self::Token(token) => token.sequence_id,
            Self::Reset(reset) => reset.sequence_id,
            Self::Error(error) => error.sequence_id,
        }
    }
}

impl From<Activation> for StageFrame {
    fn from(frame: Activation) -> Self {
        Self::Activation(frame)
    }
}

impl From<Prefill> for StageFrame {
    fn from(prefill: Prefill) -> Self {
        Self::Prefill(prefill)
    }
}

impl From<Token> for StageFrame {
    fn from(token: Token) -> Self {
        Self::Token(token)
    }
}

impl From<Reset> for StageFrame {
    fn from(reset: Reset) -> Self {
        Self::Reset(reset)
    }
}

impl From<StageError> for StageFrame {
    fn from(error: StageError) -> Self {
        Self::Error(error)
    }
}

#[cfg(test)]
mod tests;
