//! Entry points for the fuzz targets in `fuzz/`, and for the stable tests that replay
//! their corpus (`tests/fuzz_corpus.rs`).
//!
//! Each function takes whatever bytes a peer could send, runs them through the same
//! decoding and validation a node does, and panics only if validation broke one of its
//! promises: a panic here is a bug, whatever the input. Not part of the crate's API.

use bytes::Bytes;
use prost::Message;

use crate::frame::{Activation, DType, Expect, HiddenStates, StageFrame, MAX_ERROR_MESSAGE_BYTES};
use crate::weights::{WeightChunk, WeightPart, WeightRequest, MAX_NAME_BYTES, MAX_REQUESTED_TENSORS};
use crate::probe::{challenge_from_wire, ProbeAnswer, MAX_PUBLIC_KEY_BYTES};
use crate::{pb, Limits};

/// What the fuzzed receiver expects: small, so that valid frames are reachable.
pub const EXPECT: Expect = Expect { epoch: 1, hidden_size: 16, vocab_size: 1000 };

/// Small limits, so that every limit is reachable from a short input.
pub const LIMITS: Limits = Limits { max_frame_bytes: 4096, max_positions: 64, max_chunk_bytes: 1024 };

/// A `StageMessage` as it comes off a `Stream`.
pub fn frame(data: &[u8]) {
    let Ok(message) = pb::StageMessage::decode(data) else { return };
    let Ok(frame) = StageFrame::from_wire(message, &LIMITS, &EXPECT) else { return };
    check_frame(&frame);
    // What a node accepted, it can send on unchanged, and the next node accepts it too.
    let again = StageFrame::from_wire(frame.clone().into_wire(), &LIMITS, &EXPECT);
    assert_eq!(again.as_ref(), Ok(&frame), "a valid frame changed on its way through the wire");
}

/// An `ActivationFrame` alone, and hidden states wrapped from a claimed shape.
///
/// The first 9 bytes, when there are that many, also claim a shape (rows and columns as
/// little-endian `u32`s) and a dtype for the rest of the input, as a local caller of
/// [`HiddenStates::new`] would.
pub fn activation(data: &[u8]) {
    if let Ok(message) = pb::ActivationFrame::decode(data) {
        if let Ok(frame) = Activation::from_wire(message, &LIMITS, &EXPECT) {
            check_frame(&StageFrame::Activation(frame));
        }
    }
    let Some((header, payload)) = data.split_first_chunk::<9>() else { return };
    let rows = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let cols = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let dtype = [DType::F32, DType::F16, DType::BF16][usize::from(header[8] % 3)];
    if let Ok(hidden) = HiddenStates::new(rows, cols, dtype, Bytes::copy_from_slice(payload)) {
        check_hidden(&hidden);
    }
}

/// A `WeightRequest` and a `WeightChunk`, both decoded from the same bytes.
pub fn weight_chunk(data: &[u8]) {
    if let Ok(request) = pb::WeightRequest::decode(data) {
        if let Ok(request) = WeightRequest::from_wire(request) {
            assert!((1..=MAX_NAME_BYTES).contains(&request.model.len()));
            if let WeightPart::Stage { layers, tensors } = &request.part {
                assert!(!layers.is_empty());
                assert!(tensors.len() <= MAX_REQUESTED_TENSORS);
                assert!(tensors.iter().all(|t| (1..=MAX_NAME_BYTES).contains(&t.len())));
            }
            let again = WeightRequest::from_wire(request.clone().into_wire());
            assert_eq!(again, Ok(request));
        }
    }
    if let Ok(chunk) = pb::WeightChunk::decode(data) {
        if let Ok(chunk) = WeightChunk::from_wire(chunk, &LIMITS) {
            assert!((1..=MAX_NAME_BYTES).contains(&chunk.tensor.len()));
            assert!(chunk.data.len() <= LIMITS.max_chunk_bytes);
            assert!(chunk.offset + chunk.data.len() as u64 <= chunk.tensor_size);
            assert!(!chunk.data.is_empty() || chunk.tensor_size == 0);
            let again = WeightChunk::from_wire(chunk.clone().into_wire(), &LIMITS);
            assert_eq!(again, Ok(chunk));
        }
    }
}

/// A `ProbeRequest` and a `ProbeReply`, both decoded from the same bytes.
pub fn probe(data: &[u8]) {
    if let Ok(request) = pb::ProbeRequest::decode(data) {
        if let Ok(Some(nonce)) = challenge_from_wire(&request) {
            assert_eq!(&nonce[..], &request.nonce[..]);
        }
    }
    if let Ok(reply) = pb::ProbeReply::decode(data) {
        if let Ok(answer) = ProbeAnswer::from_wire(reply) {
            if let Some(proof) = &answer.proof {
                assert!((1..=MAX_PUBLIC_KEY_BYTES).contains(&proof.public_key.len()));
            }
            let again = ProbeAnswer::from_wire(answer.clone().into_wire());
            assert_eq!(again, Ok(answer));
        }
    }
}

/// The promises of a validated frame, besides surviving the wire.
fn check_frame(frame: &StageFrame) {
    match frame {
        StageFrame::Activation(activation) => {
            check_hidden(&activation.hidden);
            assert_eq!(activation.hidden.cols(), EXPECT.hidden_size);
            assert!((1..=LIMITS.max_positions).contains(&activation.hidden.rows()));
            assert!(activation.hidden.data().len() <= LIMITS.max_frame_bytes);
            assert_eq!(activation.generation.is_some(), activation.start_position == 0);
        }
        StageFrame::Prefill(prefill) => {
            assert!((1..=LIMITS.max_positions).contains(&prefill.tokens.len()));
            assert!(prefill.tokens.iter().all(|&token| token < EXPECT.vocab_size));
            assert_eq!(prefill.generation.is_some(), prefill.start_position == 0);
        }
        StageFrame::Token(token) => assert!(token.id < EXPECT.vocab_size),
        StageFrame::Reset(reset) => assert_ne!(reset.sequence_id, 0),
        StageFrame::Error(error) => assert!(error.message.len() <= MAX_ERROR_MESSAGE_BYTES),
    }
}

/// Hidden states hold exactly the values their shape says.
fn check_hidden(hidden: &HiddenStates) {
    let elements = hidden.rows() * hidden.cols();
    assert_eq!(hidden.data().len(), elements * hidden.dtype().size_in_bytes());
    assert_eq!(hidden.to_f32_vec().len(), elements);
}
