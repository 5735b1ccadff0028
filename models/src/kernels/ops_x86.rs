//! AVX2 versions of the hot loops of `ops.rs` and `attention.rs`, equal to them bit for bit.
//!
//! ggml's reference build uses 16-lane AVX-512 vectors; here a 16-lane vector is a pair of
//! 8-lane ones (`lo`, `hi`), and its horizontal sum `(lo + hi)` then halves, as
//! `_mm512_reduce_add_ps` adds. Every entry point takes the [`Avx2`] token, which exists
//! only on CPUs with AVX2, FMA and F16C; memory is reached through slices whose lengths
//! are checked before any pointer is formed.

use std::arch::x86_64::*;

use half::f16;

use super::attention::Sum;
use super::ops::{exp_constants::*, libm_silu, scalef, Rope};
use super::x86::Avx2;

/// `gate = silu(gate) * up` on rows of `row` values (see [`super::ops::silu_mul`]).
pub(crate) fn silu_mul(_: Avx2, gate: &mut [f32], up: &[f32], row: usize) {
    assert!(gate.len() == up.len() && row > 0 && gate.len().is_multiple_of(row));
    // SAFETY: the token proves the CPU features; lengths are checked above.
    unsafe { silu_mul_avx2(gate, up, row) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32], row: usize) {
    // ggml's vector loop takes 16 values at a time; the rest of a row goes through
    // `x / (1 + expf(-x))` with the C library's `expf`.
    let vector = row & !15;
    for (gate, up) in gate.chunks_exact_mut(row).zip(up.chunks_exact(row)) {
        let (g, tail) = gate.split_at_mut(vector);
        let (u, up_tail) = up.split_at(vector);
        for (g, u) in g.chunks_exact_mut(8).zip(u.chunks_exact(8)) {
            // SAFETY: both chunks hold 8 values.
            unsafe {
                let x = _mm256_loadu_ps(g.as_ptr());
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
                let s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
                _mm256_storeu_ps(g.as_mut_ptr(), _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr())));
            }
        }
        for (g, &u) in tail.iter_mut().zip(up_tail) {
            *g = libm_silu(*g) * u;
        }
    }
}

/// Eight lanes of [`super::ops::expf`].
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp8(x: __m256) -> __m256 {
    let c = splat;
    let shift = c(SHIFT);
    let z = _mm256_fmadd_ps(x, c(LOG2E), shift);
    let n = _mm256_sub_ps(z, shift);
    let b = _mm256_fnmadd_ps(n, c(LN2_HI), x);
    let b = _mm256_fnmadd_ps(n, c(LN2_LO), b);
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(_mm256_fmadd_ps(c(C5), b, c(C4)), u, _mm256_fmadd_ps(c(C3), b, c(C2))),
        u,
        _mm256_fmadd_ps(c(C1), b, _mm256_set1_ps(1.0)),
    );
    let normal = _mm256_and_ps(
        _mm256_cmp_ps::<_CMP_GE_OQ>(n, _mm256_set1_ps(-126.0)),
        _mm256_cmp_ps::<_CMP_LE_OQ>(n, _mm256_set1_ps(127.0)),
    );
    if _mm256_movemask_ps(normal) == 0xFF {
        // 2^n is a normal f32: one exact-power multiplication, rounded once.
        let power = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        return _mm256_mul_ps(j, _mm256_castsi256_ps(power));
    }
    let (mut js, mut ns) = ([0.0f32; 8], [0.0f32; 8]);
    // SAFETY: both arrays hold 8 values.
    unsafe {
        _mm256_storeu_ps(js.as_mut_ptr(), j);
        _mm256_storeu_ps(ns.as_mut_ptr(), n);
    }
    let out: [f32; 8] = std::array::from_fn(|i| {
        let n = ns[i];
        if n.abs() > 192.0 {
            if n <= 0.0 {
                0.0
            } else {
                f32::INFINITY
            }
        } else {
            scalef(js[i], n)
        }
    });
    // SAFETY: `out` holds 8 values.
    unsafe { _mm256_loadu_ps(out.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx")]
fn splat(bits: u32) -> __m256 {
    _mm256_set1_ps(f32::from_bits(bits))
}

/// The sum of the eight lanes of `v` as `(h0 + h2) + (h1 + h3)` with `h = lo4 + hi4`: with
/// `v = lo + hi` of a 16-lane vector, `_mm512_reduce_add_ps`.
#[inline]
#[target_feature(enable = "avx2")]
fn hsum8(v: __m256) -> f32 {
    let q = _mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v));
    let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)))
}

/// f32 rounded to f16 and back, eight at a time.
#[inline]
#[target_feature(enable = "avx2,f16c")]
fn round_f16_8(v: __m256) -> __m256 {
    _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
}

/// Eight f16 values at `p`, widened.
///
/// # Safety
/// `p` must point to 8 readable f16 values.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn load_f16(p: *const f16) -> __m256 {
    // SAFETY: the caller guarantees 16 readable bytes.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
}

/// [`super::ops::softmax_portable`] in AVX2.
pub(crate) fn softmax(_: Avx2, scores: &mut [f32], scale: f32, sink: Option<f32>, to_f16: bool) {
    // SAFETY: the token proves the CPU features.
    unsafe { softmax_avx2(scores, scale, sink, to_f16) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn softmax_avx2(scores: &mut [f32], scale: f32, sink: Option<f32>, to_f16: bool) {
    let mut max = f32::NEG_INFINITY;
    for s in scores.iter_mut() {
        *s *= scale;
        max = if max > *s { max } else { *s };
    }
    if let Some(sink) = sink {
        max = max.max(sink);
    }
    let maxv = _mm256_set1_ps(max);
    let mut sum = 0.0f64;
    for chunk in scores.chunks_mut(16) {
        // Positions past the row are masked: their exponentials are zeros.
        let mut lanes = [f32::NEG_INFINITY; 16];
        lanes[..chunk.len()].copy_from_slice(chunk);
        // SAFETY: `lanes` holds 16 values.
        unsafe {
            let lo = exp8(_mm256_sub_ps(_mm256_loadu_ps(lanes.as_ptr()), maxv));
            let hi = exp8(_mm256_sub_ps(_mm256_loadu_ps(lanes.as_ptr().add(8)), maxv));
            sum += hsum8(_mm256_add_ps(lo, hi)) as f64;
            _mm256_storeu_ps(lanes.as_mut_ptr(), lo);
            _mm256_storeu_ps(lanes.as_mut_ptr().add(8), hi);
        }
        chunk.copy_from_slice(&lanes[..chunk.len()]);
    }
    if let Some(sink) = sink {
        sum += (sink - max).exp() as f64;
    }
    let inverse = (1.0 / sum) as f32;
    let mut chunks = scores.chunks_exact_mut(8);
    for chunk in &mut chunks {
        // SAFETY: the chunk holds 8 values.
        unsafe {
            let p = _mm256_mul_ps(_mm256_loadu_ps(chunk.as_ptr()), _mm256_set1_ps(inverse));
            _mm256_storeu_ps(chunk.as_mut_ptr(), if to_f16 { round_f16_8(p) } else { p });
        }
    }
    for s in chunks.into_remainder() {
        *s *= inverse;
        if to_f16 {
            *s = super::ops::round_f16(*s);
        }
    }
}

/// [`Rope::rotate_portable`] compiled with FMA instructions (the same roundings, faster
/// than the C library's `fmaf`).
pub(crate) fn rope(_: Avx2, rope: &Rope, x: &mut [f32], angles: &[f32]) {
    // SAFETY: the token proves the CPU features.
    unsafe { rope_fma(rope, x, angles) }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn rope_fma(rope: &Rope, x: &mut [f32], angles: &[f32]) {
    rope.rotate_portable(x, angles)
}

/// Eight lanes of [`super::ops::expf`], for tests of the vector code's special cases.
#[cfg(test)]
pub(crate) fn exp_lanes(_: Avx2, x: [f32; 8]) -> [f32; 8] {
    let mut out = [0.0f32; 8];
    // SAFETY: the token proves the CPU features; both arrays hold 8 values.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), exp8(_mm256_loadu_ps(x.as_ptr()))) };
    out
}

/// [`super::attention::scores_portable`] in AVX2.
pub(crate) fn scores(_: Avx2, sum: Sum, query: &[f32], keys: &[f16], stride: usize, scores: &mut [f32]) {
    let d = query.len();
    if let Some(last) = scores.len().checked_sub(1) {
        assert!(last * stride + d <= keys.len());
    }
    match sum {
        Sum::Lanes16 => assert!(d.is_multiple_of(16)),
        Sum::VecDot { n } => assert_eq!(n, d),
    }
    // SAFETY: the token proves the CPU features; every key row read is in `keys` (checked
    // above) and the query is `d` long.
    unsafe { scores_avx2(sum, query, keys, stride, scores) }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scores_avx2(sum: Sum, query: &[f32], keys: &[f16], stride: usize, scores: &mut [f32]) {
    let d = query.len();
    let q = query.as_ptr();
    // SAFETY (all pointer reads): key row `j` spans `keys[j * stride..j * stride + d]`,
    // inside `keys` as the caller checked, and the offsets stay below `d`.
    unsafe {
        match sum {
            Sum::Lanes16 => {
                for (j, score) in scores.iter_mut().enumerate() {
                    let k = keys.as_ptr().add(j * stride);
                    let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                    for c in (0..d).step_by(16) {
                        lo = _mm256_fmadd_ps(load_f16(k.add(c)), _mm256_loadu_ps(q.add(c)), lo);
                        hi = _mm256_fmadd_ps(load_f16(k.add(c + 8)), _mm256_loadu_ps(q.add(c + 8)), hi);
                    }
                    *score = hsum8(_mm256_add_ps(lo, hi));
                }
            }
            Sum::VecDot { .. } => {
                let simd = d & !63;
                for (j, score) in scores.iter_mut().enumerate() {
                    let k = keys.as_ptr().add(j * stride);
                    let mut acc = [_mm256_setzero_ps(); 8];
                    for i in (0..simd).step_by(64) {
                        for (a, acc) in acc.iter_mut().enumerate() {
                            let o = i + 8 * a;
                            *acc = _mm256_fmadd_ps(load_f16(k.add(o)), _mm256_loadu_ps(q.add(o)), *acc);
                        }
                    }
                    // `acc[2a]` and `acc[2a + 1]` are the low and high halves of ggml's
                    // 16-lane accumulator `a`.
                    let lo = _mm256_add_ps(_mm256_add_ps(acc[0], acc[4]), _mm256_add_ps(acc[2], acc[6]));
                    let hi = _mm256_add_ps(_mm256_add_ps(acc[1], acc[5]), _mm256_add_ps(acc[3], acc[7]));
                    let mut total = hsum8(_mm256_add_ps(lo, hi)) as f64;
                    for i in simd..d {
                        total += ((*k.add(i)).to_f32() * *q.add(i)) as f64;
                    }
                    *score = total as f32;
                }
            }
        }
    }
}

/// [`super::attention::weighted_values_portable`] in AVX2; `lanes` is scratch.
pub(crate) fn weighted_values(
    _: Avx2,
    sum: Sum,
    probs: &[f32],
    values: &[f16],
    stride: usize,
    out: &mut [f32],
    lanes: &mut Vec<f32>,
) {
    let d = out.len();
    if !d.is_multiple_of(8) {
        return super::attention::weighted_values_portable(sum, probs, values, stride, out);
    }
    if let Some(last) = probs.len().checked_sub(1) {
        assert!(last * stride + d <= values.len());
    }
    // SAFETY: the token proves the CPU features; every value row read is in `values`
    // (checked above).
    unsafe { weighted_values_avx2(sum, probs, values, stride, out, lanes) }
}

/// Vectors of 8 dimensions handled together: their accumulators stay in registers.
const BLOCK_VECTORS: usize = 8;

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weighted_values_avx2(
    sum: Sum,
    probs: &[f32],
    values: &[f16],
    stride: usize,
    out: &mut [f32],
    lanes: &mut Vec<f32>,
) {
    let d = out.len();
    let mut d0 = 0;
    while d0 < d {
        let w = ((d - d0) / 8).min(BLOCK_VECTORS);
        let out = &mut out[d0..d0 + 8 * w];
        let values = &values[d0..];
        // SAFETY: as the caller's, for the columns `d0..d0 + 8 * w` of each row.
        unsafe {
            match w {
                8 => block::<8>(sum, probs, values, stride, out, lanes),
                7 => block::<7>(sum, probs, values, stride, out, lanes),
                6 => block::<6>(sum, probs, values, stride, out, lanes),
                5 => block::<5>(sum, probs, values, stride, out, lanes),
                4 => block::<4>(sum, probs, values, stride, out, lanes),
                3 => block::<3>(sum, probs, values, stride, out, lanes),
                2 => block::<2>(sum, probs, values, stride, out, lanes),
                _ => block::<1>(sum, probs, values, stride, out, lanes),
            }
        }
        d0 += 8 * w;
    }
}

/// Vector `v` of class `c` in `lanes` (classes of `8 * W` values).
///
/// # Safety
/// `lanes` must hold `(c + 1) * 8 * W` values and `v < W`.
#[inline]
#[target_feature(enable = "avx")]
unsafe fn load_lane<const W: usize>(lanes: &[f32], c: usize, v: usize) -> __m256 {
    debug_assert!((c * W + v + 1) * 8 <= lanes.len());
    // SAFETY: as the caller guarantees.
    unsafe { _mm256_loadu_ps(lanes.as_ptr().add((c * W + v) * 8)) }
}

/// `8 * W` dimensions of the weighted sum of value rows.
///
/// # Safety
/// Row `j < probs.len()` of `values` (`stride` apart) must hold `8 * W` values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block<const W: usize>(
    sum: Sum,
    probs: &[f32],
    values: &[f16],
    stride: usize,
    out: &mut [f32],
    lanes: &mut Vec<f32>,
) {
    let len = probs.len();
    let classes = match sum {
        Sum::Lanes16 => 16,
        Sum::VecDot { .. } => 64,
    };
    let simd = match sum {
        Sum::Lanes16 => len,
        Sum::VecDot { n } => (n & !63).min(len),
    };
    // `lanes[c]`: the sum of terms `c, c + classes, ...` for each of the 8 * W dimensions;
    // zeros for the classes no term falls in.
    lanes.resize(classes * 8 * W, 0.0);
    let used = classes.min(simd);
    lanes[used * 8 * W..].fill(0.0);
    for c in 0..used {
        let mut acc = [_mm256_setzero_ps(); W];
        let mut j = c;
        while j < simd {
            let p = _mm256_set1_ps(probs[j]);
            // SAFETY: the caller guarantees row `j` holds 8 * W values.
            let row = unsafe { values.as_ptr().add(j * stride) };
            for (v, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                *acc = _mm256_fmadd_ps(unsafe { load_f16(row.add(8 * v)) }, p, *acc);
            }
            j += classes;
        }
        for (v, acc) in acc.iter().enumerate() {
            // SAFETY: `lanes` holds `classes * 8 * W` values.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr().add((c * W + v) * 8), *acc) };
        }
    }
    let lanes: &[f32] = lanes;
    for v in 0..W {
        // The 16 lanes of each dimension: for the vector dot product, first fold the four
        // accumulators as `(a0 + a2) + (a1 + a3)`.
        let mut sixteen = [_mm256_setzero_ps(); 16];
        for (l, lane) in sixteen.iter_mut().enumerate() {
            // SAFETY: every class read is below `classes`, and `v < W`.
            *lane = unsafe {
                match sum {
                    Sum::Lanes16 => load_lane::<W>(lanes, l, v),
                    Sum::VecDot { .. } => _mm256_add_ps(
                        _mm256_add_ps(load_lane::<W>(lanes, l, v), load_lane::<W>(lanes, l + 32, v)),
                        _mm256_add_ps(load_lane::<W>(lanes, l + 16, v), load_lane::<W>(lanes, l + 48, v)),
                    ),
                }
            };
        }
        let mut h = [_mm256_setzero_ps(); 8];
        for i in 0..8 {
            h[i] = _mm256_add_ps(sixteen[i], sixteen[i + 8]);
        }
        let q = [
            _mm256_add_ps(h[0], h[4]),
            _mm256_add_ps(h[1], h[5]),
            _mm256_add_ps(h[2], h[6]),
            _mm256_add_ps(h[3], h[7]),
        ];
        let total = _mm256_add_ps(_mm256_add_ps(q[0], q[2]), _mm256_add_ps(q[1], q[3]));
        let out = &mut out[8 * v..8 * v + 8];
        if simd == len {
            // SAFETY: `out` holds 8 values.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), total) };
            continue;
        }
        // The terms past the vector part, added in f64 one position at a time.
        let mut low = _mm256_cvtps_pd(_mm256_castps256_ps128(total));
        let mut high = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(total));
        for (j, &p) in probs.iter().enumerate().skip(simd) {
            // SAFETY: the caller guarantees row `j` holds 8 * W values.
            let x = unsafe { load_f16(values.as_ptr().add(j * stride + 8 * v)) };
            let product = _mm256_mul_ps(x, _mm256_set1_ps(p));
            low = _mm256_add_pd(low, _mm256_cvtps_pd(_mm256_castps256_ps128(product)));
            high = _mm256_add_pd(high, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(product)));
        }
        let total = _mm256_set_m128(_mm256_cvtpd_ps(high), _mm256_cvtpd_ps(low));
        // SAFETY: `out` holds 8 values.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), total) };
    }
}
