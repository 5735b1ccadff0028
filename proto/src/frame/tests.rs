use prost::Message;
use tonic::Code;

use super::*;

const EXPECT: Expect = Expect { epoch: 3, hidden_size: 8, vocab_size: 100 };

fn limits() -> Limits {
    Limits::default()
}

fn generation() -> Generation {
    Generation {
        sampling: Sampling { temperature: 0.7, top_p: 0.9, top_k: 40, seed: 1234, word_pos: 0 },
        max_len: 64,
        stop_tokens: vec![2, 99],
        forced_tokens: vec![5, 6],
    }
}

/// A valid frame continuing sequence 42 at position 10, with `rows` rows of `dtype`.
fn activation_frame(rows: u64, dtype: DType) -> pb::ActivationFrame {
    let cols = EXPECT.hidden_size as u64;
    pb::ActivationFrame {
        epoch: EXPECT.epoch,
        sequence_id: 42,
        start_position: 10,
        dtype: dtype.into_wire().into(),
        shape: vec![rows, cols],
        data: Bytes::from(vec![0; (rows * cols) as usize * dtype.size_in_bytes()]),
        generation: None,
        steps: false,
    }
}

fn refuse(frame: pb::ActivationFrame) -> FrameError {
    match Activation::from_wire(frame, &limits(), &EXPECT) {
        Ok(activation) => panic!("accepted {activation:?}"),
        Err(error) => error,
    }
}

fn refuse_prefill(prefill: pb::Prefill) -> FrameError {
    match Prefill::from_wire(prefill, &limits(), &EXPECT) {
        Ok(prefill) => panic!("accepted {prefill:?}"),
        Err(error) => error,
    }
}

fn prefill(start_position: u32, tokens: Vec<u32>) -> pb::Prefill {
    pb::Prefill {
        epoch: EXPECT.epoch,
        sequence_id: 42,
        start_position,
        tokens,
        generation: (start_position == 0).then(|| generation().into_wire()),
    }
}

/// Sends `frame` through prost bytes and validation, as a receiving stage would.
fn over_the_wire(frame: StageFrame) -> StageFrame {
    let bytes = frame.into_wire().encode_to_vec();
    let message =
        pb::StageMessage::decode(bytes.as_slice()).expect("prost decodes what it encoded");
    StageFrame::from_wire(message, &limits(), &EXPECT).expect("a frame built by into_wire is valid")
}

#[test]
fn activations_round_trip_in_every_dtype() {
    let values: Vec<f32> = (0..24).map(|i| i as f32 * 0.25 - 3.0).collect();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let hidden = HiddenStates::from_f32(3, 8, &values, dtype).unwrap();
        assert_eq!(hidden.data().len(), 24 * dtype.size_in_bytes());
        let frame = Activation {
            epoch: 3,
            sequence_id: 7,
            start_position: 0,
            hidden,
            generation: Some(generation()),
            steps: dtype == DType::F16,
        };
        let StageFrame::Activation(received) = over_the_wire(frame.clone().into()) else {
            panic!("not an activation");
        };
        assert_eq!(received, frame);
        // Quarter steps up to 3 are exact in f16 and bf16 too.
        assert_eq!(received.hidden.to_f32_vec(), values, "{dtype}");
    }
}

#[test]
fn half_precision_values_are_encoded_little_endian() {
    let f16 = HiddenStates::from_f32(1, 2, &[1.0, -2.0], DType::F16).unwrap();
    assert_eq!(&f16.data()[..], [0x00, 0x3c, 0x00, 0xc0]);
    let bf16 = HiddenStates::from_f32(1, 2, &[1.0, -2.0], DType::BF16).unwrap();
    assert_eq!(&bf16.data()[..], [0x80, 0x3f, 0x00, 0xc0]);
    let f32 = HiddenStates::from_f32(1, 1, &[1.0], DType::F32).unwrap();
    assert_eq!(&f32.data()[..], [0x00, 0x00, 0x80, 0x3f]);
}

#[test]
fn other_frames_round_trip() {
    let frames: Vec<StageFrame> = vec![
        Prefill {
            epoch: 3,
            sequence_id: 9,
            start_position: 0,
            tokens: vec![1, 2, 3],
            generation: Some(generation()),
        }
        .into(),
        Prefill { epoch: 3, sequence_id: 9, start_position: 3, tokens: vec![4], generation: None }
            .into(),
        Token {
            epoch: 3,
            sequence_id: 9,
            position: 4,
            id: 99,
            finish: Some(FinishReason::Length),
            // Both halves of the word position must survive.
            word_pos: (5 << 64) | 17,
        }
        .into(),
        Token { epoch: 3, sequence_id: 9, position: 5, id: 0, finish: None, word_pos: 0 }.into(),
        Reset { epoch: 3, sequence_id: 9 }.into(),
        StageError {
            epoch: 4,
            sequence_id: 0,
            code: ErrorCode::Overloaded,
            message: "full".into(),
        }
        .into(),
    ];
    for frame in frames {
        assert_eq!(over_the_wire(frame.clone()), frame);
    }
}

#[test]
fn sampling_word_position_keeps_all_128_bits() {
    let mut generation = generation();
    generation.sampling.word_pos = u128::MAX - 1;
    let wire = generation.clone().into_wire();
    assert_eq!(Generation::from_wire(wire, EXPECT.vocab_size).unwrap(), generation);
}

#[test]
fn refuses_payload_that_disagrees_with_the_shape() {
    let mut frame = activation_frame(2, DType::F32);
    frame.data = Bytes::from(vec![0; 60]);
    assert_eq!(
        refuse(frame),
        FrameError::LengthMismatch {
            rows: 2,
            cols: 8,
            elements: 16,
            dtype: DType::F32,
            expected: 64,
            bytes: 60
        }
    );
}

#[test]
fn refuses_a_huge_claim_without_believing_it() {
    let mut frame = activation_frame(2, DType::F32);
    frame.shape = vec![1_000_000, 1_000_000];
    let error = refuse(frame);
    assert_eq!(
        error.to_string(),
        "frame claims 1000000000000 elements (1000000 × 1000000) of f32, which take \
         4000000000000 bytes, but carries 64 bytes"
    );
}

#[test]
fn refuses_a_shape_whose_size_overflows() {
    let mut frame = activation_frame(1, DType::F32);
    frame.shape = vec![u64::MAX, 2];
    assert_eq!(refuse(frame), FrameError::ShapeOverflow { rows: u64::MAX, cols: 2 });
    // Elements fit in 64 bits, bytes do not.
    let mut frame = activation_frame(1, DType::F32);
    frame.shape = vec![1 << 62, 1];
    assert_eq!(refuse(frame), FrameError::ShapeOverflow { rows: 1 << 62, cols: 1 });
}

#[test]
fn refuses_unknown_dtypes() {
    for value in [0, 4, -1, i32::MAX] {
        let mut frame = activation_frame(1, DType::F32);
        frame.dtype = value;
        assert_eq!(refuse(frame), FrameError::UnknownDType(value));
    }
}

#[test]
fn refuses_shapes_that_are_not_matrices() {
    for shape in [vec![], vec![8], vec![1, 1, 8]] {
        let mut frame = activation_frame(1, DType::F32);
        let dims = shape.len();
        frame.shape = shape;
        assert_eq!(refuse(frame), FrameError::Rank(dims));
    }
}

#[test]
fn refuses_zero_rows() {
    assert_eq!(refuse(activation_frame(0, DType::F32)), FrameError::NoPositions);
}

#[test]
fn refuses_the_wrong_hidden_size() {
    let mut frame = activation_frame(2, DType::F32);
    frame.shape = vec![4, 4];
    assert_eq!(refuse(frame), FrameError::HiddenSize { got: 4, expected: 8 });
}

#[test]
fn refuses_too_many_positions() {
    let limits = Limits { max_positions: 4, ..Limits::default() };
    assert!(Activation::from_wire(activation_frame(4, DType::F16), &limits, &EXPECT).is_ok());
    assert_eq!(
        Activation::from_wire(activation_frame(5, DType::F16), &limits, &EXPECT),
        Err(FrameError::TooMany { what: "positions", got: 5, max: 4 })
    );
}

#[test]
fn refuses_payloads_over_the_limit() {
    let limits = Limits { max_frame_bytes: 64, ..Limits::default() };
    assert!(Activation::from_wire(activation_frame(2, DType::F32), &limits, &EXPECT).is_ok());
    assert_eq!(
        Activation::from_wire(activation_frame(3, DType::F32), &limits, &EXPECT),
        Err(FrameError::TooLarge { what: "activation payload", bytes: 96, max: 64 })
    );
}

#[test]
fn refuses_an_odd_byte_count_for_half_precision() {
    let mut frame = activation_frame(1, DType::F16);
    frame.data = Bytes::from(vec![0; 15]);
    assert!(matches!(
        refuse(frame),
        FrameError::LengthMismatch { expected: 16, bytes: 15, dtype: DType::F16, .. }
    ));
}

#[test]
fn refuses_other_epochs() {
    let mut frame = activation_frame(1, DType::F32);
    frame.epoch = 2;
    let stale = refuse(frame);
    assert_eq!(stale, FrameError::StaleEpoch { got: 2, current: 3 });
    assert_eq!(stale.to_status().code(), Code::FailedPrecondition);
    assert_eq!(stale.code(), ErrorCode::StaleEpoch);

    let mut frame = activation_frame(1, DType::F32);
    frame.epoch = 4;
    let ahead = refuse(frame);
    assert_eq!(ahead, FrameError::EpochAhead { got: 4, current: 3 });
    assert_eq!(ahead.to_status().code(), Code::Unavailable);

    // Every kind of frame sent downstream is checked.
    let stale = Expect { epoch: 9, ..EXPECT };
    let token = pb::TokenFrame { epoch: 3, sequence_id: 1, ..Default::default() };
    assert!(matches!(Token::from_wire(token, &stale), Err(FrameError::StaleEpoch { .. })));
    let reset = pb::ResetSequence { epoch: 3, sequence_id: 1 };
    assert!(matches!(Reset::from_wire(reset, &stale), Err(FrameError::StaleEpoch { .. })));
    assert!(matches!(
        Prefill::from_wire(prefill(0, vec![1]), &limits(), &stale),
        Err(FrameError::StaleEpoch { .. })
    ));
}

#[test]
fn refuses_sequence_zero() {
    let mut frame = activation_frame(1, DType::F32);
    frame.sequence_id = 0;
    assert_eq!(refuse(frame), FrameError::ZeroSequenceId);
    let reset = pb::ResetSequence { epoch: 3, sequence_id: 0 };
    assert_eq!(Reset::from_wire(reset, &EXPECT), Err(FrameError::ZeroSequenceId));
}

#[test]
fn generation_comes_with_the_opening_frame_and_only_with_it() {
    let mut frame = activation_frame(1, DType::F32);
    frame.start_position = 0;
    assert_eq!(refuse(frame.clone()), FrameError::MissingGeneration);
    frame.generation = Some(generation().into_wire());
    assert!(Activation::from_wire(frame.clone(), &limits(), &EXPECT).is_ok());
    frame.start_position = 1;
    assert_eq!(refuse(frame), FrameError::UnexpectedGeneration(1));

    let mut opening = prefill(0, vec![1]);
    opening.generation = None;
    assert_eq!(refuse_prefill(opening), FrameError::MissingGeneration);
}

#[test]
fn refuses_bad_generation_settings() {
    let mut frame = activation_frame(1, DType::F32);
    frame.start_position = 0;
    let with = |edit: fn(&mut pb::Generation)| {
        let mut generation = generation().into_wire();
        edit(&mut generation);
        pb::ActivationFrame { generation: Some(generation), ..frame.clone() }
    };
    assert_eq!(refuse(with(|g| g.sampling = None)), FrameError::Missing("sampling state"));
    assert_eq!(
        refuse(with(|g| g.sampling.as_mut().unwrap().temperature = f32::NAN)),
        FrameError::NotFinite("temperature")
    );
    assert_eq!(
        refuse(with(|g| g.sampling.as_mut().unwrap().top_p = f32::INFINITY)),
        FrameError::NotFinite("top_p")
    );
    assert_eq!(refuse(with(|g| g.max_len = 0)), FrameError::ZeroMaxLen);
    assert_eq!(
        refuse(with(|g| g.stop_tokens = vec![1; 65])),
        FrameError::TooMany { what: "stop tokens", got: 65, max: 64 }
    );
    assert_eq!(
        refuse(with(|g| g.stop_tokens = vec![100])),
        FrameError::TokenOutOfRange { token: 100, vocab_size: 100 }
    );
}

#[test]
fn refuses_positions_past_the_last() {
    let mut frame = activation_frame(2, DType::F32);
    frame.start_position = u32::MAX - 1;
    assert_eq!(refuse(frame), FrameError::PositionOverflow { start: u32::MAX - 1, count: 2 });
    assert_eq!(
        refuse_prefill(prefill(u32::MAX, vec![1])),
        FrameError::PositionOverflow { start: u32::MAX, count: 1 }
    );
}

#[test]
fn refuses_bad_prefills() {
    assert_eq!(refuse_prefill(prefill(0, vec![])), FrameError::NoPositions);
    assert_eq!(
        refuse_prefill(prefill(5, vec![1, 100])),
        FrameError::TokenOutOfRange { token: 100, vocab_size: 100 }
    );
    let limits = Limits { max_positions: 2, ..Limits::default() };
    assert_eq!(
        Prefill::from_wire(prefill(5, vec![1, 2, 3]), &limits, &EXPECT),
        Err(FrameError::TooMany { what: "positions", got: 3, max: 2 })
    );
}

#[test]
fn refuses_bad_tokens() {
    let token = pb::TokenFrame { epoch: 3, sequence_id: 1, token: 100, ..Default::default() };
    assert_eq!(
        Token::from_wire(token, &EXPECT),
        Err(FrameError::TokenOutOfRange { token: 100, vocab_size: 100 })
    );
    let token = pb::TokenFrame { epoch: 3, sequence_id: 1, finish: 3, ..Default::default() };
    assert_eq!(Token::from_wire(token, &EXPECT), Err(FrameError::UnknownFinishReason(3)));
}

#[test]
fn refuses_an_empty_message() {
    let error = StageFrame::from_wire(pb::StageMessage::default(), &limits(), &EXPECT).unwrap_err();
    assert_eq!(error, FrameError::Empty);
    assert_eq!(error.to_status().code(), Code::InvalidArgument);
}

#[test]
fn error_reports_are_taken_as_they_come_but_trimmed() {
    let report = pb::StageError {
        epoch: 1,
        sequence_id: 5,
        code: 1000,
        // 'é' takes two bytes and straddles the cut.
        message: format!("{}é{}", "a".repeat(MAX_ERROR_MESSAGE_BYTES - 1), "b".repeat(5000)),
    };
    let error = StageError::from_wire(report);
    assert_eq!(error.code, ErrorCode::Internal);
    assert_eq!(error.message, "a".repeat(MAX_ERROR_MESSAGE_BYTES - 1));
}

#[test]
fn refusals_carry_their_reason_upstream() {
    let error = FrameError::UnknownSequence(5);
    assert_eq!(error.to_status().code(), Code::FailedPrecondition);
    let report = StageError::refusing(&error, 3, 5);
    assert_eq!(report.code, ErrorCode::UnknownSequence);
    assert_eq!(report.message, "sequence 5 is not open on this node");
    assert_eq!(refuse(activation_frame(0, DType::F32)).to_status().code(), Code::InvalidArgument);
}

#[test]
fn hidden_states_check_their_own_shape() {
    assert!(matches!(
        HiddenStates::new(2, 3, DType::BF16, vec![0; 11]),
        Err(FrameError::LengthMismatch { expected: 12, bytes: 11, .. })
    ));
    assert!(matches!(
        HiddenStates::from_f32(2, 3, &[0.0; 5], DType::F32),
        Err(FrameError::LengthMismatch { expected: 24, bytes: 20, .. })
    ));
    let hidden = HiddenStates::new(2, 3, DType::BF16, vec![0; 12]).unwrap();
    assert_eq!(format!("{hidden:?}"), "HiddenStates(2 × 3 bf16)");
}
