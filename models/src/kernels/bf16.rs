//! BF16 weights times f32 activations, as llama.cpp's x86 CPU backend computes a decoded
//! token's products when built for AVX512_BF16 (`ggml_vec_dot_bf16`): each activation row
//! is rounded to BF16 once (`ggml_cpu_fp32_to_bf16`, scalar round-to-nearest-even), then
//! every output is a sum of BF16 products taken two at a time by `vdpbf16ps` into two
//! accumulators of 16 f32 lanes, each over 32 of every 64 values, their sums added in f64,
//! and the last `cols % 64` products added one by one in f64.
//!
//! One order for every product, however many activation rows it has, so that a token
//! computes the same alone or in a batch (replays and splits stay exact) and on every CPU.
//! ggml itself takes another order for a prompt's products (llamafile's tinyBLAS, one
//! accumulator), so prompt logits differ from llama.cpp's in the last bits of the sums.
//!
//! `vdpbf16ps` adds the odd product of a pair before the even one, each with one rounding
//! (a product of two BF16 values is exact in f32), treats denormal inputs as zero and
//! flushes denormal results: [`dot`] does the same in plain Rust, the reference the
//! AVX512_BF16 kernel, and the AVX2 one that widens BF16 to f32 for CPUs without it, must
//! equal bit for bit.

/// Lanes of the f32 accumulators (`__m512`).
const LANES: usize = 16;
/// Values consumed per accumulator step: two per lane.
const STEP: usize = 2 * LANES;
/// Values of one step of both accumulators.
const PAIR: usize = 2 * STEP;

/// A BF16 value (its bits) widened to f32, exactly.
#[inline(always)]
pub(crate) fn to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// f32 to BF16 as ggml's `ggml_compute_fp32_to_bf16`: round to nearest even, NaNs quieted.
#[inline(always)]
pub(crate) fn from_f32(value: f32) -> u16 {
    let bits = value.to_bits();
    if bits & 0x7fff_ffff > 0x7f80_0000 {
        return ((bits >> 16) | 64) as u16;
    }
    (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// Rounds an activation row to BF16, into `out`.
pub(crate) fn convert_row(x: &[f32], out: &mut [u16]) {
    for (out, &x) in out.iter_mut().zip(x) {
        *out = from_f32(x);
    }
}

/// The little-endian BF16 at value `i` of `bytes`.
#[inline(always)]
pub(crate) fn at(bytes: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]])
}

#[inline(always)]
fn denormal_as_zero(x: f32) -> f32 {
    if x.is_subnormal() {
        0.0f32.copysign(x)
    } else {
        x
    }
}

/// One lane of `vdpbf16ps`: `acc + w1 * x1`, then `+ w0 * x0`, denormals zero.
#[inline(always)]
fn dp_lane(acc: f32, w0: u16, x0: u16, w1: u16, x1: u16) -> f32 {
    let product = |w: u16, x: u16| (denormal_as_zero(to_f32(w)), denormal_as_zero(to_f32(x)));
    let (a1, b1) = product(w1, x1);
    let acc = denormal_as_zero(a1.mul_add(b1, denormal_as_zero(acc)));
    let (a0, b0) = product(w0, x0);
    denormal_as_zero(a0.mul_add(b0, acc))
}

/// `_mm512_reduce_add_ps` as GCC expands it: upper half onto lower, down to one.
#[inline(always)]
pub(crate) fn reduce(l: &[f32; LANES]) -> f32 {
    let h8: [f32; 8] = std::array::from_fn(|i| l[i + 8] + l[i]);
    let h4: [f32; 4] = std::array::from_fn(|i| h8[i + 4] + h8[i]);
    (h4[0] + h4[2]) + (h4[1] + h4[3])
}

/// One accumulator's 16 lanes after the pairs of `w` and `x` (one step of 32 values).
fn accumulate(w: &[u8], x: &[u16], acc: &mut [f32; LANES]) {
    for (lane, acc) in acc.iter_mut().enumerate() {
        let (i0, i1) = (2 * lane, 2 * lane + 1);
        *acc = dp_lane(*acc, at(w, i0), x[i0], at(w, i1), x[i1]);
    }
}

/// The end of a dot product, shared by every kernel: the two accumulators' sums in f64,
/// then the products past the last whole 64 values, one by one.
#[inline(always)]
fn finish(c1: &[f32; LANES], c2: &[f32; LANES], w: &[u8], x: &[u16], whole: usize) -> f32 {
    let mut sum = 0.0f64 + reduce(c1) as f64;
    sum += reduce(c2) as f64;
    for (i, &x) in x.iter().enumerate().skip(whole) {
        sum += (to_f32(at(w, i)) * to_f32(x)) as f64;
    }
    sum as f32
}

/// Weight row `w` (BF16 bytes) dotted with the BF16 activations `x`.
pub(crate) fn dot(w: &[u8], x: &[u16]) -> f32 {
    let n = x.len();
    debug_assert_eq!(w.len(), 2 * n);
    let whole = n / PAIR * PAIR;
    let (mut c1, mut c2) = ([0.0f32; LANES], [0.0f32; LANES]);
    for i in (0..whole).step_by(PAIR) {
        accumulate(&w[2 * i..2 * (i + STEP)], &x[i..i + STEP], &mut c1);
        accumulate(&w[2 * (i + STEP)..2 * (i + PAIR)], &x[i + STEP..i + PAIR], &mut c2);
    }
    finish(&c1, &c2, w, x, whole)
}

/// `out[r * m + i]` = row `r` of `weights` (rows of `cols` BF16 values) dotted with
/// activation row `i` of `acts`.
pub(crate) fn product_rows(weights: &[u8], cols: usize, acts: &[u16], m: usize, out: &mut [f32]) {
    for (row, out) in weights.chunks_exact(2 * cols).zip(out.chunks_exact_mut(m)) {
        for (x, out) in acts.chunks_exact(cols).zip(out.iter_mut()) {
            *out = dot(row, x);
        }
    }
}

/// The x86 kernels: `vdpbf16ps` itself, and AVX2 doing what it does lane by lane.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::super::x86::Avx2;
    use super::{finish, LANES, PAIR, STEP};

    /// Proof that this CPU runs AVX-512F and AVX512_BF16.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct Avx512Bf16(());

    impl Avx512Bf16 {
        pub(crate) fn detect() -> Option<Self> {
            (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")).then_some(Self(()))
        }

        /// AVX512_BF16 version of [`super::product_rows`].
        pub(crate) fn product_rows(self, weights: &[u8], cols: usize, acts: &[u16], m: usize, out: &mut [f32]) {
            // SAFETY: `self` exists only on CPUs with the features `rows_avx512` needs.
            unsafe { rows_avx512(weights, cols, acts, m, out) }
        }
    }

    /// AVX2 version of [`super::product_rows`], for CPUs without AVX512_BF16.
    pub(crate) fn product_rows_avx2(_: Avx2, weights: &[u8], cols: usize, acts: &[u16], m: usize, out: &mut [f32]) {
        // SAFETY: an `Avx2` exists only on CPUs with AVX2 and FMA.
        unsafe { rows_avx2(weights, cols, acts, m, out) }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn rows_avx512(weights: &[u8], cols: usize, acts: &[u16], m: usize, out: &mut [f32]) {
        assert!(acts.len() >= m * cols && out.len() * 2 * cols == weights.len() * m);
        for (row, out) in weights.chunks_exact(2 * cols).zip(out.chunks_exact_mut(m)) {
            for (x, out) in acts.chunks_exact(cols).zip(out.iter_mut()) {
                let whole = cols / PAIR * PAIR;
                let (mut c1, mut c2) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                for i in (0..whole).step_by(PAIR) {
                    // SAFETY: values `i .. i + 64` lie within `row` and `x`.
                    unsafe {
                        c1 = step_avx512(c1, row.as_ptr().add(2 * i), x.as_ptr().add(i));
                        c2 = step_avx512(c2, row.as_ptr().add(2 * (i + STEP)), x.as_ptr().add(i + STEP));
                    }
                }
                let lanes = |v: __m512| {
                    let mut l = [0.0f32; LANES];
                    // SAFETY: `l` holds 16 f32s.
                    unsafe { _mm512_storeu_ps(l.as_mut_ptr(), v) };
                    l
                };
                *out = finish(&lanes(c1), &lanes(c2), row, x, whole);
            }
        }
    }

    /// `acc` after the 32 values at `w` and `x`.
    ///
    /// # Safety
    /// AVX512_BF16 must be supported; `w` must point to 64 readable bytes, `x` to 32 values.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn step_avx512(acc: __m512, w: *const u8, x: *const u16) -> __m512 {
        // SAFETY: as the caller promises; read unaligned.
        unsafe {
            let w = _mm512_loadu_si512(w.cast());
            let x = _mm512_loadu_si512(x.cast());
            _mm512_dpbf16_ps(acc, std::mem::transmute::<__m512i, __m512bh>(w), std::mem::transmute::<__m512i, __m512bh>(x))
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_avx2(weights: &[u8], cols: usize, acts: &[u16], m: usize, out: &mut [f32]) {
        assert!(acts.len() >= m * cols && out.len() * 2 * cols == weights.len() * m);
        for (row, out) in weights.chunks_exact(2 * cols).zip(out.chunks_exact_mut(m)) {
            for (x, out) in acts.chunks_exact(cols).zip(out.iter_mut()) {
                let whole = cols / PAIR * PAIR;
                // Each 16-lane accumulator as two halves: lanes 0-7, then 8-15.
                let mut c = [_mm256_setzero_ps(); 4];
                for i in (0..whole).step_by(PAIR) {
                    for (half, c) in c.iter_mut().enumerate() {
                        let at = i + 16 * half;
                        // SAFETY: values `at .. at + 16` lie within `row` and `x`.
                        *c = unsafe { step_avx2(*c, row.as_ptr().add(2 * at), x.as_ptr().add(at)) };
                    }
                }
                let lanes = |lo: __m256, hi: __m256| {
                    let mut l = [0.0f32; LANES];
                    // SAFETY: `l` holds 16 f32s.
                    unsafe {
                        _mm256_storeu_ps(l.as_mut_ptr(), lo);
                        _mm256_storeu_ps(l.as_mut_ptr().add(8), hi);
                    }
                    l
                };
                *out = finish(&lanes(c[0], c[1]), &lanes(c[2], c[3]), row, x, whole);
            }
        }
    }

    /// Eight lanes of `vdpbf16ps` over the 16 values at `w` and `x`: the odd product of
    /// each pair, then the even one, each fused into the lane with one rounding, with
    /// denormal inputs as zero and denormal results flushed.
    ///
    /// # Safety
    /// AVX2 and FMA must be supported; `w` must point to 32 readable bytes, `x` to 16 values.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn step_avx2(acc: __m256, w: *const u8, x: *const u16) -> __m256 {
        let exponent = _mm256_set1_epi32(0x7f80_0000);
        let sign = _mm256_set1_epi32(i32::MIN);
        // Zero (keeping the sign) where the exponent is zero: denormals, and zeros as they are.
        let flush = |v: __m256i| {
            let denormal = _mm256_cmpeq_epi32(_mm256_and_si256(v, exponent), _mm256_setzero_si256());
            _mm256_blendv_epi8(v, _mm256_and_si256(v, sign), denormal)
        };
        let flush_ps = |v: __m256| _mm256_castsi256_ps(flush(_mm256_castps_si256(v)));
        // SAFETY: as the caller promises; read unaligned.
        let (w, x) = unsafe { (_mm256_loadu_si256(w.cast()), _mm256_loadu_si256(x.cast())) };
        // Each 32-bit lane holds a pair: the even value in its low half, the odd in its high.
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
        let odd = |v: __m256i| _mm256_castsi256_ps(flush(_mm256_and_si256(v, high)));
        let even = |v: __m256i| _mm256_castsi256_ps(flush(_mm256_slli_epi32::<16>(v)));
        let acc = flush_ps(_mm256_fmadd_ps(odd(w), odd(x), flush_ps(acc)));
        flush_ps(_mm256_fmadd_ps(even(w), even(x), acc))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::super::{product, Isa, Matrix, QuantMatrix};
    use super::*;

    const ROWS: [usize; 9] = [1, 2, 3, 4, 5, 7, 8, 33, 64];
    /// Odd lengths, lengths of whole steps of 32 and of 64, and a tail after them.
    const COLS: [usize; 8] = [1, 7, 31, 32, 64, 96, 129, 576];

    fn values(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| {
                let v: f32 = rng.random_range(-1.0..1.0) * scale;
                if rng.random_ratio(1, 50) {
                    v * 40.0
                } else {
                    v
                }
            })
            .collect()
    }

    fn matrix(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> QuantMatrix {
        let tensor =
            Tensor::from_vec(values(rng, rows * cols, 0.5), (rows, cols), &Device::Cpu).unwrap();
        let qtensor = QTensor::quantize(&tensor, GgmlDType::BF16).unwrap();
        QuantMatrix::from_qtensor(&qtensor)
            .unwrap()
            .expect("BF16 is native")
    }

    #[test]
    fn rounding_to_bf16_is_ggmls() {
        for (x, bits) in [
            (1.0f32, 0x3f80u16),
            (f32::from_bits(0x3f80_8000), 0x3f80), // a tie, to even
            (f32::from_bits(0x3f81_8000), 0x3f82), // a tie, to even
            (f32::from_bits(0x3f80_8001), 0x3f81),
            (-0.0, 0x8000),
            (f32::INFINITY, 0x7f80),
            (f32::from_bits(0x7f80_0001), 0x7fc0), // a signalling NaN, quieted
        ] {
            assert_eq!(from_f32(x), bits, "{x:e}");
        }
        for bits in [0u16, 0x3f80, 0xc2f7, 0x0001, 0x7f7f] {
            assert_eq!(from_f32(to_f32(bits)), bits);
        }
    }

    type Kernel = Box<dyn Fn(&[u8], usize, &[u16], usize, &mut [f32])>;

    /// Every kernel this CPU runs, by name, the plain code first.
    fn kernels() -> Vec<(&'static str, Kernel)> {
        #[allow(unused_mut)] // Only x86 adds to it so far.
        let mut all: Vec<(&'static str, Kernel)> = vec![("plain", Box::new(product_rows))];
        #[cfg(target_arch = "x86_64")]
        {
            if let Some(avx512) = x86::Avx512Bf16::detect() {
                all.push(("AVX512_BF16", Box::new(move |w, c, a, m, o| avx512.product_rows(w, c, a, m, o))));
            }
            if let Some(avx2) = super::super::x86::Avx2::detect() {
                all.push(("AVX2", Box::new(move |w, c, a, m, o| x86::product_rows_avx2(avx2, w, c, a, m, o))));
            }
        }
        all
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    /// Every kernel computes the plain code's bits over odd shapes, the plain code is the
    /// exact sum of the BF16 products up to f32 rounding, and a product of several rows,
    /// on any number of threads, gives each row what it gives that row alone.
    #[test]
    fn products_match_the_reference_over_odd_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(16);
        let kernels = kernels();
        eprintln!("BF16 kernels on this CPU: {:?}", kernels.iter().map(|(name, _)| *name).collect::<Vec<_>>());
        let mut worst = 0.0f64;
        for &rows in &ROWS {
            for &cols in &COLS {
                let matrix = matrix(&mut rng, rows, cols);
                for m in [1, 2, 5] {
                    let x = values(&mut rng, m * cols, 1.0);
                    let mut acts = vec![0u16; m * cols];
                    convert_row(&x, &mut acts);
                    let mut expected = vec![0.0f32; rows * m];
                    product_rows(&matrix.data, cols, &acts, m, &mut expected);
                    for (r, row) in matrix.data.chunks_exact(2 * cols).enumerate() {
                        for (i, x) in acts.chunks_exact(cols).enumerate() {
                            let product = |j: usize| to_f32(at(row, j)) as f64 * to_f32(x[j]) as f64;
                            let exact: f64 = (0..cols).map(product).sum();
                            let magnitude: f64 = (0..cols).map(|j| product(j).abs()).sum();
                            let error = (expected[r * m + i] as f64 - exact).abs() / magnitude.max(1e-30);
                            worst = worst.max(error);
                            assert!(error < 1e-5, "{rows}x{cols}, m = {m}: relative error {error:e}");
                        }
                    }
                    for (name, kernel) in &kernels {
                        let mut out = vec![0.0f32; rows * m];
                        kernel(&matrix.data, cols, &acts, m, &mut out);
                        assert_eq!(bits(&out), bits(&expected), "{name}, {rows}x{cols}, m = {m}");
                    }
                    // The whole product, on 1 and 3 threads, in `m` rows of `rows` outputs:
                    // each row what it is alone.
                    for threads in [1, 3] {
                        let out = product::multiply(&matrix, &x, m, threads, Isa::detect());
                        for (i, x) in x.chunks_exact(cols).enumerate() {
                            let alone = product::multiply(&matrix, x, 1, threads, Isa::detect());
                            assert_eq!(bits(&out[i * rows..(i + 1) * rows]), bits(&alone), "{rows}x{cols}, row {i} of {m}");
                            for r in 0..rows {
                                assert_eq!(out[i * rows + r].to_bits(), expected[r * m + i].to_bits());
                            }
                        }
                    }
                }
            }
        }
        eprintln!("BF16 products: worst relative error {worst:.1e} against exact sums of the BF16 products");
    }

    /// Denormal inputs count as zero, and sums that fall into the denormals are flushed,
    /// as `vdpbf16ps` does, in every kernel (over 64 values: the accumulators' part).
    #[test]
    fn denormals_count_as_zero_as_in_vdpbf16ps() {
        let row = |v: f32| -> Vec<u8> { [from_f32(v); 64].iter().flat_map(|v| v.to_le_bytes()).collect() };
        // 2^-130 is denormal in f32 and in BF16; its product with 2^100 would not be.
        let denormal_input = (row(f32::from_bits(0x0008_0000)), [from_f32(2f32.powi(100)); 64]);
        // 2^-70 squared is 2^-140: normal inputs, a denormal product.
        let denormal_sum = (row(2f32.powi(-70)), [from_f32(2f32.powi(-70)); 64]);
        for (what, (w, x)) in [("denormal inputs", denormal_input), ("denormal sums", denormal_sum)] {
            assert_eq!(dot(&w, &x), 0.0, "{what}: plain");
            for (name, kernel) in kernels() {
                let mut out = [1.0f32];
                kernel(&w, 64, &x, 1, &mut out);
                assert_eq!(out[0], 0.0, "{what}: {name}");
            }
        }
    }

    #[test]
    fn embeddings_are_the_bf16_values() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let matrix = matrix(&mut rng, 5, 37);
        let mut out = Vec::new();
        Matrix::Native(matrix.clone())
            .embedding_into(&[4, 0], &mut out)
            .unwrap();
        let row = |r: usize| {
            (0..37)
                .map(|j| to_f32(at(&matrix.data[r * 74..], j)))
                .collect::<Vec<_>>()
        };
        assert_eq!(out, [row(4), row(0)].concat());
    }
}
