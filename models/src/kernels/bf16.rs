//! BF16 weights times f32 activations, as llama.cpp's x86 CPU backend computes them when
//! built for AVX512_BF16 (the build its reference outputs came from): each activation row
//! is rounded to BF16 once (`ggml_cpu_fp32_to_bf16`, scalar round-to-nearest-even), then
//! every output is a sum of BF16 products taken two at a time by `vdpbf16ps` into 16 f32
//! lanes.
//!
//! ggml runs two orders, and so do the kernels here ([`Order`]):
//! - a prompt's products (two or more activation rows, weight rows a multiple of 4 and
//!   columns of 32) go to llamafile's `tinyBLAS<32, __m512, __m512bh>`: one accumulator of
//!   16 lanes over 32 values a step, summed by `_mm512_reduce_add_ps`;
//! - a decoded token's (one row), and every product of a mixture's experts
//!   (`mul_mat_id` never calls llamafile), go to `ggml_vec_dot_bf16`: two accumulators,
//!   each over 32 of every 64 values, their sums added in f64, and the last `cols % 64`
//!   products added one by one in f64.
//!
//! `vdpbf16ps` adds the odd product of a pair before the even one, each with one rounding
//! (a product of two BF16 values is exact in f32), treats denormal inputs as zero and
//! flushes denormal results: [`dot`] does the same in plain Rust, the reference the
//! AVX-512 kernel must equal bit for bit. CPUs without AVX512_BF16 run the plain code.
// TODO: an AVX-512F / AVX2 kernel widening BF16 to f32, for CPUs without AVX512_BF16
// (llama.cpp's AVX2 build sums in another order there, so no fixture checks it yet).

/// Lanes of the f32 accumulators (`__m512`).
const LANES: usize = 16;
/// Values consumed per accumulator step: two per lane.
const STEP: usize = 2 * LANES;

/// The order of a product's sums, which ggml picks by the shape of the product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// llamafile's tinyBLAS: one accumulator.
    Gemm,
    /// `ggml_vec_dot_bf16`: two accumulators, an f64 sum and a scalar tail.
    VecDot,
}

impl Order {
    /// The order ggml takes for `m` activation rows times a `rows × cols` matrix; a
    /// mixture's experts are always multiplied by `ggml_vec_dot_bf16`.
    pub(crate) fn of(m: usize, rows: usize, cols: usize, in_mixture: bool) -> Self {
        if !in_mixture && m >= 2 && rows.is_multiple_of(4) && cols.is_multiple_of(STEP) {
            Self::Gemm
        } else {
            Self::VecDot
        }
    }
}

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

/// One accumulator's 16 lanes after the pairs of `w` and `x` (whole steps of 32 values).
fn accumulate(w: &[u8], x: &[u16], acc: &mut [f32; LANES]) {
    for (lane, acc) in acc.iter_mut().enumerate() {
        let (i0, i1) = (2 * lane, 2 * lane + 1);
        *acc = dp_lane(*acc, at(w, i0), x[i0], at(w, i1), x[i1]);
    }
}

/// Weight row `w` (BF16 bytes) dotted with the BF16 activations `x`, in `order`.
pub(crate) fn dot(order: Order, w: &[u8], x: &[u16]) -> f32 {
    let n = x.len();
    debug_assert_eq!(w.len(), 2 * n);
    match order {
        Order::Gemm => {
            let mut acc = [0.0f32; LANES];
            for l in (0..n).step_by(STEP) {
                accumulate(&w[2 * l..2 * (l + STEP)], &x[l..l + STEP], &mut acc);
            }
            reduce(&acc)
        }
        Order::VecDot => {
            let whole = n / (2 * STEP) * (2 * STEP);
            let (mut c1, mut c2) = ([0.0f32; LANES], [0.0f32; LANES]);
            for i in (0..whole).step_by(2 * STEP) {
                accumulate(&w[2 * i..2 * (i + STEP)], &x[i..i + STEP], &mut c1);
                accumulate(
                    &w[2 * (i + STEP)..2 * (i + 2 * STEP)],
                    &x[i + STEP..i + 2 * STEP],
                    &mut c2,
                );
            }
            let mut sum = 0.0f64 + reduce(&c1) as f64;
            sum += reduce(&c2) as f64;
            for i in whole..n {
                sum += (to_f32(at(w, i)) * to_f32(x[i])) as f64;
            }
            sum as f32
        }
    }
}

/// `out[r * m + i]` = row `r` of `weights` (rows of `cols` BF16 values) dotted with
/// activation row `i` of `acts`.
pub(crate) fn product_rows(
    order: Order,
    weights: &[u8],
    cols: usize,
    acts: &[u16],
    m: usize,
    out: &mut [f32],
) {
    for (row, out) in weights.chunks_exact(2 * cols).zip(out.chunks_exact_mut(m)) {
        for (x, out) in acts.chunks_exact(cols).zip(out.iter_mut()) {
            *out = dot(order, row, x);
        }
    }
}

/// The AVX512_BF16 kernel: `vdpbf16ps` itself, in [`dot`]'s order.
#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{at, reduce, to_f32, Order, LANES, STEP};

    /// Proof that this CPU runs AVX-512F and AVX512_BF16.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) struct Avx512Bf16(());

    impl Avx512Bf16 {
        pub(crate) fn detect() -> Option<Self> {
            (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16"))
                .then_some(Self(()))
        }

        /// AVX512_BF16 version of [`super::product_rows`].
        pub(crate) fn product_rows(
            self,
            order: Order,
            weights: &[u8],
            cols: usize,
            acts: &[u16],
            m: usize,
            out: &mut [f32],
        ) {
            // SAFETY: `self` exists only on CPUs with the features `rows` needs.
            unsafe { rows(order, weights, cols, acts, m, out) }
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn rows(
        order: Order,
        weights: &[u8],
        cols: usize,
        acts: &[u16],
        m: usize,
        out: &mut [f32],
    ) {
        assert!(acts.len() >= m * cols && out.len() * 2 * cols == weights.len() * m);
        for (row, out) in weights.chunks_exact(2 * cols).zip(out.chunks_exact_mut(m)) {
            for (x, out) in acts.chunks_exact(cols).zip(out.iter_mut()) {
                // SAFETY: same features; `row` holds `cols` BF16 values, as `x` does.
                *out = unsafe { dot(order, row, x) };
            }
        }
    }

    /// `acc` after the 32 values at `w` and `x`.
    ///
    /// # Safety
    /// AVX512_BF16 must be supported; `w` and `x` must hold 32 BF16 values each.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn step(acc: __m512, w: &[u8], x: &[u16]) -> __m512 {
        debug_assert!(w.len() >= 2 * STEP && x.len() >= STEP);
        // SAFETY: 64 bytes at each, read unaligned.
        unsafe {
            let w = _mm512_loadu_si512(w.as_ptr().cast());
            let x = _mm512_loadu_si512(x.as_ptr().cast());
            _mm512_dpbf16_ps(
                acc,
                std::mem::transmute::<__m512i, __m512bh>(w),
                std::mem::transmute::<__m512i, __m512bh>(x),
            )
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    fn lanes(v: __m512) -> [f32; LANES] {
        let mut out = [0.0f32; LANES];
        // SAFETY: `out` holds 16 f32s.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
        out
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dot(order: Order, w: &[u8], x: &[u16]) -> f32 {
        let n = x.len();
        assert_eq!(w.len(), 2 * n);
        // SAFETY (every `step`): the ranges below lie within `w` and `x`.
        unsafe {
            match order {
                Order::Gemm => {
                    assert!(n.is_multiple_of(STEP));
                    let mut acc = _mm512_setzero_ps();
                    for l in (0..n).step_by(STEP) {
                        acc = step(acc, &w[2 * l..], &x[l..]);
                    }
                    reduce(&lanes(acc))
                }
                Order::VecDot => {
                    let whole = n / (2 * STEP) * (2 * STEP);
                    let (mut c1, mut c2) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                    for i in (0..whole).step_by(2 * STEP) {
                        c1 = step(c1, &w[2 * i..], &x[i..]);
                        c2 = step(c2, &w[2 * (i + STEP)..], &x[i + STEP..]);
                    }
                    let mut sum = 0.0f64 + reduce(&lanes(c1)) as f64;
                    sum += reduce(&lanes(c2)) as f64;
                    for i in whole..n {
                        sum += (to_f32(at(w, i)) * to_f32(x[i])) as f64;
                    }
                    sum as f32
                }
            }
        }
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

    #[test]
    fn orders_are_ggmls_choices() {
        assert_eq!(Order::of(1, 64, 64, false), Order::VecDot);
        assert_eq!(Order::of(8, 64, 64, false), Order::Gemm);
        assert_eq!(Order::of(8, 65, 64, false), Order::VecDot);
        assert_eq!(Order::of(8, 64, 65, false), Order::VecDot);
        assert_eq!(Order::of(8, 64, 64, true), Order::VecDot);
    }

    /// Every instruction set computes the plain code's bits, in both orders, over odd
    /// shapes and thread counts; and the plain code is the exact sum of the BF16
    /// products up to f32 rounding.
    #[test]
    fn products_match_the_reference_over_odd_shapes() {
        let mut rng = ChaCha8Rng::seed_from_u64(16);
        let mut worst = 0.0f64;
        for &rows in &ROWS {
            for &cols in &COLS {
                let matrix = matrix(&mut rng, rows, cols);
                for m in [1, 2, 5] {
                    let x = values(&mut rng, m * cols, 1.0);
                    let mut acts = vec![0u16; m * cols];
                    convert_row(&x, &mut acts);
                    for order in [Order::Gemm, Order::VecDot] {
                        if order == Order::Gemm && !cols.is_multiple_of(STEP) {
                            continue;
                        }
                        let mut expected = vec![0.0f32; rows * m];
                        product_rows(order, &matrix.data, cols, &acts, m, &mut expected);
                        for (r, row) in matrix.data.chunks_exact(2 * cols).enumerate() {
                            for (i, x) in acts.chunks_exact(cols).enumerate() {
                                let exact: f64 = (0..cols)
                                    .map(|j| to_f32(at(row, j)) as f64 * to_f32(x[j]) as f64)
                                    .sum();
                                let magnitude: f64 = (0..cols)
                                    .map(|j| {
                                        (to_f32(at(row, j)) as f64 * to_f32(x[j]) as f64).abs()
                                    })
                                    .sum();
                                let error = (expected[r * m + i] as f64 - exact).abs()
                                    / magnitude.max(1e-30);
                                worst = worst.max(error);
                                assert!(
                                    error < 1e-5,
                                    "{rows}x{cols}, m = {m}, {order:?}: relative error {error:e}"
                                );
                            }
                        }
                        for isa in Isa::all() {
                            let mut out = vec![0.0f32; rows * m];
                            isa.product_rows_bf16(order, &matrix.data, cols, &acts, m, &mut out);
                            let bits =
                                |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                            assert_eq!(
                                bits(&out),
                                bits(&expected),
                                "{isa:?}, {rows}x{cols}, m = {m}, {order:?}"
                            );
                        }
                    }
                    // The whole product, on 1 and 3 threads: outputs in `m` rows of `rows`.
                    let order = Order::of(m, rows, cols, false);
                    let mut by_rows = vec![0.0f32; rows * m];
                    product_rows(order, &matrix.data, cols, &acts, m, &mut by_rows);
                    for threads in [1, 3] {
                        let out = product::multiply(&matrix, &x, m, threads, Isa::detect());
                        for r in 0..rows {
                            for i in 0..m {
                                assert_eq!(
                                    out[i * rows + r].to_bits(),
                                    by_rows[r * m + i].to_bits()
                                );
                            }
                        }
                    }
                }
            }
        }
        eprintln!("BF16 products: worst relative error {worst:.1e} against exact sums of the BF16 products");
    }

    #[test]
    fn denormals_count_as_zero_as_in_vdpbf16ps() {
        // 2^-130 is denormal in f32 and in BF16; its product with 2^100 would not be.
        let tiny = from_f32(f32::from_bits(0x0008_0000));
        let w: Vec<u8> = [tiny; 32].iter().flat_map(|v| v.to_le_bytes()).collect();
        let x = [from_f32(2f32.powi(100)); 32];
        assert_eq!(dot(Order::Gemm, &w, &x), 0.0);
        for isa in Isa::all() {
            let mut out = [1.0f32];
            isa.product_rows_bf16(Order::Gemm, &w, 32, &x, 1, &mut out);
            assert_eq!(out[0], 0.0, "{isa:?}");
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
