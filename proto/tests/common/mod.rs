//! Strategies for messages a hostile or broken peer might send: mostly valid, with
//! every field liable to be wrong, and shapes liable to claim absurd sizes.

use bytes::Bytes;
use hearth_proto::frame::{Expect, StageFrame};
use hearth_proto::{pb, Limits};
use proptest::collection::vec;
use proptest::prelude::*;

pub const EXPECT: Expect = Expect { epoch: 1, hidden_size: 16, vocab_size: 1000 };

pub const LIMITS: Limits =
    Limits { max_frame_bytes: 4096, max_positions: 64, max_chunk_bytes: 1024 };

/// Mostly the right epoch.
fn epochs() -> impl Strategy<Value = u64> {
    prop_oneof![8 => Just(EXPECT.epoch), 1 => Just(EXPECT.epoch - 1), 1 => any::<u64>()]
}

/// Mostly a valid sequence id.
fn sequence_ids() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 1..u64::MAX, 1 => Just(0)]
}

/// Mostly 0 (an opening frame) or small, sometimes near the end of the positions.
fn positions() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0), 0..100u32, (u32::MAX - 100)..=u32::MAX]
}

/// Mostly valid token ids.
fn tokens() -> impl Strategy<Value = u32> {
    prop_oneof![100 => 0..EXPECT.vocab_size, 1 => any::<u32>()]
}

fn floats() -> impl Strategy<Value = f32> {
    prop_oneof![
        8 => 0.0..2.0f32,
        1 => prop_oneof![Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
        1 => any::<f32>(),
    ]
}

fn generations() -> impl Strategy<Value = pb::Generation> {
    let sampling = (floats(), floats(), any::<u32>(), any::<u64>(), any::<u64>(), any::<u64>())
        .prop_map(|(temperature, top_p, top_k, seed, word_pos_low, word_pos_high)| {
            pb::SamplingState { temperature, top_p, top_k, seed, word_pos_low, word_pos_high }
        });
    (
        prop_oneof![8 => sampling.prop_map(Some), 1 => Just(None)],
        prop_oneof![8 => 1..u32::MAX, 1 => Just(0)],
        vec(tokens(), 0..70),
        vec(tokens(), 0..8),
    )
        .prop_map(|(sampling, max_len, stop_tokens, forced_tokens)| pb::Generation {
            sampling,
            max_len,
            stop_tokens,
            forced_tokens,
        })
}

/// Shapes: plausible ones, ones claiming absurd sizes, and arbitrary ones.
fn shapes() -> impl Strategy<Value = Vec<u64>> {
    let huge = prop_oneof![Just(u64::MAX), Just(1 << 32), Just(1 << 62), Just(1_000_000), Just(0)];
    prop_oneof![
        4 => (0..70u64, prop_oneof![3 => Just(EXPECT.hidden_size as u64), 1 => 0..40u64])
            .prop_map(|(rows, cols)| vec![rows, cols]),
        1 => vec(huge, 2),
        1 => vec(any::<u64>(), 0..4),
    ]
}

pub fn activation_frames() -> impl Strategy<Value = pb::ActivationFrame> {
    (
        (epochs(), sequence_ids(), positions()),
        prop_oneof![8 => 1..=3i32, 1 => any::<i32>()],
        shapes(),
        // How far the payload is from fitting the shape, in bytes.
        prop_oneof![6 => Just(0i64), 1 => -3..=3i64],
        generations(),
        // Whether the generation settings are misplaced: missing from an opening frame,
        // or carried by another.
        prop::bool::weighted(0.1),
    )
        .prop_map(
            |((epoch, sequence_id, start_position), dtype, shape, skew, generation, misplaced)| {
                let value_bytes = if dtype == 1 { 4 } else { 2 };
                // The payload the shape claims, when that is small enough to hold; else a
                // few bytes: the point is then that the claim is not believed.
                let claimed = shape
                    .iter()
                    .try_fold(value_bytes, |bytes: u64, &dim| bytes.checked_mul(dim))
                    .filter(|&bytes| bytes <= 8192)
                    .unwrap_or(64);
                let len = usize::try_from((claimed as i64 + skew).max(0)).unwrap();
                pb::ActivationFrame {
                    epoch,
                    sequence_id,
                    start_position,
                    dtype,
                    shape,
                    data: Bytes::from(vec![0x3c; len]),
                    generation: ((start_position == 0) != misplaced).then_some(generation),
                    steps: skew % 2 == 0,
                }
            },
        )
}

pub fn stage_messages() -> impl Strategy<Value = pb::StageMessage> {
    use pb::stage_message::Kind;
    let prefill = (
        (epochs(), sequence_ids(), positions()),
        vec(tokens(), 0..80),
        generations(),
        prop::bool::weighted(0.1),
    )
        .prop_map(|((epoch, sequence_id, start_position), tokens, generation, misplaced)| {
            let generation = ((start_position == 0) != misplaced).then_some(generation);
            Kind::Prefill(pb::Prefill { epoch, sequence_id, start_position, tokens, generation })
        });
    let token = (epochs(), sequence_ids(), any::<u32>(), tokens(), -1..4i32, any::<u64>())
        .prop_map(|(epoch, sequence_id, position, token, finish, word_pos_low)| {
            Kind::Token(pb::TokenFrame {
                epoch,
                sequence_id,
                position,
                token,
                finish,
                word_pos_low,
                word_pos_high: word_pos_low.rotate_left(7),
            })
        });
    let reset = (epochs(), sequence_ids())
        .prop_map(|(epoch, sequence_id)| Kind::Reset(pb::ResetSequence { epoch, sequence_id }));
    let error = (any::<u64>(), any::<u64>(), any::<i32>(), ".{0,40}").prop_map(
        |(epoch, sequence_id, code, message)| {
            Kind::Error(pb::StageError { epoch, sequence_id, code, message })
        },
    );
    let kind = prop_oneof![
        4 => activation_frames().prop_map(Kind::Activation),
        2 => prefill,
        2 => token,
        1 => reset,
        1 => error,
    ];
    prop_oneof![20 => kind.prop_map(Some), 1 => Just(None)]
        .prop_map(|kind| pb::StageMessage { kind })
}

pub fn handshake_messages() -> impl Strategy<Value = pb::HandshakeMessage> {
    use pb::handshake_message::Kind;
    let bytes = |range: std::ops::Range<usize>| vec(any::<u8>(), range).prop_map(Bytes::from);
    let hello = (prop_oneof![Just(1u32), any::<u32>()], ".{0,140}", bytes(28..36)).prop_map(
        |(protocol_version, node_id, nonce)| {
            Kind::Hello(pb::Hello { protocol_version, node_id, nonce })
        },
    );
    let proof = bytes(28..36).prop_map(|mac| Kind::Proof(pb::Proof { mac }));
    let session = (bytes(0..300), any::<u32>())
        .prop_map(|(ticket, ttl_seconds)| Kind::Session(pb::Session { ticket, ttl_seconds }));
    prop_oneof![Just(None), prop_oneof![hello, proof, session].prop_map(Some)]
        .prop_map(|kind| pb::HandshakeMessage { kind })
}

/// Probes and their replies, with nonces, keys and signatures of lengths around the
/// valid ones.
pub fn probes() -> impl Strategy<Value = (pb::ProbeRequest, pb::ProbeReply)> {
    let bytes = |range: std::ops::Range<usize>| vec(any::<u8>(), range).prop_map(Bytes::from);
    let request = (bytes(0..64), prop_oneof![Just(Bytes::new()), bytes(28..36)])
        .prop_map(|(payload, nonce)| pb::ProbeRequest { payload, nonce });
    let key = prop_oneof![Just(Bytes::new()), bytes(0..80)];
    let signature = prop_oneof![Just(Bytes::new()), bytes(60..68)];
    let reply = (any::<u64>(), key, signature)
        .prop_map(|(received_bytes, public_key, signature)| pb::ProbeReply { received_bytes, public_key, signature });
    (request, reply)
}

pub fn weight_chunks() -> impl Strategy<Value = pb::WeightChunk> {
    (
        "[a-z.0-9]{0,20}",
        prop_oneof![0..2048u64, any::<u64>()],
        prop_oneof![0..4096u64, any::<u64>()],
        vec(any::<u8>(), 0..1100),
        prop_oneof![4 => Just(32usize), 1 => 0..64usize],
    )
        .prop_map(|(tensor, offset, tensor_size, data, sha256_len)| pb::WeightChunk {
            tensor,
            offset,
            tensor_size,
            data: Bytes::from(data),
            sha256: Bytes::from(vec![0xab; sha256_len]),
        })
}

pub fn weight_requests() -> impl Strategy<Value = pb::WeightRequest> {
    (
        ".{0,20}",
        prop_oneof![0..40u32, any::<u32>()],
        prop_oneof![0..40u32, any::<u32>()],
        vec("[a-z.0-9<>/]{0,16}", 0..8),
        any::<bool>(),
    )
        .prop_map(|(model, layer_start, layer_end, tensors, header)| pb::WeightRequest {
            model,
            layer_start,
            layer_end,
            tensors,
            header,
        })
}

/// Asserts what every accepted frame guarantees, whatever it was made from.
pub fn assert_invariants(frame: &StageFrame) {
    let check_tokens = |tokens: &[u32]| tokens.iter().all(|&t| t < EXPECT.vocab_size);
    match frame {
        StageFrame::Activation(activation) => {
            let hidden = &activation.hidden;
            assert_eq!(
                hidden.data().len(),
                hidden.rows() * hidden.cols() * hidden.dtype().size_in_bytes(),
                "data length disagrees with shape"
            );
            assert!((1..=LIMITS.max_positions).contains(&hidden.rows()));
            assert!(hidden.data().len() <= LIMITS.max_frame_bytes);
            assert_eq!(hidden.cols(), EXPECT.hidden_size);
            assert_eq!(hidden.to_f32_vec().len(), hidden.rows() * hidden.cols());
            assert_eq!(activation.epoch, EXPECT.epoch);
            assert_ne!(activation.sequence_id, 0);
            assert_eq!(activation.generation.is_some(), activation.start_position == 0);
        }
        StageFrame::Prefill(prefill) => {
            assert!((1..=LIMITS.max_positions).contains(&prefill.tokens.len()));
            assert!(check_tokens(&prefill.tokens));
            assert_eq!(prefill.generation.is_some(), prefill.start_position == 0);
            if let Some(generation) = &prefill.generation {
                assert!(check_tokens(&generation.stop_tokens));
                assert!(generation.sampling.temperature.is_finite());
            }
        }
        StageFrame::Token(token) => assert!(token.id < EXPECT.vocab_size),
        StageFrame::Reset(reset) => assert_ne!(reset.sequence_id, 0),
        StageFrame::Error(error) => assert!(error.message.len() <= 1024),
    }
}
