//! The K-quant kernels: every instruction set against the portable kernels (bit for bit),
//! the portable kernels against plain f64 arithmetic on candle's dequantized weights, and
//! matrices of K-quant tensors against candle's own products.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::format::MatrixFormat;
use super::kquant_activation::{quantize_row_k, Q8KBlock};
use super::kquant_format::{
    quants_3, scales_3, scales_3_words, scales_and_mins, scales_then_mins, KQuant, Q2_K_D, Q3_K_D, Q6_K_D, QK_K,
};
use super::{product, Isa, Matrix, QuantMatrix};

const KINDS: [(GgmlDType, KQuant); 5] = [
    (GgmlDType::Q4K, KQuant::Q4_K),
    (GgmlDType::Q5K, KQuant::Q5_K),
    (GgmlDType::Q6K, KQuant::Q6_K),
    (GgmlDType::Q2K, KQuant::Q2_K),
    (GgmlDType::Q3K, KQuant::Q3_K),
];

/// Activation-like values: mostly small, some large outliers, some all-zero blocks.
fn activations(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    let mut x: Vec<f32> = (0..len)
        .map(|_| {
            let v: f32 = rng.random_range(-1.0..1.0);
            if rng.random_ratio(1, 50) {
                v * 40.0
            } else {
                v
            }
        })
        .collect();
    if len >= 2 * QK_K && rng.random_ratio(1, 3) {
        x[QK_K..2 * QK_K].fill(0.0);
    }
    x
}

/// A matrix of random but valid blocks: every bit pattern of the quants and scales occurs.
fn random_matrix(rng: &mut ChaCha8Rng, kind: KQuant, rows: usize, cols: usize) -> QuantMatrix {
    let bytes = kind.block_bytes();
    let mut data = vec![0u8; rows * cols / QK_K * bytes];
    rng.fill_bytes(&mut data);
    let f16_bits = |rng: &mut ChaCha8Rng| f16::from_f32(rng.random_range(-0.02f32..0.02)).to_le_bytes();
    for block in data.chunks_exact_mut(bytes) {
        match kind {
            KQuant::Q4_K | KQuant::Q5_K => {
                block[0..2].copy_from_slice(&f16_bits(rng));
                block[2..4].copy_from_slice(&f16_bits(rng));
            }
            KQuant::Q6_K => block[Q6_K_D..Q6_K_D + 2].copy_from_slice(&f16_bits(rng)),
            KQuant::Q2_K => {
                block[Q2_K_D..Q2_K_D + 2].copy_from_slice(&f16_bits(rng));
                block[Q2_K_D + 2..Q2_K_D + 4].copy_from_slice(&f16_bits(rng));
            }
            KQuant::Q3_K => block[Q3_K_D..Q3_K_D + 2].copy_from_slice(&f16_bits(rng)),
        }
    }
    QuantMatrix { format: MatrixFormat::K(kind), rows, cols, layout: super::Layout::Rows, data: data.into() }
}

fn quantized_matrix(rng: &mut ChaCha8Rng, dtype: GgmlDType, rows: usize, cols: usize) -> (QuantMatrix, QTensor) {
    let weights: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-0.5f32..0.5) + 0.05).collect();
    let tensor = Tensor::from_vec(weights, (rows, cols), &Device::Cpu).unwrap();
    let qtensor = QTensor::quantize(&tensor, dtype).unwrap();
    let matrix = QuantMatrix::from_qtensor(&qtensor).unwrap().expect("a native format");
    (matrix, qtensor)
}

fn quantized(x: &[f32], cols: usize) -> Vec<Q8KBlock> {
    let mut acts = vec![Q8KBlock::ZERO; x.len() / QK_K];
    for (x, acts) in x.chunks_exact(cols).zip(acts.chunks_exact_mut(cols / QK_K)) {
        quantize_row_k(x, acts);
    }
    acts
}

fn kind_of(matrix: &QuantMatrix) -> KQuant {
    match matrix.format {
        MatrixFormat::K(kind) => kind,
        other => panic!("{other:?} is not a K-quant"),
    }
}

#[test]
fn packed_scales_unpack_as_ggml() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    for _ in 0..1000 {
        let mut packed = [0u8; 12];
        rng.fill_bytes(&mut packed);
        let (scales, mins) = scales_and_mins(&packed);
        let words = scales_then_mins(&packed);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(bytes[..8], scales);
        assert_eq!(bytes[8..], mins);
    }
}

#[test]
fn q3_k_scales_unpack_as_ggml() {
    let mut rng = ChaCha8Rng::seed_from_u64(18);
    for _ in 0..1000 {
        let mut packed = [0u8; 12];
        rng.fill_bytes(&mut packed);
        let scales = scales_3(&packed);
        let words = scales_3_words(&packed);
        let bytes: Vec<i8> = words.iter().flat_map(|w| w.to_le_bytes()).map(|b| b as i8 - 32).collect();
        assert_eq!(bytes, scales);
    }
    // Scale 13: the high nibble of byte 5, topped with bits 6-7 of byte 9.
    let mut packed = [0u8; 12];
    packed[5] = 0xA0;
    packed[9] = 0b1100_0000;
    assert_eq!(scales_3(&packed)[13], (0x3A - 32) as i8);
}

#[test]
fn q3_k_high_bits_run_across_both_halves() {
    // Value 128 + 32 * 2 + 5 (half 1, chunk 2, byte 5): bit 6 of hmask[5]; its low bits
    // are bits 4-5 of qs[32 + 5].
    let mut block = [0u8; 110];
    block[..32].fill(0xFF);
    block[5] = !(1 << 6);
    block[32 + 32 + 5] = 0b0011_0000;
    let q = quants_3(&block);
    assert_eq!(q[128 + 64 + 5], 3 - 4, "high bit clear: minus 4");
    assert_eq!(q[64 + 5], 0, "the same byte's bit for half 0, chunk 2 is set");
    assert!(q.iter().enumerate().all(|(i, &q)| i == 128 + 64 + 5 || q >= 0));
}

#[test]
fn q8_k_quantizes_as_ggml() {
    // The largest magnitude is negative here: iscale = -127 / -2 is positive.
    let mut x = vec![0.0f32; QK_K];
    x[0] = -2.0;
    x[1] = 2.0; // As large, but later: not the one that sets the scale.
    x[2] = 1.0 / 127.0 * 2.0 * 2.5; // 2.5 after scaling: rounds to even, 2.
    x[3] = 1.0 / 127.0 * 2.0 * 3.5; // 3.5: rounds to 4.
    let mut block = [Q8KBlock::ZERO];
    quantize_row_k(&x, &mut block);
    let b = &block[0];
    assert_eq!(b.qs[..4], [-127, 127, 2, 4]);
    assert_eq!(b.d, 1.0 / (-127.0f32 / -2.0));
    assert_eq!(b.bsums[0], 6);
    assert!(b.bsums[1..].iter().all(|&s| s == 0));
    // A positive maximum negates the quants, and the scale with them.
    x[0] = 3.0;
    let mut block = [Q8KBlock::ZERO];
    quantize_row_k(&x, &mut block);
    assert_eq!(block[0].qs[..2], [-127, -85]);
    assert_eq!(block[0].d, 1.0 / (-127.0f32 / 3.0));
    // All zeros: a zero block.
    quantize_row_k(&[0.0; QK_K], &mut block);
    assert_eq!(block[0], Q8KBlock::ZERO);
}

#[test]
fn q8_k_values_are_within_half_a_step() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let x = activations(&mut rng, 8 * QK_K);
    let acts = quantized(&x, x.len());
    for (values, block) in x.chunks_exact(QK_K).zip(&acts) {
        for (&v, &q) in values.iter().zip(&block.qs) {
            assert!((q as f32 * block.d - v).abs() <= block.d.abs() * 0.5001 + 1e-7, "{v} as {q} * {}", block.d);
        }
        for (s, qs) in block.bsums.iter().zip(block.qs.chunks_exact(16)) {
            assert_eq!(*s as i32, qs.iter().map(|&q| q as i32).sum::<i32>());
        }
    }
}

#[test]
fn dequantized_k_blocks_match_candle() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for (dtype, _) in KINDS {
        let (matrix, qtensor) = quantized_matrix(&mut rng, dtype, 3, 512);
        let ids = Tensor::new(&[2u32, 0, 1, 2], &Device::Cpu).unwrap();
        let ours = matrix.embedding(&ids).unwrap();
        let candle = qtensor.embedding(&ids).unwrap();
        assert_eq!(ours.dims(), &[4, 512]);
        assert_eq!(ours.to_vec2::<f32>().unwrap(), candle.to_vec2::<f32>().unwrap(), "{dtype:?}");
    }
}

/// Rows, columns and activation rows for the comparisons of instruction sets.
fn shapes() -> Vec<(usize, usize, usize)> {
    let mut shapes = Vec::new();
    for rows in [1, 3, 7, 576, 1536] {
        for cols in [256, 512, 2048, 8192] {
            for m in [1, 2, 5, 17] {
                // Large products only in some shapes, to keep the (slow) portable kernels' time down.
                if rows * cols * m <= 1 << 25 {
                    shapes.push((rows, cols, m));
                }
            }
        }
    }
    shapes
}

type Kernel = Box<dyn Fn(KQuant, &[u8], usize, &[Q8KBlock], usize, &mut [f32])>;

/// Every K-quant kernel this CPU runs, by name: each instruction set's choice, and on x86
/// the AVX2 and AVX-512 kernels each alone.
fn kernels() -> Vec<(String, Kernel)> {
    let mut all: Vec<(String, Kernel)> = Vec::new();
    for isa in Isa::all() {
        all.push((format!("{isa:?}"), Box::new(move |k, w, b, a, m, o| isa.product_rows_k(k, w, b, a, m, o))));
    }
    #[cfg(target_arch = "x86_64")]
    {
        if let Some(avx2) = super::x86::Avx2::detect() {
            all.push((
                "AVX2 alone".into(),
                Box::new(move |k, w, b, a, m, o| avx2.product_rows_k_avx2(k, w, b, a, m, o)),
            ));
        }
        if let Some(wide) = super::kquant_x86::Avx512Vnni::detect() {
            all.push(("AVX-512".into(), Box::new(move |k, w, b, a, m, o| wide.product_rows_k(k, w, b, a, m, o))));
        }
    }
    all
}

#[test]
fn every_isa_multiplies_k_quants_like_the_portable_code() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let kernels = kernels();
    eprintln!("K-quant kernels compared: {:?}", kernels.iter().map(|(name, _)| name).collect::<Vec<_>>());
    for (_, kind) in KINDS {
        for (rows, cols, m) in shapes() {
            let matrix = random_matrix(&mut rng, kind, rows, cols);
            let x = activations(&mut rng, m * cols);
            let acts = quantized(&x, cols);
            let blocks = cols / QK_K;
            let weights = matrix.row_bytes(0..rows);
            let mut expected = vec![0.0; rows * m];
            Isa::Portable.product_rows_k(kind, weights, blocks, &acts, m, &mut expected);
            for (name, kernel) in &kernels {
                let mut got = vec![0.0; rows * m];
                kernel(kind, weights, blocks, &acts, m, &mut got);
                let differing = got.iter().zip(&expected).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                assert_eq!(differing, 0, "{name} differs from the portable kernel: {kind:?} {rows}x{cols}, {m} rows");
            }
        }
    }
}

/// Q4_K rows interleaved for the AVX-512 kernel against the portable kernel on the file's
/// layout, bit for bit: shapes with tails of rows, decoding and prefill widths, a product
/// that crosses activation tiles, several threads; and their embeddings.
#[test]
fn interleaved_q4_k_multiplies_like_the_portable_code() {
    #[cfg(target_arch = "x86_64")]
    {
        let Some(vnni) = super::kquant_x86::Avx512Vnni::detect() else {
            eprintln!("SKIPPED: this CPU lacks AVX-512 VNNI, so no matrix is interleaved here");
            return;
        };
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let kind = KQuant::Q4_K;
        // Rows of 65536 values make activation tiles of 4 rows: 9 rows cross two.
        let extra = [(5, 65536, 9), (9, 65536, 1)];
        for (rows, cols, m) in shapes().into_iter().filter(|&(rows, _, _)| rows < 1000).chain(extra) {
            let matrix = random_matrix(&mut rng, kind, rows, cols);
            let interleaved = matrix.clone().with_layout(super::Layout::Interleaved(vnni));
            let x = activations(&mut rng, m * cols);
            let expected = product::multiply(&matrix, &x, m, 1, Isa::Portable);
            for threads in [1, 3] {
                let got = product::multiply(&interleaved, &x, m, threads, Isa::detect());
                let differing = got.iter().zip(&expected).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                assert_eq!(differing, 0, "interleaved {kind:?} {rows}x{cols}, {m} rows, {threads} threads");
            }
            let ids: Vec<u32> = (0..rows as u32).rev().collect();
            let (mut expected, mut got) = (Vec::new(), Vec::new());
            matrix.embedding_into(&ids, &mut expected).unwrap();
            interleaved.embedding_into(&ids, &mut got).unwrap();
            assert_eq!(got, expected, "embedding of interleaved {kind:?} {rows}x{cols}");
        }
    }
}

/// The portable kernels against f64 sums of products of candle's dequantized weights and
/// the dequantized activations.
#[test]
fn k_products_match_dequantized_arithmetic() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    for (dtype, kind) in KINDS {
        for cols in [256, 512, 2048] {
            for rows in [1, 5, 17] {
                let (matrix, qtensor) = quantized_matrix(&mut rng, dtype, rows, cols);
                let weights = qtensor.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
                let m = 3;
                let x = activations(&mut rng, m * cols);
                let acts = quantized(&x, cols);
                let got = matrix.product(&x, m, 1);
                for (i, acts) in acts.chunks_exact(cols / QK_K).enumerate() {
                    for (r, w) in weights.iter().enumerate() {
                        let row = matrix.row_bytes(r..r + 1);
                        let (mut sum, mut magnitude) = (0.0f64, 0.0f64);
                        for (b, a) in acts.iter().enumerate() {
                            // Q4_K's and Q5_K's weights are differences `d*sc*q - dmin*m`:
                            // the rounding error scales with the terms, not with the difference.
                            // Q2_K's likewise, per 16 values.
                            let block = &row[b * kind.block_bytes()..];
                            let mins_term: [f64; 16] = match kind {
                                KQuant::Q6_K | KQuant::Q3_K => [0.0; 16],
                                KQuant::Q2_K => {
                                    let dmin = super::format::f16_at(block, Q2_K_D + 2).abs() as f64;
                                    std::array::from_fn(|s| dmin * (block[s] >> 4) as f64)
                                }
                                KQuant::Q4_K | KQuant::Q5_K => {
                                    let dmin = super::format::f16_at(block, 2).abs() as f64;
                                    let mins = scales_and_mins(&block[4..16]).1;
                                    std::array::from_fn(|s| dmin * mins[s / 2] as f64)
                                }
                            };
                            for (j, &q) in a.qs.iter().enumerate() {
                                let x = q as f64 * a.d as f64;
                                sum += w[b * QK_K + j] as f64 * x;
                                magnitude +=
                                    (w[b * QK_K + j] as f64).abs() * x.abs() + 2.0 * mins_term[j / 16] * x.abs();
                            }
                        }
                        let ours = got[i * rows + r] as f64;
                        let tolerance = 1e-4 * magnitude + 1e-6;
                        assert!(
                            (ours - sum).abs() <= tolerance,
                            "{kind:?} {rows}x{cols} row {r}, input {i}: {ours} vs {sum} (tolerance {tolerance})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn thread_count_does_not_change_k_results() {
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    for (_, kind) in KINDS {
        let matrix = random_matrix(&mut rng, kind, 1000, 2048);
        for m in [1, 6] {
            let x = activations(&mut rng, m * 2048);
            for isa in Isa::all() {
                let one = product::multiply(&matrix, &x, m, 1, isa);
                for threads in [2, 3, 8] {
                    let many = product::multiply(&matrix, &x, m, threads, isa);
                    assert_eq!(many, one, "{kind:?}, {isa:?}, {m} rows, {threads} threads");
                }
            }
        }
    }
}

/// `Matrix::quantized` takes K-quant tensors natively now, and its products agree with
/// candle's (which rounds activations' ties away from zero, and sums in another order).
#[test]
fn k_quant_tensors_run_natively_and_agree_with_candle() {
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    for (dtype, kind) in KINDS {
        let (rows, cols) = (96, 1024);
        let values: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-0.5f32..0.5) + 0.05).collect();
        let tensor = Tensor::from_vec(values, (rows, cols), &Device::Cpu).unwrap();
        let qtensor = QTensor::quantize(&tensor, dtype).unwrap();
        let weights = qtensor.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let candle = QMatMul::from_qtensor(QTensor::quantize(&tensor, dtype).unwrap()).unwrap();
        let matrix = Matrix::quantized(qtensor).unwrap();
        let Matrix::Native(native) = &matrix else { panic!("{dtype:?} not multiplied natively") };
        assert_eq!(kind_of(native), kind);
        for m in [1, 5] {
            let x = activations(&mut rng, m * cols);
            let input = Tensor::from_vec(x.clone(), (m, cols), &Device::Cpu).unwrap();
            let ours = matrix.forward(&input).unwrap().to_vec2::<f32>().unwrap();
            let theirs = candle.forward(&input).unwrap().to_vec2::<f32>().unwrap();
            let mut out = Vec::new();
            matrix.forward_into(&x, m, &mut out).unwrap();
            assert_eq!(out, ours.concat(), "{dtype:?}: forward_into and forward differ");
            for i in 0..m {
                for r in 0..rows {
                    let magnitude: f32 = weights[r].iter().zip(&x[i * cols..]).map(|(w, x)| (w * x).abs()).sum();
                    let (a, b) = (ours[i][r], theirs[i][r]);
                    assert!(
                        (a - b).abs() <= 2e-3 * magnitude + 1e-5,
                        "{dtype:?} row {r}, input {i}: {a} vs candle's {b}"
                    );
                }
            }
        }
    }
}
