//! GGML's K-quant weight formats, byte for byte as GGUF stores them.
//!
//! A K-quant block ("super-block" in ggml) holds 256 consecutive values of a row, split
//! into sub-blocks of 32 (Q4_K, Q5_K) or 16 (Q2_K, Q3_K, Q6_K) values that each have a
//! small integer scale; one or two f16 factors scale the whole block. As with the 32-value formats,
//! blocks are read in place from the file's bytes.

use super::format::f16_at;

/// Values per K-quant block, ggml's `QK_K`.
pub(crate) const QK_K: usize = 256;

/// A K-quant weight format the kernels multiply natively.
#[allow(non_camel_case_types)] // ggml's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KQuant {
    /// `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`: eight sub-blocks of 32, each
    /// with a 6-bit scale `sc` and min `m`: value = d * sc * nibble - dmin * m.
    Q4_K,
    /// Q4_K plus `qh: [u8; 32]` (before `qs`): a fifth bit per value.
    Q5_K,
    /// `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`: sixteen sub-blocks of 16,
    /// each with a signed 8-bit scale `sc`: value = d * sc * (q - 32), q of 6 bits.
    Q6_K,
    /// `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`: sixteen sub-blocks of 16, each
    /// with a 4-bit scale `sc` (low nibble) and min `m` (high nibble): value = d * sc * q -
    /// dmin * m, q of 2 bits.
    Q2_K,
    /// `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`: sixteen sub-blocks of 16,
    /// each with a 6-bit scale `sc`: value = d * (sc - 32) * q, q = the 2 bits of `qs`
    /// minus 4 where `hmask` has the value's bit clear.
    Q3_K,
}

/// Byte offsets within a block.
pub(crate) const Q4_K_QS: usize = 16;
pub(crate) const Q5_K_QH: usize = 16;
pub(crate) const Q5_K_QS: usize = 48;
pub(crate) const Q6_K_QH: usize = 128;
pub(crate) const Q6_K_SCALES: usize = 192;
pub(crate) const Q6_K_D: usize = 208;
pub(crate) const Q2_K_QS: usize = 16;
pub(crate) const Q2_K_D: usize = 80;
pub(crate) const Q3_K_QS: usize = 32;
pub(crate) const Q3_K_SCALES: usize = 96;
pub(crate) const Q3_K_D: usize = 108;

impl KQuant {
    /// Bytes of one block of 256 values.
    pub(crate) const fn block_bytes(self) -> usize {
        match self {
            Self::Q4_K => 2 + 2 + 12 + 128,
            Self::Q5_K => 2 + 2 + 12 + 32 + 128,
            Self::Q6_K => 128 + 64 + 16 + 2,
            Self::Q2_K => 16 + 64 + 2 + 2,
            Self::Q3_K => 32 + 64 + 12 + 2,
        }
    }

    /// Writes the 256 values of `block` to `out`, as ggml's `dequantize_row_*` does (the
    /// same f32 operations in the same order, so the same bits).
    pub(crate) fn dequantize_block(self, block: &[u8], out: &mut [f32]) {
        match self {
            Self::Q4_K | Self::Q5_K => {
                let d = f16_at(block, 0);
                let min = f16_at(block, 2);
                let (scales, mins) = scales_and_mins(&block[4..16]);
                let q = quants_4_5(self, block);
                for (s, out) in out.chunks_exact_mut(32).enumerate() {
                    let scale = d * scales[s] as f32;
                    let offset = min * mins[s] as f32;
                    for (out, &q) in out.iter_mut().zip(&q[32 * s..32 * (s + 1)]) {
                        *out = scale * q as f32 - offset;
                    }
                }
            }
            Self::Q6_K => {
                let d = f16_at(block, Q6_K_D);
                let q = quants_6(block);
                for (s, out) in out.chunks_exact_mut(16).enumerate() {
                    let scale = d * block[Q6_K_SCALES + s] as i8 as f32;
                    for (out, &q) in out.iter_mut().zip(&q[16 * s..16 * (s + 1)]) {
                        *out = scale * q as f32;
                    }
                }
            }
            Self::Q2_K => {
                let d = f16_at(block, Q2_K_D);
                let min = f16_at(block, Q2_K_D + 2);
                let q = quants_2(block);
                for (s, out) in out.chunks_exact_mut(16).enumerate() {
                    let scale = d * (block[s] & 0x0F) as f32;
                    let offset = min * (block[s] >> 4) as f32;
                    for (out, &q) in out.iter_mut().zip(&q[16 * s..16 * (s + 1)]) {
                        *out = scale * q as f32 - offset;
                    }
                }
            }
            Self::Q3_K => {
                let d = f16_at(block, Q3_K_D);
                let scales = scales_3(&block[Q3_K_SCALES..Q3_K_SCALES + 12]);
                let q = quants_3(block);
                for (s, out) in out.chunks_exact_mut(16).enumerate() {
                    let scale = d * scales[s] as f32;
                    for (out, &q) in out.iter_mut().zip(&q[16 * s..16 * (s + 1)]) {
                        *out = scale * q as f32;
                    }
                }
            }
        }
    }
}

/// The 256 unsigned quants of a Q2_K block, in value order: each 32 bytes of `qs` hold
/// 128 values, four pairs of bits per byte, the lowest pair first (values `32k..32k + 32` of
/// the 128 are the `k`th pairs of the 32 bytes).
pub(crate) fn quants_2(block: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for (half, bytes) in block[Q2_K_QS..Q2_K_QS + 64].chunks_exact(32).enumerate() {
        for k in 0..4 {
            for (l, &byte) in bytes.iter().enumerate() {
                q[128 * half + 32 * k + l] = (byte >> (2 * k)) & 3;
            }
        }
    }
    q
}

/// The 256 signed quants of a Q3_K block, in value order: the low two bits as Q2_K packs
/// them, minus 4 where bit `4 * half + k` of `hmask[l]` is clear, for value `l` of the
/// `k`th 32 of each half of 128.
pub(crate) fn quants_3(block: &[u8]) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    let hmask = &block[..32];
    for (half, bytes) in block[Q3_K_QS..Q3_K_QS + 64].chunks_exact(32).enumerate() {
        for k in 0..4 {
            let bit = 4 * half + k;
            for (l, (&byte, &h)) in bytes.iter().zip(hmask).enumerate() {
                let low = ((byte >> (2 * k)) & 3) as i8;
                q[128 * half + 32 * k + l] = if (h >> bit) & 1 == 1 { low } else { low - 4 };
            }
        }
    }
    q
}

/// Q3_K's sixteen 6-bit scales, unpacked from its 12 bytes and less 32, as ggml does: the
/// low nibbles of bytes 0-7 for scales 0-7 and their high nibbles for 8-15, topped up
/// with two bits each from bytes 8-11 (scale `s` from bits `2 * (s / 4)` of byte `8 + s %
/// 4`).
pub(crate) fn scales_3(packed: &[u8]) -> [i8; 16] {
    let mut scales = [0i8; 16];
    for (s, scale) in scales.iter_mut().enumerate() {
        let low = if s < 8 { packed[s] & 0x0F } else { packed[s - 8] >> 4 };
        let high = (packed[8 + s % 4] >> (2 * (s / 4))) & 3;
        *scale = (low | (high << 4)) as i8 - 32;
    }
    scales
}

/// The eight 6-bit scales and eight 6-bit mins packed in Q4_K's and Q5_K's 12 bytes, as
/// ggml's `get_scale_min_k4` unpacks them: sub-blocks 0-3 in the low six bits of bytes
/// 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 in the nibbles of bytes 8-11, topped up
/// with the spare high two bits of bytes 0-7.
pub(crate) fn scales_and_mins(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let q = &packed[..12];
    let mut scales = [0u8; 8];
    let mut mins = [0u8; 8];
    for j in 0..4 {
        scales[j] = q[j] & 63;
        mins[j] = q[j + 4] & 63;
    }
    for j in 4..8 {
        scales[j] = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        mins[j] = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
    (scales, mins)
}

/// The 256 unsigned quants of a Q4_K or Q5_K block, in value order: each 32 bytes of
/// `qs` hold two sub-blocks, the low nibbles first; Q5_K's `qh` gives sub-block `s` its
/// fifth bit in bit `s` of the byte of each value's position in the sub-block.
pub(crate) fn quants_4_5(kind: KQuant, block: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    let qs = match kind {
        KQuant::Q5_K => &block[Q5_K_QS..Q5_K_QS + 128],
        _ => &block[Q4_K_QS..Q4_K_QS + 128],
    };
    for (j, bytes) in qs.chunks_exact(32).enumerate() {
        for (l, &byte) in bytes.iter().enumerate() {
            q[64 * j + l] = byte & 0x0F;
            q[64 * j + 32 + l] = byte >> 4;
        }
    }
    if kind == KQuant::Q5_K {
        let qh = &block[Q5_K_QH..Q5_K_QH + 32];
        for (s, q) in q.chunks_exact_mut(32).enumerate() {
            for (q, &h) in q.iter_mut().zip(qh) {
                *q += ((h >> s) & 1) << 4;
            }
        }
    }
    q
}

/// The 256 signed quants (q - 32) of a Q6_K block, in value order: each half of 128 values
/// takes 64 bytes of `ql` (low nibbles for values 0-63, high ones for 64-127) and 32 bytes
/// of `qh` (two bits per value, for values 0-31, 32-63, 64-95, 96-127 in turn).
pub(crate) fn quants_6(block: &[u8]) -> [i8; QK_K] {
    let mut q = [0i8; QK_K];
    for half in 0..2 {
        let ql = &block[64 * half..64 * half + 64];
        let qh = &block[Q6_K_QH + 32 * half..Q6_K_QH + 32 * half + 32];
        let q = &mut q[128 * half..128 * half + 128];
        for l in 0..32 {
            let h = qh[l];
            q[l] = ((ql[l] & 0x0F) | ((h & 3) << 4)) as i8 - 32;
            q[l + 32] = ((ql[l + 32] & 0x0F) | (((h >> 2) & 3) << 4)) as i8 - 32;
            q[l + 64] = ((ql[l] >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
            q[l + 96] = ((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    q
}

/// Q3_K's 12 bytes of scales unpacked four at a time, as ggml's SIMD code does: the same
/// values as [`scales_3`], but before 32 is taken off.
#[inline(always)]
pub(crate) fn scales_3_words(packed: &[u8]) -> [u32; 4] {
    const LOW_4: u32 = 0x0f0f_0f0f;
    const LOW_2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]);
    let (a, b, c) = (word(0), word(1), word(2));
    [
        (a & LOW_4) | ((c & LOW_2) << 4),
        (b & LOW_4) | (((c >> 2) & LOW_2) << 4),
        ((a >> 4) & LOW_4) | (((c >> 4) & LOW_2) << 4),
        ((b >> 4) & LOW_4) | (((c >> 6) & LOW_2) << 4),
    ]
}

/// Q4_K's and Q5_K's 12 bytes of scales and mins rearranged as ggml's SIMD code does: the
/// eight scales in bytes 0-7, the eight mins in bytes 8-15 (the same values as
/// [`scales_and_mins`], four at a time).
#[inline(always)]
pub(crate) fn scales_then_mins(packed: &[u8]) -> [u32; 4] {
    const LOW_6: u32 = 0x3f3f_3f3f;
    const LOW_4: u32 = 0x0f0f_0f0f;
    const LOW_2: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]);
    let (a, b, c) = (word(0), word(1), word(2));
    [a & LOW_6, (c & LOW_4) | (((a >> 6) & LOW_2) << 4), b & LOW_6, ((c >> 4) & LOW_4) | (((b >> 6) & LOW_2) << 4)]
}
