//! Quantized matrix products on the CPU that compute exactly what llama.cpp computes.
//!
//! A [`QuantMatrix`] keeps a GGUF weight matrix in its file's block format (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0, or the K-quants Q2_K, Q3_K, Q4_K, Q5_K and Q6_K) and multiplies f32
//! activations by it the way ggml does: each activation row is quantized once to 8 bits per
//! value (Q8_1 for Q4_1 and Q5_1 weights, Q8_K for K-quants, Q8_0 otherwise), then every
//! output is a sum of integer block products scaled in f32, in ggml's order of operations.
//! BF16 matrices multiply activations rounded to BF16, in the order of ggml's AVX512_BF16
//! `vec_dot` (`bf16.rs`). Other formats (F16 and F32 among them) go to candle's `QMatMul`.
//! Candle's own kernels round differently (an f16 product in Q8_1's sums, other summation
//! orders), and in a 30-layer model such last-bit differences grow into visibly different
//! logits.
//!
//! The reference is llama.cpp's x86 CPU backend without AMX (its AVX2 and AVX-512 builds
//! compute the same bits; `llama_cpp_products.json` holds products it computed, and the
//! tests check them bit for bit). On CPUs with AMX, llama.cpp repacks these formats for
//! AMX kernels that sum each block in one accumulator and round differently again.
//!
//! The K-quants, Q5_0 and Q5_1 follow ggml's AVX2 `ggml_vec_dot_*` as read from its
//! source: no fixture checks their products bit for bit yet (`tests/quant_types.rs` and
//! `tests/moe.rs` compare whole models' logits with llama.cpp's), and by default llama.cpp
//! repacks Q2_K, Q4_K, Q5_K and Q6_K matrices on AVX2 machines for kernels that sum in
//! another order (see `kquant_portable.rs`).
//!
//! Instruction sets are picked at run time; `portable.rs` (`kquant_portable.rs` for the
//! K-quants) is the reference every SIMD version must equal bit for bit. AVX2 kernels cover
//! every format, and the K-quants have AVX-512 ones too. On CPUs with AVX-512 VNNI, Q4_0,
//! Q4_1, Q8_0 and Q4_K matrices are rearranged at load so that four rows interleave
//! ([`Layout`], `interleave.rs`), and `x86_interleaved.rs` and `kquant_x86_interleaved.rs`
//! multiply four rows per instruction, still bit for bit. Output rows are split across
//! threads (`product.rs`, `threads.rs`) without changing any result.
//!
//! The rest of the decoder's arithmetic on the CPU (RMS norm, RoPE, SiLU and its gate,
//! attention over an f16 KV cache) is in `ops.rs` and `attention.rs`, just as exact.

mod activation;
pub(crate) mod attention;
mod bf16;
mod format;
// Only the x86 kernels read interleaved rows so far.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
mod interleave;
mod kquant_activation;
mod kquant_format;
#[cfg(target_arch = "aarch64")]
mod kquant_neon;
mod kquant_portable;
#[cfg(target_arch = "x86_64")]
mod kquant_x86;
#[cfg(target_arch = "x86_64")]
mod kquant_x86_interleaved;
pub(crate) mod ops;
#[cfg(target_arch = "x86_64")]
mod ops_x86;
mod portable;
mod product;
mod threads;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_interleaved;

pub(crate) mod mxfp4;

#[cfg(test)]
mod kquant_tests;
#[cfg(test)]
mod ops_tests;
#[cfg(test)]
mod tests;

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{bail, DType, Device, Module, Storage, Tensor};

use activation::Q8Block;
use format::MatrixFormat;
#[cfg(target_arch = "x86_64")]
use interleave::GROUP_ROWS;
use kquant_activation::Q8KBlock;
use kquant_format::KQuant;
pub(crate) use mxfp4::{dequantize_mxfp4, quantize_mxfp4};
pub(crate) use product::release_large_buffers;

/// A weight matrix for products: native kernels where they apply, candle's elsewhere
/// (other formats, dense weights, GPUs).
#[derive(Clone)]
pub(crate) enum Matrix {
    Native(QuantMatrix),
    Candle(QMatMul),
    /// MXFP4, which candle lacks, on candle's path (`mxfp4.rs`).
    CandleMxfp4(mxfp4::DeviceMxfp4),
}

impl Matrix {
    /// Takes a tensor read from GGUF, keeping its bytes once, in whichever form runs it.
    pub(crate) fn quantized(qtensor: QTensor) -> candle_core::Result<Self> {
        match QuantMatrix::from_qtensor(&qtensor)? {
            // `qtensor` is dropped here: only the matrix's copy of the bytes stays.
            Some(matrix) => Ok(Self::Native(matrix.with_best_layout())),
            None => Ok(Self::Candle(QMatMul::from_qtensor(qtensor)?)),
        }
    }

    /// A tensor read from GGUF, multiplied by candle whatever its format: the path Metal
    /// and CUDA take, and the CPU's when tests ask for it.
    pub(crate) fn candle(qtensor: QTensor) -> candle_core::Result<Self> {
        Ok(Self::Candle(QMatMul::from_qtensor(qtensor)?))
    }

    /// An MXFP4 matrix from its blocks as GGUF stores them, for the native kernels.
    pub(crate) fn mxfp4_native(blocks: &[u8], rows: usize, cols: usize) -> candle_core::Result<Self> {
        Ok(Self::Native(QuantMatrix::from_blocks(MatrixFormat::Block32(format::WeightFormat::Mxfp4), blocks, rows, cols)?))
    }

    /// An MXFP4 matrix for candle's path on `device`.
    pub(crate) fn mxfp4_candle(blocks: &[u8], rows: usize, cols: usize, device: &Device) -> candle_core::Result<Self> {
        Ok(Self::CandleMxfp4(mxfp4::DeviceMxfp4::new(blocks, rows, cols, device)?))
    }

    /// A dense matrix (safetensors weights), multiplied by candle.
    pub(crate) fn dense(weight: Tensor) -> Self {
        Self::Candle(QMatMul::Tensor(weight))
    }

    /// `x @ selfᵀ` for `x` of shape `(..., cols)`: shape `(..., rows)`.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Native(matrix) => matrix.forward(x),
            Self::Candle(matrix) => matrix.forward(x),
            Self::CandleMxfp4(matrix) => matrix.forward(x),
        }
    }

    /// The rows named by `ids`, dequantized: shape `ids.dims() + (cols,)`.
    pub(crate) fn embedding(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Native(matrix) => matrix.embedding(ids),
            Self::Candle(matrix) => matrix.embedding(ids),
            Self::CandleMxfp4(matrix) => matrix.embedding(ids),
        }
    }

    /// `x @ selfᵀ` on the CPU for the `m` rows of `x`, into `out` (resized to `m` rows of
    /// outputs). Native matrices allocate nothing once `out` and this thread's buffers
    /// have grown to the size of the product.
    pub(crate) fn forward_into(&self, x: &[f32], m: usize, out: &mut Vec<f32>) -> candle_core::Result<()> {
        match self {
            Self::Native(matrix) => {
                if x.len() != m * matrix.cols {
                    bail!("{} values are not {m} rows of {}", x.len(), matrix.cols);
                }
                // Every value is overwritten: no need to clear.
                out.resize(m * matrix.rows, 0.0);
                product::multiply_into(matrix, x, m, threads::num_threads(), Isa::detect(), out);
            }
            Self::Candle(_) | Self::CandleMxfp4(_) => {
                if m == 0 || !x.len().is_multiple_of(m) {
                    bail!("{} values are not {m} rows", x.len());
                }
                let x = Tensor::from_slice(x, (m, x.len() / m), &Device::Cpu)?;
                let y = self.forward(&x)?.to_dtype(DType::F32)?.flatten_all()?;
                out.clear();
                out.extend_from_slice(&y.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }

    /// The rows named by `ids`, dequantized on the CPU, appended to `out`.
    pub(crate) fn embedding_into(&self, ids: &[u32], out: &mut Vec<f32>) -> candle_core::Result<()> {
        match self {
            Self::Native(matrix) => matrix.embedding_into(ids, out),
            Self::Candle(_) | Self::CandleMxfp4(_) => {
                let ids = Tensor::new(ids, &Device::Cpu)?;
                let rows = self.embedding(&ids)?.to_dtype(DType::F32)?.flatten_all()?;
                out.extend_from_slice(&rows.to_vec1::<f32>()?);
                Ok(())
            }
        }
    }
}

/// A matrix multiplied by this module's kernels, for the examples that measure them
/// (`examples/kquant_speed.rs`); not part of the crate's API.
#[doc(hidden)]
pub struct BenchMatrix(Matrix);

impl BenchMatrix {
    /// The matrix of a 2-D CPU tensor in a format the kernels multiply; `None` otherwise.
    pub fn native(qtensor: &QTensor) -> candle_core::Result<Option<Self>> {
        Ok(QuantMatrix::from_qtensor(qtensor)?.map(|matrix| Self(Matrix::Native(matrix.with_best_layout()))))
    }

    /// `x @ selfᵀ` for the `m` rows of `x`, into `out`, as the models run it.
    pub fn forward_into(&self, x: &[f32], m: usize, out: &mut Vec<f32>) -> candle_core::Result<()> {
        self.0.forward_into(x, m, out)
    }
}

/// A quantized matrix in GGML's block layout, multiplied on the CPU by this module's kernels.
#[derive(Clone)]
pub(crate) struct QuantMatrix {
    format: MatrixFormat,
    rows: usize,
    cols: usize,
    layout: Layout,
    /// The blocks, arranged as `layout` says; shared by clones (a tied LM head and the
    /// embedding).
    data: Arc<[u8]>,
}

/// The largest block of a format that is interleaved: Q4_K's.
const MAX_INTERLEAVED_BLOCK_BYTES: usize = KQuant::Q4_K.block_bytes();

/// How a matrix's blocks are arranged in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// As the file stores them, row after row.
    Rows,
    /// Rows interleaved in fours (`interleave.rs`; Q4_0, Q4_1, Q8_0 and Q4_K only) for the
    /// AVX-512 kernels, which the token vouches this CPU runs.
    #[cfg(target_arch = "x86_64")]
    Interleaved(kquant_x86::Avx512Vnni),
}

impl Layout {
    /// The layouts that hold matrices of `format` on this CPU: rows always, and rows
    /// interleaved in fours where the AVX-512 kernels run and take the format.
    fn candidates(format: MatrixFormat) -> (Self, Option<Self>) {
        #[cfg(target_arch = "x86_64")]
        if let (true, Some(vnni)) = (interleave::interleaves(format), kquant_x86::Avx512Vnni::detect()) {
            return (Self::Rows, Some(Self::Interleaved(vnni)));
        }
        let _ = format;
        (Self::Rows, None)
    }
}

/// Per K-quant format, the layout measured faster for decoding on this CPU
/// (`layout_choice`), once per process: which one streams weights from memory faster
/// differs between CPUs (on a Zen 4, Q4_K in file order), and both give the same bits, so
/// only speed rides on the choice.
static MEASURED_LAYOUTS: std::sync::Mutex<Vec<(MatrixFormat, Layout)>> = std::sync::Mutex::new(Vec::new());

/// Matrices smaller than this are not timed: their products are too short to compare.
const MIN_MEASURED_BYTES: usize = 256 << 10;

/// Of a larger matrix, about this many bytes of its first rows are timed.
const MAX_MEASURED_BYTES: usize = 4 << 20;

/// Bytes read between timed products so that each starts with the matrix out of every
/// cache, as a decoding step meets its weights.
const EVICTION_BYTES: usize = 64 << 20;

/// Timed products per layout; the fastest of each counts.
const MEASURED_RUNS: usize = 5;

/// How much faster rows must decode to be chosen.
const DECODE_MARGIN: f64 = 0.1;

/// The layout to keep `matrix` (in row layout) in: where there is a choice, rows in file
/// order if they multiplied one input row from memory clearly faster on the first large
/// enough matrix of its format (`MEASURED_LAYOUTS`; up to its first `MAX_MEASURED_BYTES`);
/// else, and until then, interleaved. Decoding is what memory bounds; prefill may lose a
/// little by it (on a Zen 4, Q4_K in rows decodes a Llama-3.2-1B shape 30% faster and
/// prefills it 13% slower).
fn layout_choice(matrix: &QuantMatrix) -> Layout {
    let (rows, Some(interleaved)) = Layout::candidates(matrix.format) else { return Layout::Rows };
    let mut measured = MEASURED_LAYOUTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(&(_, layout)) = measured.iter().find(|(format, _)| *format == matrix.format) {
        return layout;
    }
    // The 32-value formats interleaved prefill far faster (45% on the default model's
    // Q4_1) and are used by small models that stay in cache, where a cold timing misleads.
    if matrix.data.len() < MIN_MEASURED_BYTES || !matches!(matrix.format, MatrixFormat::K(_)) {
        return interleaved;
    }
    let row_bytes = matrix.data.len() / matrix.rows;
    let group = interleave::GROUP_ROWS;
    let rows_timed = (MAX_MEASURED_BYTES / row_bytes).max(group).min(matrix.rows) / group * group;
    if rows_timed == 0 {
        return interleaved;
    }
    let sample = QuantMatrix { rows: rows_timed, data: Arc::from(matrix.row_bytes(0..rows_timed)), ..matrix.clone() };
    let candidates = [sample.clone(), sample.with_layout(interleaved)];
    let eviction = vec![1u64; EVICTION_BYTES / 8];
    let x = vec![0.5f32; matrix.cols];
    let mut out = vec![0.0f32; rows_timed];
    let mut decode = [f64::INFINITY; 2];
    for _ in 0..MEASURED_RUNS {
        for (time, candidate) in decode.iter_mut().zip(&candidates) {
            std::hint::black_box(eviction.iter().sum::<u64>());
            let started = std::time::Instant::now();
            // On one thread: waking others would cost about what the product takes.
            product::multiply_into(candidate, &x, 1, 1, Isa::detect(), &mut out);
            *time = time.min(started.elapsed().as_secs_f64());
        }
    }
    // A close call keeps the interleaved rows, whose prefill is ahead on every format.
    let layout = if decode[0] < decode[1] * (1.0 - DECODE_MARGIN) { rows } else { interleaved };
    tracing::debug!(format = ?matrix.format, ?decode, ?layout, "timed a decoding product in each layout (rows, interleaved)");
    measured.push((matrix.format, layout));
    layout
}

impl QuantMatrix {
    /// Copies the blocks of a 2-D CPU tensor in a format these kernels handle; `None` for
    /// any other tensor.
    pub(crate) fn from_qtensor(qtensor: &QTensor) -> candle_core::Result<Option<Self>> {
        let Some(format) = MatrixFormat::from_ggml(qtensor.dtype()) else { return Ok(None) };
        let Ok((rows, cols)) = qtensor.shape().dims2() else { return Ok(None) };
        if !qtensor.device().is_cpu() || cols % format.block_values() != 0 {
            return Ok(None);
        }
        let data = qtensor.data()?;
        if data.len() != rows * (cols / format.block_values()) * format.block_bytes() {
            bail!("a {rows}x{cols} {format:?} matrix holds {} bytes", data.len());
        }
        Ok(Some(Self { format, rows, cols, layout: Layout::Rows, data: Arc::from(&*data) }))
    }

    /// A matrix of `format` from its blocks, in row layout.
    pub(crate) fn from_blocks(format: MatrixFormat, blocks: &[u8], rows: usize, cols: usize) -> candle_core::Result<Self> {
        if !cols.is_multiple_of(format.block_values())
            || blocks.len() != rows * (cols / format.block_values()) * format.block_bytes()
        {
            bail!("{} bytes are not a {rows}x{cols} {format:?} matrix", blocks.len());
        }
        Ok(Self { format, rows, cols, layout: Layout::Rows, data: Arc::from(blocks) })
    }

    /// `self` in the layout whose kernels are fastest on this CPU (`layout_choice`).
    pub(crate) fn with_best_layout(self) -> Self {
        let layout = layout_choice(&self);
        self.with_layout(layout)
    }

    /// `self` (in row layout) with its blocks rearranged into `layout`, in place unless a
    /// clone shares them.
    ///
    /// # Panics
    /// If `self` is not in row layout, or `layout` does not hold matrices of its format.
    pub(crate) fn with_layout(mut self, layout: Layout) -> Self {
        if layout == self.layout {
            return self;
        }
        assert_eq!(self.layout, Layout::Rows, "only a matrix in row layout is rearranged");
        match layout {
            Layout::Rows => {}
            #[cfg(target_arch = "x86_64")]
            Layout::Interleaved(_) => {
                if Arc::get_mut(&mut self.data).is_none() {
                    self.data = Arc::from(&*self.data);
                }
                let data = Arc::get_mut(&mut self.data).expect("an unshared copy");
                interleave::interleave(self.format, data, self.rows, self.cols / self.format.block_values());
            }
        }
        self.layout = layout;
        self
    }

    /// `x @ selfᵀ` for `x` of shape `(..., cols)` on the CPU: shape `(..., rows)`.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some((&cols, batch)) = x.dims().split_last() else {
            bail!("a matrix product needs at least a 1-D input")
        };
        if cols != self.cols {
            bail!("input of shape {:?} does not match a {}x{} matrix", x.dims(), self.rows, self.cols);
        }
        if !x.device().is_cpu() {
            bail!("quantized CPU matrix used with a {:?} input", x.device().location());
        }
        let dtype = x.dtype();
        // Both are no-ops (cheap handle clones) for the f32 contiguous inputs models pass.
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let m = batch.iter().product();
        let out = {
            let (storage, layout) = x.storage_and_layout();
            let Storage::Cpu(storage) = &*storage else { bail!("CPU tensor without CPU storage") };
            let Some((start, end)) = layout.contiguous_offsets() else { bail!("contiguous tensor with gaps") };
            self.product(&storage.as_slice::<f32>()?[start..end], m, threads::num_threads())
        };
        let mut shape = batch.to_vec();
        shape.push(self.rows);
        Tensor::from_vec(out, shape, &Device::Cpu)?.to_dtype(dtype)
    }

    /// The rows named by `ids`, dequantized to f32 exactly as ggml's `get_rows` does.
    pub(crate) fn embedding(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let ids_flat = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let mut out = Vec::with_capacity(ids_flat.len() * self.cols);
        self.embedding_into(&ids_flat, &mut out)?;
        let mut shape = ids.dims().to_vec();
        shape.push(self.cols);
        Tensor::from_vec(out, shape, &Device::Cpu)
    }

    /// [`QuantMatrix::embedding`] appended to `out`.
    pub(crate) fn embedding_into(&self, ids: &[u32], out: &mut Vec<f32>) -> candle_core::Result<()> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.rows) {
            bail!("row {id} is outside a matrix of {} rows", self.rows);
        }
        let start = out.len();
        out.resize(start + ids.len() * self.cols, 0.0);
        // Room for any rearranged block.
        let mut buffer = [0u8; MAX_INTERLEAVED_BLOCK_BYTES];
        for (&id, out) in ids.iter().zip(out[start..].chunks_exact_mut(self.cols)) {
            for (b, out) in out.chunks_exact_mut(self.format.block_values()).enumerate() {
                self.format.dequantize_block(self.block(id as usize, b, &mut buffer), out);
            }
        }
        Ok(())
    }

    /// Block `b` of row `row` as the file stores it: in place, or put back together in
    /// `buffer` if the layout rearranged it.
    fn block<'a>(&'a self, row: usize, b: usize, buffer: &'a mut [u8]) -> &'a [u8] {
        let bytes = self.format.block_bytes();
        match self.layout {
            #[cfg(target_arch = "x86_64")]
            Layout::Interleaved(_) if row < self.rows / GROUP_ROWS * GROUP_ROWS => {
                let first = row / GROUP_ROWS * GROUP_ROWS;
                let group = self.row_bytes(first..first + GROUP_ROWS);
                interleave::block_of(self.format, group, row - first, b, &mut buffer[..bytes]);
                &buffer[..bytes]
            }
            _ => &self.row_bytes(row..row + 1)[b * bytes..(b + 1) * bytes],
        }
    }

    /// `m` rows of `cols` values times this matrix, on up to `threads` threads: `m` rows of
    /// `rows` values.
    fn product(&self, x: &[f32], m: usize, threads: usize) -> Vec<f32> {
        product::multiply(self, x, m, threads, Isa::detect())
    }

    /// The bytes of `rows`; in an interleaved layout, `rows` must start and end on group
    /// boundaries (or at the matrix's end).
    fn row_bytes(&self, rows: Range<usize>) -> &[u8] {
        let row_bytes = self.cols / self.format.block_values() * self.format.block_bytes();
        &self.data[rows.start * row_bytes..rows.end * row_bytes]
    }
}

/// An instruction set with kernels here, vouched for by detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2(x86::Avx2),
    /// NEON: its own K-quant kernels, the portable ones for everything else so far.
    #[cfg(target_arch = "aarch64")]
    Neon(kquant_neon::Neon),
}

impl Isa {
    /// The best instruction set this CPU runs.
    // TODO(aarch64): NEON kernels for the 32-value formats and the other operations (sdot
    // for the group sums); the portable kernels are exact there, only slower.
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "aarch64")]
        if let Some(neon) = kquant_neon::Neon::detect() {
            return Self::Neon(neon);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = x86::Avx2::detect() {
            return Self::Avx2(avx2);
        }
        Self::Portable
    }

    /// Every instruction set this CPU runs, for tests that compare them.
    #[cfg(test)]
    pub(crate) fn all() -> Vec<Self> {
        #[allow(unused_mut)] // Only x86 and aarch64 add to it so far.
        let mut all = vec![Self::Portable];
        #[cfg(target_arch = "x86_64")]
        all.extend(x86::Avx2::detect().map(Self::Avx2));
        #[cfg(target_arch = "aarch64")]
        all.extend(kquant_neon::Neon::detect().map(Self::Neon));
        all
    }

    fn quantize_row(self, x: &[f32], out: &mut [Q8Block], with_sum: bool) {
        match self {
            Self::Portable => activation::quantize_row(x, out, with_sum),
            #[cfg(target_arch = "aarch64")]
            Self::Neon(_) => activation::quantize_row(x, out, with_sum),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(avx2) => avx2.quantize_row(x, out, with_sum),
        }
    }

    fn product_rows(
        self,
        format: format::WeightFormat,
        weights: &[u8],
        blocks: usize,
        acts: &[Q8Block],
        m: usize,
        out: &mut [f32],
    ) {
        match self {
            Self::Portable => portable::product_rows(format, weights, blocks, acts, m, out),
            #[cfg(target_arch = "aarch64")]
            Self::Neon(_) => portable::product_rows(format, weights, blocks, acts, m, out),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(avx2) => avx2.product_rows(format, weights, blocks, acts, m, out),
        }
    }

    /// BF16 weights times BF16 activations (`bf16.rs`); on x86, AVX512_BF16 where the CPU
    /// has it, else AVX2 computing the same bits.
    fn product_rows_bf16(self, weights: &[u8], cols: usize, acts: &[u16], m: usize, out: &mut [f32]) {
        match self {
            Self::Portable => bf16::product_rows(weights, cols, acts, m, out),
            #[cfg(target_arch = "aarch64")]
            Self::Neon(_) => bf16::product_rows(weights, cols, acts, m, out),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(avx2) => match bf16::x86::Avx512Bf16::detect() {
                Some(avx512) => avx512.product_rows(weights, cols, acts, m, out),
                None => bf16::x86::product_rows_avx2(avx2, weights, cols, acts, m, out),
            },
        }
    }

    /// [`Isa::product_rows`] for K-quant weights and Q8_K activations. (On x86, the AVX2
    /// entry point runs AVX-512 kernels where the CPU has AVX-512 with VNNI.)
    fn product_rows_k(self, kind: KQuant, weights: &[u8], blocks: usize, acts: &[Q8KBlock], m: usize, out: &mut [f32]) {
        match self {
            Self::Portable => kquant_portable::product_rows_k(kind, weights, blocks, acts, m, out),
            #[cfg(target_arch = "aarch64")]
            Self::Neon(neon) => neon.product_rows_k(kind, weights, blocks, acts, m, out),
            #[cfg(target_arch = "x86_64")]
            Self::Avx2(avx2) => avx2.product_rows_k(kind, weights, blocks, acts, m, out),
        }
    }
}
