//! The GGML block formats the kernels read, byte for byte as GGUF stores them.
//!
//! Every format packs 32 consecutive values of a row into one block that starts with an
//! f16 scale. Blocks are read from the file's bytes unconverted: at most rearranged, four
//! rows interleaved (`interleave.rs`), so a matrix takes exactly the memory its file says.

use candle_core::quantized::GgmlDType;
use half::f16;

use super::kquant_format::{KQuant, QK_K};

/// Values per block, in every format here and in the activations' formats.
pub(crate) const BLOCK: usize = 32;

/// The block format of a matrix the kernels multiply: one of 32 values, or a K-quant one
/// of 256 (`kquant_format.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MatrixFormat {
    Block32(WeightFormat),
    K(KQuant),
    /// Plain BF16 values, one "block" each (`bf16.rs`); activations are rounded to BF16.
    Bf16,
}

impl MatrixFormat {
    pub(crate) fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4K => Some(Self::K(KQuant::Q4_K)),
            GgmlDType::Q5K => Some(Self::K(KQuant::Q5_K)),
            GgmlDType::Q6K => Some(Self::K(KQuant::Q6_K)),
            GgmlDType::Q2K => Some(Self::K(KQuant::Q2_K)),
            GgmlDType::Q3K => Some(Self::K(KQuant::Q3_K)),
            GgmlDType::BF16 => Some(Self::Bf16),
            dtype => WeightFormat::from_ggml(dtype).map(Self::Block32),
        }
    }

    /// Values per block.
    pub(crate) const fn block_values(self) -> usize {
        match self {
            Self::Block32(_) => BLOCK,
            Self::K(_) => QK_K,
            Self::Bf16 => 1,
        }
    }

    /// Bytes per block.
    pub(crate) const fn block_bytes(self) -> usize {
        match self {
            Self::Block32(format) => format.block_bytes(),
            Self::K(kind) => kind.block_bytes(),
            Self::Bf16 => 2,
        }
    }

    /// Writes the `block_values()` values of `block` to `out`, as ggml's `dequantize_row_*`.
    pub(crate) fn dequantize_block(self, block: &[u8], out: &mut [f32]) {
        match self {
            Self::Block32(format) => format.dequantize_block(block, out),
            Self::K(kind) => kind.dequantize_block(block, out),
            Self::Bf16 => out[0] = super::bf16::to_f32(super::bf16::at(block, 0)),
        }
    }
}

/// A weight format of 32-value blocks the kernels multiply natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WeightFormat {
    /// `d: f16, qs: [u8; 16]`: value = d * (nibble - 8).
    Q4_0,
    /// `d: f16, m: f16, qs: [u8; 16]`: value = d * nibble + m.
    Q4_1,
    /// `d: f16, qh: [u8; 4], qs: [u8; 16]`: value = d * (q - 16), where q is a nibble of
    /// `qs` topped with a fifth bit from `qh` (bit `j` of its 32 for value `j`).
    Q5_0,
    /// `d: f16, m: f16, qh: [u8; 4], qs: [u8; 16]`: value = d * q + m, q as in Q5_0.
    Q5_1,
    /// `d: f16, qs: [i8; 32]`: value = d * q.
    Q8_0,
    /// `e: u8, qs: [u8; 16]`: value = 2^(e - 128) * MXFP4_VALUES[nibble], low nibbles
    /// first as in Q4_0. (The values are twice E2M1's, and the scale half of E8M0's, as
    /// ggml stores them, so that they multiply as integers.) Not in candle: see `gguf.rs`.
    Mxfp4,
}

/// E2M1's sixteen values, doubled: what MXFP4's nibbles stand for (ggml's `kvalues_mxfp4`).
pub(crate) const MXFP4_VALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// Half of the E8M0 scale `e`, 2^(e - 128), as ggml's `ggml_e8m0_to_fp32_half` computes it
/// (subnormal below 2).
pub(crate) fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 { 0x0020_0000u32 << e } else { ((e - 1) as u32) << 23 };
    f32::from_bits(bits)
}

/// How activations are quantized for a product: as llama.cpp's `vec_dot_type` of the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActivationFormat {
    /// Scale and 32 signed bytes.
    Q8_0,
    /// Q8_0 plus `s = d * sum(qs)`, which folds Q4_1's and Q5_1's offset `m` into one
    /// product per block.
    Q8_1,
}

impl WeightFormat {
    pub(crate) fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        match dtype {
            GgmlDType::Q4_0 => Some(Self::Q4_0),
            GgmlDType::Q4_1 => Some(Self::Q4_1),
            GgmlDType::Q5_0 => Some(Self::Q5_0),
            GgmlDType::Q5_1 => Some(Self::Q5_1),
            GgmlDType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes of one block of 32 values.
    pub(crate) const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 2 + 16,
            Self::Q4_1 => 2 + 2 + 16,
            Self::Q5_0 => 2 + 4 + 16,
            Self::Q5_1 => 2 + 2 + 4 + 16,
            Self::Q8_0 => 2 + 32,
            Self::Mxfp4 => 1 + 16,
        }
    }

    pub(crate) const fn activation(self) -> ActivationFormat {
        match self {
            Self::Q4_1 | Self::Q5_1 => ActivationFormat::Q8_1,
            Self::Q4_0 | Self::Q5_0 | Self::Q8_0 | Self::Mxfp4 => ActivationFormat::Q8_0,
        }
    }

    /// Whether blocks carry an f16 offset `m` (after the scale), added as `m * s` of Q8_1.
    pub(crate) const fn has_offset(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q5_1)
    }

    /// Writes the 32 values of `block` to `out`, as ggml's `dequantize_row_*` does.
    pub(crate) fn dequantize_block(self, block: &[u8], out: &mut [f32]) {
        if self == Self::Mxfp4 {
            let d = e8m0_half(block[0]);
            for (j, &byte) in block[1..17].iter().enumerate() {
                out[j] = MXFP4_VALUES[(byte & 0x0F) as usize] as f32 * d;
                out[j + 16] = MXFP4_VALUES[(byte >> 4) as usize] as f32 * d;
            }
            return;
        }
        let d = f16_at(block, 0);
        match self {
            Self::Q4_0 => {
                for (j, &byte) in block[2..18].iter().enumerate() {
                    out[j] = ((byte & 0x0F) as i32 - 8) as f32 * d;
                    out[j + 16] = ((byte >> 4) as i32 - 8) as f32 * d;
                }
            }
            Self::Q4_1 => {
                let m = f16_at(block, 2);
                for (j, &byte) in block[4..20].iter().enumerate() {
                    out[j] = (byte & 0x0F) as f32 * d + m;
                    out[j + 16] = (byte >> 4) as f32 * d + m;
                }
            }
            Self::Q5_0 => {
                for (j, &q) in five_bit_quants(&block[2..6], &block[6..22]).iter().enumerate() {
                    out[j] = (q as i32 - 16) as f32 * d;
                }
            }
            Self::Q5_1 => {
                let m = f16_at(block, 2);
                for (j, &q) in five_bit_quants(&block[4..8], &block[8..24]).iter().enumerate() {
                    out[j] = q as f32 * d + m;
                }
            }
            Self::Q8_0 => {
                for (j, &q) in block[2..34].iter().enumerate() {
                    out[j] = q as i8 as f32 * d;
                }
            }
            Self::Mxfp4 => unreachable!("dequantized above"),
        }
    }
}

/// The 32 unsigned 5-bit quants of a Q5_0 or Q5_1 block, in value order: value `j` is
/// nibble `j % 16` of `qs` (low nibbles first) plus 16 times bit `j` of the little-endian
/// `qh`.
pub(crate) fn five_bit_quants(qh: &[u8], qs: &[u8]) -> [u8; BLOCK] {
    let high = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    let mut q = [0u8; BLOCK];
    for (j, &byte) in qs[..BLOCK / 2].iter().enumerate() {
        q[j] = byte & 0x0F;
        q[j + BLOCK / 2] = byte >> 4;
    }
    for (j, q) in q.iter_mut().enumerate() {
        *q |= (((high >> j) & 1) << 4) as u8;
    }
    q
}

/// The little-endian f16 at `offset` of `bytes`, widened (exactly) to f32.
pub(crate) fn f16_at(bytes: &[u8], offset: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[offset], bytes[offset + 1]])).to_f32()
}
