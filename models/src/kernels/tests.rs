//! Every instruction set against the portable kernels (bit for bit), and the portable
//! kernels against plain f32 arithmetic on dequantized values.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::activation::{quantize_row, Q8Block};
use super::format::{five_bit_quants, ActivationFormat, MatrixFormat, WeightFormat, BLOCK};
use super::{Isa, Matrix, QuantMatrix};

const FORMATS: [(GgmlDType, WeightFormat); 5] = [
    (GgmlDType::Q4_0, WeightFormat::Q4_0),
    (GgmlDType::Q4_1, WeightFormat::Q4_1),
    (GgmlDType::Q5_0, WeightFormat::Q5_0),
    (GgmlDType::Q5_1, WeightFormat::Q5_1),
    (GgmlDType::Q8_0, WeightFormat::Q8_0),
];
const ROWS: [usize; 12] = [1, 2, 3, 4, 5, 7, 8, 16, 31, 33, 64, 70];
const COLS: [usize; 4] = [32, 96, 576, 1536];

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
    if len >= 2 * BLOCK && rng.random_ratio(1, 3) {
        x[BLOCK..2 * BLOCK].fill(0.0);
    }
    x
}

fn matrix(rng: &mut ChaCha8Rng, dtype: GgmlDType, rows: usize, cols: usize) -> (QuantMatrix, QTensor) {
    let weights: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-0.5f32..0.5) + 0.05).collect();
    let tensor = Tensor::from_vec(weights, (rows, cols), &Device::Cpu).unwrap();
    let qtensor = QTensor::quantize(&tensor, dtype).unwrap();
    let matrix = QuantMatrix::from_qtensor(&qtensor).unwrap().expect("a native format");
    (matrix, qtensor)
}

fn quantized(isa: Isa, format: ActivationFormat, x: &[f32], cols: usize) -> Vec<Q8Block> {
    let mut acts = vec![Q8Block::ZERO; x.len() / BLOCK];
    for (x, acts) in x.chunks_exact(cols).zip(acts.chunks_exact_mut(cols / BLOCK)) {
        isa.quantize_row(x, acts, format == ActivationFormat::Q8_1);
    }
    acts
}

#[test]
fn quantization_rounds_as_ggml_on_x86() {
    // amax = 127 makes the inverse scale 1, so the values below are exactly the rounded ones.
    let mut x = vec![0.0f32; BLOCK];
    x[0] = 127.0;
    x[1..7].copy_from_slice(&[2.5, 3.5, -2.5, -3.5, 0.5, -0.49]);
    for isa in Isa::all() {
        let mut block = [Q8Block::ZERO];
        isa.quantize_row(&x, &mut block, true);
        assert_eq!(block[0].qs[..7], [127, 2, 4, -2, -4, 0, 0], "{isa:?} rounds half to even");
        assert_eq!(block[0].d, 1.0);
        assert_eq!(block[0].s, 127.0);
    }
}

#[test]
fn q8_1_sum_is_rounded_once_from_f32() {
    // d = 1.3 / 127 is not an f16; s must be f16(d * sum) with d unrounded, which differs
    // from candle's f16(sum) * d, the rounding this module exists to avoid.
    let mut x = vec![0.0f32; BLOCK];
    x[0] = 1.3;
    x[1] = 1.0;
    x[2] = 0.7;
    let mut block = [Q8Block::ZERO];
    quantize_row(&x, &mut block, true);
    let d = 1.3f32 / 127.0;
    let sum: i32 = block[0].qs.iter().map(|&q| q as i32).sum();
    assert_eq!(sum, 127 + 98 + 68);
    assert_eq!(block[0].s, half::f16::from_f32(d * sum as f32).to_f32());
    assert_eq!(block[0].d, half::f16::from_f32(d).to_f32());
}

#[test]
fn fifth_bits_top_up_the_nibbles_in_value_order() {
    // Bit j of the little-endian `qh` belongs to value j: bits 0, 15, 16 and 31 here.
    let qh = [0x01, 0x80, 0x01, 0x80];
    let qs: Vec<u8> = (0..16).map(|j| (j as u8) | (15 - j as u8) << 4).collect();
    let q = five_bit_quants(&qh, &qs);
    for j in 0..16 {
        assert_eq!(q[j] & 0x0F, j as u8, "low nibble of byte {j} is value {j}");
        assert_eq!(q[j + 16] & 0x0F, 15 - j as u8, "high nibble of byte {j} is value {}", j + 16);
    }
    let high: Vec<usize> = (0..BLOCK).filter(|&j| q[j] & 0x10 != 0).collect();
    assert_eq!(high, [0, 15, 16, 31]);
}

#[test]
fn every_isa_quantizes_like_the_portable_code() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for cols in COLS {
        for with_sum in [false, true] {
            let x = activations(&mut rng, cols);
            let mut expected = vec![Q8Block::ZERO; cols / BLOCK];
            quantize_row(&x, &mut expected, with_sum);
            for isa in Isa::all() {
                let mut got = vec![Q8Block::ZERO; cols / BLOCK];
                isa.quantize_row(&x, &mut got, with_sum);
                assert_eq!(got, expected, "{isa:?}, {cols} values");
            }
        }
    }
}

#[test]
fn dequantized_blocks_match_candle() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    for (dtype, _) in FORMATS {
        let (matrix, qtensor) = matrix(&mut rng, dtype, 3, 96);
        let ids = Tensor::new(&[2u32, 0, 2], &Device::Cpu).unwrap();
        let ours = matrix.embedding(&ids).unwrap();
        let candle = qtensor.embedding(&ids).unwrap();
        assert_eq!(ours.dims(), &[3, 96]);
        assert_eq!(ours.to_vec2::<f32>().unwrap(), candle.to_vec2::<f32>().unwrap(), "{dtype:?}");
    }
}

/// `Matrix::quantized` takes every format here natively, in this CPU's best layout.
#[test]
fn every_format_runs_natively() {
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for (dtype, format) in FORMATS {
        let (_, qtensor) = matrix(&mut rng, dtype, 8, 64);
        let Matrix::Native(native) = Matrix::quantized(qtensor).unwrap() else { panic!("{dtype:?} not native") };
        assert_eq!(native.format, MatrixFormat::Block32(format));
        let (rows, interleaved) = super::Layout::candidates(native.format);
        assert!(native.layout == rows || Some(native.layout) == interleaved, "{dtype:?}: {:?}", native.layout);
    }
}

#[test]
fn every_isa_multiplies_like_the_portable_code() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let isas = Isa::all();
    for (dtype, format) in FORMATS {
        for cols in COLS {
            for rows in ROWS {
                let (matrix, _) = matrix(&mut rng, dtype, rows, cols);
                for m in 1..=9 {
                    let x = activations(&mut rng, m * cols);
                    let acts = quantized(Isa::Portable, format.activation(), &x, cols);
                    let blocks = cols / BLOCK;
                    let weights = matrix.row_bytes(0..rows);
                    let mut expected = vec![0.0; rows * m];
                    Isa::Portable.product_rows(format, weights, blocks, &acts, m, &mut expected);
                    for &isa in &isas {
                        let mut got = vec![0.0; rows * m];
                        isa.product_rows(format, weights, blocks, &acts, m, &mut got);
                        assert!(
                            got.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{isa:?} differs from the portable kernel: {format:?} {rows}x{cols}, {m} rows"
                        );
                    }
                }
            }
        }
    }
}

/// Rows interleaved for the AVX-512 kernels against the portable kernels on the file's
/// layout, bit for bit: shapes with tails of rows, decoding and prefill widths, activation
/// tiles, several threads; and their embeddings.
#[test]
fn interleaved_rows_multiply_like_the_portable_code() {
    #[cfg(target_arch = "x86_64")]
    {
        let Some(vnni) = super::kquant_x86::Avx512Vnni::detect() else {
            eprintln!("SKIPPED: this CPU lacks AVX-512 VNNI, so no matrix is interleaved here");
            return;
        };
        let layout = super::Layout::Interleaved(vnni);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // A row of 16384 values makes activation tiles of 24 rows: 30 rows cross one.
        let shapes = COLS.iter().flat_map(|&cols| ROWS.map(|rows| (rows, cols, 1..=9))).chain([(9, 16384, 29..=30)]);
        let interleaved_formats =
            FORMATS.into_iter().filter(|&(_, format)| super::interleave::interleaves(MatrixFormat::Block32(format)));
        for (dtype, format) in interleaved_formats {
            for (rows, cols, ms) in shapes.clone() {
                let (matrix, _) = matrix(&mut rng, dtype, rows, cols);
                let interleaved = matrix.clone().with_layout(layout);
                for m in ms {
                    let x = activations(&mut rng, m * cols);
                    let expected = product_with(Isa::Portable, &matrix, &x, m, 1);
                    for threads in [1, 3] {
                        let got = product_with(Isa::detect(), &interleaved, &x, m, threads);
                        assert!(
                            got.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()),
                            "interleaved {format:?} {rows}x{cols}, {m} rows, {threads} threads"
                        );
                    }
                }
                let ids: Vec<u32> = (0..rows as u32).rev().collect();
                let (mut expected, mut got) = (Vec::new(), Vec::new());
                matrix.embedding_into(&ids, &mut expected).unwrap();
                interleaved.embedding_into(&ids, &mut got).unwrap();
                assert_eq!(got, expected, "embedding of interleaved {format:?} {rows}x{cols}");
            }
        }
    }
}

/// The portable kernels against f64 sums of products of candle's dequantized weights and
/// the dequantized activations.
#[test]
fn products_match_dequantized_arithmetic() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for (dtype, format) in FORMATS {
        for cols in COLS {
            for rows in [1, 5, 17] {
                let (matrix, qtensor) = matrix(&mut rng, dtype, rows, cols);
                let weights = qtensor.dequantize(&Device::Cpu).unwrap().to_vec2::<f32>().unwrap();
                let m = 3;
                let x = activations(&mut rng, m * cols);
                let acts = quantized(Isa::Portable, format.activation(), &x, cols);
                let got = matrix.product(&x, m, 1);
                for (i, acts) in acts.chunks_exact(cols / BLOCK).enumerate() {
                    for (r, w) in weights.iter().enumerate() {
                        let (mut sum, mut magnitude, mut offset_error) = (0.0f64, 0.0f64, 0.0f64);
                        for (b, a) in acts.iter().enumerate() {
                            for (j, &q) in a.qs.iter().enumerate() {
                                let product = w[b * BLOCK + j] as f64 * (q as f64 * a.d as f64);
                                sum += product;
                                magnitude += product.abs();
                            }
                            if format.has_offset() {
                                // Q8_1's `s` is rounded to f16: its product with `m` is off
                                // by up to half an f16 ulp of it.
                                let block = b * format.block_bytes();
                                let m_w = super::format::f16_at(matrix.row_bytes(r..r + 1), block + 2);
                                offset_error += (m_w as f64 * a.s as f64).abs() / 1024.0;
                            }
                        }
                        let ours = got[i * rows + r] as f64;
                        let tolerance = 1e-4 * magnitude + offset_error + 1e-6;
                        assert!(
                            (ours - sum).abs() <= tolerance,
                            "{format:?} {rows}x{cols} row {r}, input {i}: {ours} vs {sum} (tolerance {tolerance})"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn thread_count_does_not_change_results() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    for (dtype, _) in FORMATS {
        let (matrix, _) = matrix(&mut rng, dtype, 1000, 576);
        for m in [1, 6] {
            let x = activations(&mut rng, m * 576);
            let one = matrix.product(&x, m, 1);
            for threads in [2, 3, 8] {
                assert_eq!(matrix.product(&x, m, threads), one, "{dtype:?}, {m} rows, {threads} threads");
            }
        }
    }
}

#[test]
fn forward_keeps_leading_dimensions() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (matrix, _) = matrix(&mut rng, GgmlDType::Q4_1, 40, 96);
    let x = activations(&mut rng, 2 * 3 * 96);
    let expected = matrix.product(&x, 6, 1);
    let input = Tensor::from_vec(x, (2, 3, 96), &Device::Cpu).unwrap();
    let output = matrix.forward(&input).unwrap();
    assert_eq!(output.dims(), &[2, 3, 40]);
    assert_eq!(output.flatten_all().unwrap().to_vec1::<f32>().unwrap(), expected);
    // A non-contiguous input is multiplied as its contiguous copy.
    let transposed = input.transpose(0, 1).unwrap();
    let output = matrix.forward(&transposed).unwrap();
    let expected = matrix.forward(&transposed.contiguous().unwrap()).unwrap();
    assert_eq!(output.to_vec3::<f32>().unwrap(), expected.to_vec3::<f32>().unwrap());
    assert!(matrix.forward(&Tensor::zeros((2, 95), candle_core::DType::F32, &Device::Cpu).unwrap()).is_err());
}

/// The default model's products against llama.cpp's own, bit for bit: its intermediate
/// tensors for one prompt (see `about` in the fixture), fed through the same weights here.
#[test]
fn products_match_llama_cpp_bit_for_bit() {
    use candle_core::quantized::gguf_file;

    let fixture: serde_json::Value = serde_json::from_str(include_str!("llama_cpp_products.json")).unwrap();
    let path = default_model_path();
    let mut file = std::io::BufReader::new(std::fs::File::open(&path).unwrap_or_else(|e| {
        panic!("the default model is not at {} ({e}): run `hearth pull` first", path.display())
    }));
    let content = gguf_file::Content::read(&mut file).unwrap();
    let floats = |value: &serde_json::Value| -> Vec<f32> {
        value.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect()
    };
    for product in fixture["products"].as_array().unwrap() {
        let name = product["weight"].as_str().unwrap();
        let qtensor = content.tensor(&mut file, name, &Device::Cpu).unwrap();
        let rows = QuantMatrix::from_qtensor(&qtensor).unwrap().expect("a native format");
        let x = floats(&product["inputs"]);
        let m = product["rows_of_input"].as_u64().unwrap() as usize;
        let stride = product["output_stride"].as_u64().unwrap() as usize;
        let expected = floats(&product["outputs"]);
        // Each instruction set on the file's layout, and this CPU's best layout.
        let best = rows.clone().with_best_layout();
        for (isa, matrix) in Isa::all().into_iter().map(|isa| (isa, &rows)).chain([(Isa::detect(), &best)]) {
            let layout = matrix.layout;
            for threads in [1, 2] {
                let got: Vec<f32> = product_with(isa, matrix, &x, m, threads).into_iter().step_by(stride).collect();
                assert_eq!(got.len(), expected.len(), "{name}");
                let differing = got.iter().zip(&expected).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
                assert_eq!(
                    differing, 0,
                    "{name}, {isa:?}, {layout:?}, {threads} threads: {differing} outputs differ from llama.cpp's"
                );
            }
        }
    }
}

fn product_with(isa: Isa, matrix: &QuantMatrix, x: &[f32], m: usize, threads: usize) -> Vec<f32> {
    super::product::multiply(matrix, x, m, threads, isa)
}

/// Where `hearth pull` puts the default model (as the integration tests find it).
fn default_model_path() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(path) = std::env::var_os("HEARTH_DEFAULT_MODEL") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("HEARTH_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("hearth")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/hearth")))
        .expect("HOME is set");
    cache.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

// MXFP4, which candle cannot quantize: matrices from this crate's quantizer.

fn mxfp4_matrix(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> (QuantMatrix, Vec<u8>) {
    let weights: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-0.5f32..0.5) + 0.05).collect();
    let blocks = super::quantize_mxfp4(&weights);
    let format = MatrixFormat::Block32(WeightFormat::Mxfp4);
    (QuantMatrix::from_blocks(format, &blocks, rows, cols).unwrap(), blocks)
}

#[test]
fn mxfp4_quantizes_and_dequantizes_as_ggml() {
    // amax 3 gives e = floor(log2 3) - 2 + 127 = 126: a step of 2^-2 between the doubled
    // values, so 3.0 is 12 * 0.25, 0.3 rounds to 1 * 0.25 and -0.4 to -2 * 0.25 (0.5 is
    // farther); ties go to the first of the sixteen (0.125 to 0).
    let mut x = vec![0.0f32; BLOCK];
    x[..5].copy_from_slice(&[3.0, 0.3, -0.4, 0.125, -1.4]);
    x[16] = 1.0;
    let blocks = super::quantize_mxfp4(&x);
    assert_eq!(blocks.len(), 17);
    assert_eq!(blocks[0], 126);
    let values = super::dequantize_mxfp4(&blocks);
    assert_eq!(values[..5], [3.0, 0.25, -0.5, 0.0, -1.5]);
    assert_eq!(values[16], 1.0, "the high nibble of byte 0 is value 16");
    assert!(values[5..16].iter().chain(&values[17..]).all(|&v| v == 0.0));
    // An all-zero block has exponent 0 (the smallest scale) and zeros.
    assert_eq!(super::quantize_mxfp4(&[0.0; BLOCK])[0], 0);
    assert_eq!(super::format::e8m0_half(0), 2f32.powi(-128));
    assert_eq!(super::format::e8m0_half(1), 2f32.powi(-127));
    assert_eq!(super::format::e8m0_half(130), 4.0);
}

#[test]
fn every_isa_multiplies_mxfp4_like_the_portable_code() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let format = WeightFormat::Mxfp4;
    for cols in COLS {
        for rows in ROWS {
            let (matrix, _) = mxfp4_matrix(&mut rng, rows, cols);
            for m in 1..=9 {
                let x = activations(&mut rng, m * cols);
                let acts = quantized(Isa::Portable, format.activation(), &x, cols);
                let weights = matrix.row_bytes(0..rows);
                let mut expected = vec![0.0; rows * m];
                Isa::Portable.product_rows(format, weights, cols / BLOCK, &acts, m, &mut expected);
                for isa in Isa::all() {
                    let mut got = vec![0.0; rows * m];
                    isa.product_rows(format, weights, cols / BLOCK, &acts, m, &mut got);
                    assert!(
                        got.iter().zip(&expected).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{isa:?} differs from the portable kernel: MXFP4 {rows}x{cols}, {m} rows"
                    );
                }
            }
        }
    }
}

/// The portable MXFP4 kernel against f64 sums of the dequantized weights times the
/// dequantized activations, and threads changing nothing.
#[test]
fn mxfp4_products_match_dequantized_arithmetic() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for cols in COLS {
        for rows in [1, 5, 17] {
            let (matrix, blocks) = mxfp4_matrix(&mut rng, rows, cols);
            let weights = super::dequantize_mxfp4(&blocks);
            let m = 3;
            let x = activations(&mut rng, m * cols);
            let acts = quantized(Isa::Portable, ActivationFormat::Q8_0, &x, cols);
            let got = matrix.product(&x, m, 1);
            for (i, acts) in acts.chunks_exact(cols / BLOCK).enumerate() {
                for (r, w) in weights.chunks_exact(cols).enumerate() {
                    let (mut sum, mut magnitude) = (0.0f64, 0.0f64);
                    for (b, a) in acts.iter().enumerate() {
                        for (j, &q) in a.qs.iter().enumerate() {
                            let product = w[b * BLOCK + j] as f64 * (q as f64 * a.d as f64);
                            sum += product;
                            magnitude += product.abs();
                        }
                    }
                    let ours = got[i * rows + r] as f64;
                    assert!((ours - sum).abs() <= 1e-5 * magnitude + 1e-6, "{rows}x{cols} row {r}: {ours} vs {sum}");
                }
            }
        }
    }
    let (matrix, _) = mxfp4_matrix(&mut rng, 1000, 576);
    let x = activations(&mut rng, 6 * 576);
    let one = matrix.product(&x, 6, 1);
    assert_eq!(matrix.product(&x, 6, 3), one, "three threads");
}

/// candle's path expands the blocks to exactly the values the native path reads, and
/// multiplies by them.
#[test]
fn mxfp4_on_candles_path_dequantizes_to_the_bit() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (rows, cols) = (7, 96);
    let (native, blocks) = mxfp4_matrix(&mut rng, rows, cols);
    let device = super::mxfp4::DeviceMxfp4::new(&blocks, rows, cols, &Device::Cpu).unwrap();
    let dense = device.dequantize(candle_core::DType::F32).unwrap();
    assert_eq!(dense.flatten_all().unwrap().to_vec1::<f32>().unwrap(), super::dequantize_mxfp4(&blocks));
    let ids: Vec<u32> = vec![6, 0, 3];
    let mut rows_native = Vec::new();
    native.embedding_into(&ids, &mut rows_native).unwrap();
    let rows_device = device.embedding(&Tensor::new(ids.as_slice(), &Device::Cpu).unwrap()).unwrap();
    assert_eq!(rows_device.flatten_all().unwrap().to_vec1::<f32>().unwrap(), rows_native);
    let x = Tensor::from_vec(activations(&mut rng, 2 * cols), (1, 2, cols), &Device::Cpu).unwrap();
    let y = device.forward(&x).unwrap();
    assert_eq!(y.dims(), &[1, 2, rows]);
    let expected = x.reshape((2, cols)).unwrap().matmul(&dense.t().unwrap()).unwrap();
    let diff = (y.reshape((2, rows)).unwrap() - expected).unwrap().abs().unwrap().max_all().unwrap();
    assert!(diff.to_scalar::<f32>().unwrap() < 1e-5);
    assert!(super::mxfp4::DeviceMxfp4::new(&blocks[..blocks.len() - 1], rows, cols, &Device::Cpu).is_err());
}

/// Where a K-quant may be kept in two layouts, the first large matrix of it settles which,
/// by timing both, and later matrices of the format follow that choice; the 32-value
/// formats stay interleaved where they can be.
#[test]
fn the_measured_layout_is_one_of_the_candidates_and_kept() {
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let (q8, _) = matrix(&mut rng, GgmlDType::Q8_0, 512, 1024);
    let (_, q8_interleaved) = super::Layout::candidates(q8.format);
    assert_eq!(q8.with_best_layout().layout, q8_interleaved.unwrap_or(super::Layout::Rows));
    let (large, _) = matrix(&mut rng, GgmlDType::Q4K, 512, 1024);
    let (rows, interleaved) = super::Layout::candidates(large.format);
    let chosen = large.clone().with_best_layout().layout;
    assert!(chosen == rows || Some(chosen) == interleaved, "{chosen:?}");
    let (other, _) = matrix(&mut rng, GgmlDType::Q4K, 512, 1024);
    assert_eq!(other.with_best_layout().layout, chosen, "the choice is kept");
    let (small, _) = matrix(&mut rng, GgmlDType::Q4K, 8, 256);
    assert_eq!(small.with_best_layout().layout, chosen, "small matrices follow it too");
}
