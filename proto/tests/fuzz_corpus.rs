//! The fuzz corpus of `fuzz/` replayed on stable: every input the fuzzer kept for the
//! proto targets still validates without a panic.

#[path = "../../fuzz/replay.rs"]
mod replay;

use bytes::Bytes;
use hearth_proto::frame::{
    Activation, DType, ErrorCode, FinishReason, Generation, HiddenStates, Prefill, Reset, Sampling, StageError,
    StageFrame, Token,
};
use hearth_proto::fuzzing::{self, EXPECT};
use hearth_proto::pb;
use hearth_proto::probe::{IdentityProof, ProbeAnswer, NONCE_LEN, SIGNATURE_LEN};
use hearth_proto::weights::{WeightChunk, WeightPart, WeightRequest};
use prost::Message;

#[test]
fn frame_corpus() {
    replay::replay("frame", fuzzing::frame);
}

#[test]
fn activation_corpus() {
    replay::replay("activation", fuzzing::activation);
}

#[test]
fn weight_chunk_corpus() {
    replay::replay("weight_chunk", fuzzing::weight_chunk);
}

#[test]
fn probe_corpus() {
    replay::replay("probe", fuzzing::probe);
}

fn generation() -> Generation {
    Generation {
        sampling: Sampling { temperature: 0.7, top_p: 0.9, top_k: 40, seed: 42, word_pos: 1 << 70 },
        max_len: 128,
        stop_tokens: vec![2, 7],
        forced_tokens: vec![5, 6, 7],
    }
}

fn activation(start_position: u32, dtype: DType) -> Activation {
    let values: Vec<f32> = (0..2 * EXPECT.hidden_size).map(|i| i as f32 / 3.0).collect();
    let hidden = HiddenStates::from_f32(2, EXPECT.hidden_size, &values, dtype).unwrap();
    let generation = (start_position == 0).then(generation);
    Activation { epoch: EXPECT.epoch, sequence_id: 9, start_position, hidden, generation, steps: start_position == 7 }
}

/// Valid encodings of every kind of message, for the fuzzer to start from:
/// `cargo test -p hearth-proto --test fuzz_corpus -- --ignored`.
#[test]
#[ignore = "writes the seed corpus"]
fn write_seed_corpus() {
    let frames: Vec<StageFrame> = vec![
        activation(0, DType::BF16).into(),
        activation(5, DType::F32).into(),
        activation(7, DType::F16).into(),
        Prefill { epoch: 1, sequence_id: 3, start_position: 0, tokens: vec![1, 2, 999], generation: Some(generation()) }
            .into(),
        Prefill { epoch: 1, sequence_id: 3, start_position: 3, tokens: vec![4], generation: None }.into(),
        Token { epoch: 1, sequence_id: 3, position: 4, id: 17, finish: None, word_pos: 3 }.into(),
        Token { epoch: 1, sequence_id: 3, position: 9, id: 2, finish: Some(FinishReason::Stop), word_pos: 9 }.into(),
        Reset { epoch: 1, sequence_id: 3 }.into(),
        StageError { epoch: 2, sequence_id: 0, code: ErrorCode::StaleEpoch, message: "frame is from epoch 1".into() }
            .into(),
    ];
    let encoded: Vec<Vec<u8>> = frames.iter().map(|frame| frame.clone().into_wire().encode_to_vec()).collect();
    replay::write_seeds("frame", &encoded);

    let mut activations: Vec<Vec<u8>> = [activation(0, DType::F32), activation(4, DType::BF16)]
        .into_iter()
        .map(|frame| frame.into_wire().encode_to_vec())
        .collect();
    // The claimed-shape form: 2 × 3 f16 values.
    let mut claimed = [2u32.to_le_bytes(), 3u32.to_le_bytes()].concat();
    claimed.push(1);
    claimed.extend_from_slice(&[0x3c; 12]);
    activations.push(claimed);
    replay::write_seeds("activation", &activations);

    let request = WeightRequest {
        model: "smollm2".into(),
        part: WeightPart::Stage { layers: 4..9, tensors: vec!["model.norm.weight".into()] },
    };
    let header = WeightRequest { model: "smollm2".into(), part: WeightPart::Header };
    let chunk = WeightChunk {
        tensor: "model.layers.0.mlp.up_proj.weight".into(),
        offset: 96,
        tensor_size: 128,
        data: Bytes::from(vec![7; 32]),
        sha256: [1; 32],
    };
    replay::write_seeds(
        "weight_chunk",
        &[
            request.into_wire().encode_to_vec(),
            header.into_wire().encode_to_vec(),
            chunk.into_wire().encode_to_vec(),
        ],
    );

    let proof = IdentityProof { public_key: Bytes::from(vec![8; 36]), signature: [9; SIGNATURE_LEN] };
    replay::write_seeds(
        "probe",
        &[
            pb::ProbeRequest { payload: Bytes::from(vec![0; 16]), nonce: Bytes::new() }.encode_to_vec(),
            pb::ProbeRequest { payload: Bytes::new(), nonce: Bytes::from(vec![5; NONCE_LEN]) }.encode_to_vec(),
            ProbeAnswer { received_bytes: 16, proof: None }.into_wire().encode_to_vec(),
            ProbeAnswer { received_bytes: 0, proof: Some(proof) }.into_wire().encode_to_vec(),
        ],
    );
}
