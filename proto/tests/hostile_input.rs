//! Whatever a peer sends, validation answers with a frame that keeps every promise of
//! its type, or with an error: never a panic.

mod common;

use common::{assert_invariants, EXPECT, LIMITS};
use hearth_proto::frame::{Activation, DType, HiddenStates, StageFrame};
use hearth_proto::handshake::HandshakeStep;
use hearth_proto::probe::{challenge_from_wire, ProbeAnswer, MAX_PUBLIC_KEY_BYTES, NONCE_LEN, SIGNATURE_LEN};
use hearth_proto::weights::{WeightChunk, WeightPart, WeightRequest};
use hearth_proto::{pb, FrameError};
use proptest::collection::vec;
use proptest::prelude::*;
use prost::Message;

fn validate(bytes: &[u8]) -> Option<Result<StageFrame, FrameError>> {
    let message = pb::StageMessage::decode(bytes).ok()?;
    Some(StageFrame::from_wire(message, &LIMITS, &EXPECT))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        if let Some(Ok(frame)) = validate(&bytes) {
            assert_invariants(&frame);
        }
    }

    /// Random bytes rarely decode into anything deep; corrupting real messages does.
    #[test]
    fn corrupted_messages_never_panic(
        message in common::stage_messages(),
        corruptions in vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let mut bytes = message.encode_to_vec();
        for (at, value) in corruptions {
            if !bytes.is_empty() {
                let at = at.index(bytes.len());
                bytes[at] = value;
            }
        }
        if let Some(Ok(frame)) = validate(&bytes) {
            assert_invariants(&frame);
        }
    }

    #[test]
    fn hostile_messages_are_refused_or_keep_their_promises(message in common::stage_messages()) {
        if let Ok(frame) = StageFrame::from_wire(message, &LIMITS, &EXPECT) {
            assert_invariants(&frame);
        }
    }

    #[test]
    fn hostile_handshakes_and_chunks_never_panic(
        handshake in common::handshake_messages(),
        chunk in common::weight_chunks(),
    ) {
        if let Ok(HandshakeStep::Hello(hello)) = HandshakeStep::from_wire(handshake) {
            assert!((1..=128).contains(&hello.node_id.len()));
        }
        if let Ok(chunk) = WeightChunk::from_wire(chunk, &LIMITS) {
            assert!(chunk.data.len() <= LIMITS.max_chunk_bytes);
            assert!(chunk.offset + chunk.data.len() as u64 <= chunk.tensor_size);
        }
    }

    #[test]
    fn hostile_probes_are_refused_or_keep_their_promises((request, reply) in common::probes()) {
        match challenge_from_wire(&request) {
            Ok(Some(nonce)) => assert_eq!(&nonce[..], &request.nonce[..]),
            Ok(None) => assert!(request.nonce.is_empty()),
            Err(_) => assert!(!request.nonce.is_empty() && request.nonce.len() != NONCE_LEN),
        }
        let (key_len, signature_len) = (reply.public_key.len(), reply.signature.len());
        match ProbeAnswer::from_wire(reply) {
            Ok(ProbeAnswer { proof: Some(proof), .. }) => {
                assert!((1..=MAX_PUBLIC_KEY_BYTES).contains(&proof.public_key.len()));
            }
            Ok(ProbeAnswer { proof: None, .. }) => assert_eq!((key_len, signature_len), (0, 0)),
            Err(_) => {
                let complete = (1..=MAX_PUBLIC_KEY_BYTES).contains(&key_len) && signature_len == SIGNATURE_LEN;
                assert!(!complete && (key_len, signature_len) != (0, 0));
            }
        }
    }

    #[test]
    fn hostile_weight_requests_are_refused_or_keep_their_promises(request in common::weight_requests()) {
        if let Ok(request) = WeightRequest::from_wire(request) {
            assert!((1..=512).contains(&request.model.len()));
            match request.part {
                WeightPart::Header => {}
                WeightPart::Stage { layers, tensors } => {
                    assert!(layers.start < layers.end);
                    assert!(tensors.iter().all(|name| (1..=512).contains(&name.len())));
                }
            }
        }
    }

    #[test]
    fn valid_activations_survive_the_wire(
        rows in 1..=LIMITS.max_positions,
        dtype in prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)],
        start_position in 1..1000u32,
        seed in any::<u32>(),
    ) {
        let values: Vec<f32> = (0..rows * EXPECT.hidden_size)
            .map(|i| (i as u32 ^ seed) as f32 / 7.0)
            .collect();
        let hidden = HiddenStates::from_f32(rows, EXPECT.hidden_size, &values, dtype).unwrap();
        prop_assume!(hidden.data().len() <= LIMITS.max_frame_bytes);
        let sent = Activation {
            epoch: EXPECT.epoch,
            sequence_id: 5,
            start_position,
            hidden,
            generation: None,
            steps: seed % 2 == 0,
        };
        let bytes = StageFrame::from(sent.clone()).into_wire().encode_to_vec();
        let received = validate(&bytes).expect("decodes").expect("valid");
        prop_assert_eq!(received, StageFrame::Activation(sent));
    }
}
