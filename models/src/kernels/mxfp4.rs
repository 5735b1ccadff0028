//! MXFP4 (gpt-oss's expert weights) outside the native kernels: the reference
//! quantizer, plain dequantization, and the matrices of candle's path.
//!
//! candle has no MXFP4 type, so on its path (Metal, CUDA) a matrix keeps the file's
//! 17-byte blocks on the device as bytes, and each product first expands them with two
//! table lookups (`index_select`, which every backend has): one for the pair of values
//! each byte of nibbles holds, one for each block's scale. The weights stay at 4.25 bits
//! each in memory; the cost is one dequantization per product, which for experts is one
//! per chosen expert per step.

use candle_core::{DType, Device, Tensor};

use super::format::{e8m0_half, WeightFormat, BLOCK, MXFP4_VALUES};

const BLOCK_BYTES: usize = 17;

/// `values` (a multiple of 32 long) as MXFP4 blocks, as ggml's `quantize_row_mxfp4_ref`
/// writes them: each block's exponent from its largest magnitude, each value the nearest
/// of the sixteen (the first on ties).
pub fn quantize_mxfp4(values: &[f32]) -> Vec<u8> {
    assert!(values.len().is_multiple_of(BLOCK), "MXFP4 holds whole blocks of 32 values");
    let mut out = Vec::with_capacity(values.len() / BLOCK * BLOCK_BYTES);
    for block in values.chunks_exact(BLOCK) {
        let amax = block.iter().fold(0.0f32, |m, v| if m < v.abs() { v.abs() } else { m });
        let e = if amax > 0.0 { (amax.log2().floor() - 2.0 + 127.0) as u8 } else { 0 };
        let d = e8m0_half(e);
        let nearest = |x: f32| {
            let mut best = (0, (MXFP4_VALUES[0] as f32 * d - x).abs());
            for (i, &v) in MXFP4_VALUES.iter().enumerate().skip(1) {
                let error = (v as f32 * d - x).abs();
                if error < best.1 {
                    best = (i, error);
                }
            }
            best.0 as u8
        };
        out.push(e);
        out.extend((0..BLOCK / 2).map(|j| nearest(block[j]) | (nearest(block[j + BLOCK / 2]) << 4)));
    }
    out
}

/// The values of MXFP4 `blocks`, as ggml's `dequantize_row_mxfp4`.
pub(crate) fn dequantize_mxfp4(blocks: &[u8]) -> Vec<f32> {
    let mut out = vec![0.0; blocks.len() / BLOCK_BYTES * BLOCK];
    for (block, out) in blocks.chunks_exact(BLOCK_BYTES).zip(out.chunks_exact_mut(BLOCK)) {
        WeightFormat::Mxfp4.dequantize_block(block, out);
    }
    out
}

/// An MXFP4 matrix on candle's path: its blocks on the device, expanded for each product.
#[derive(Clone)]
pub(crate) struct DeviceMxfp4 {
    /// `(rows * cols / 32, 17)` bytes: each block's exponent, then its 16 bytes of nibbles.
    blocks: Tensor,
    rows: usize,
    cols: usize,
    /// `(256, 2)`: the values of a byte's low and high nibbles.
    pair_values: Tensor,
    /// `(256,)`: each exponent's scale.
    scales: Tensor,
}

impl DeviceMxfp4 {
    pub(crate) fn new(blocks: &[u8], rows: usize, cols: usize, device: &Device) -> candle_core::Result<Self> {
        if !cols.is_multiple_of(BLOCK) || blocks.len() != rows * cols / BLOCK * BLOCK_BYTES {
            candle_core::bail!("{} bytes are not a {rows}x{cols} MXFP4 matrix", blocks.len());
        }
        let count = blocks.len() / BLOCK_BYTES;
        let pairs: Vec<f32> = (0..=255u8)
            .flat_map(|b| [MXFP4_VALUES[(b & 0x0F) as usize] as f32, MXFP4_VALUES[(b >> 4) as usize] as f32])
            .collect();
        let scales: Vec<f32> = (0..=255u8).map(e8m0_half).collect();
        Ok(Self {
            blocks: Tensor::from_slice(blocks, (count, BLOCK_BYTES), device)?,
            rows,
            cols,
            pair_values: Tensor::from_vec(pairs, (256, 2), device)?,
            scales: Tensor::from_vec(scales, 256, device)?,
        })
    }

    /// The whole matrix in `dtype`, `(rows, cols)`. Values times scales are exact in f32
    /// (small integers times powers of two), so this is `dequantize_mxfp4` to the bit.
    pub(crate) fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let count = self.blocks.dim(0)?;
        // As u32: candle's `index_select` takes a u8 index of 255 for a missing row.
        let nibbles = self.blocks.narrow(1, 1, BLOCK / 2)?.flatten_all()?.to_dtype(DType::U32)?;
        // Byte j of a block holds values j (low nibble) and j + 16 (high).
        let values = self
            .pair_values
            .index_select(&nibbles, 0)?
            .reshape((count, BLOCK / 2, 2))?
            .transpose(1, 2)?
            .reshape((count, BLOCK))?;
        let exponents = self.blocks.narrow(1, 0, 1)?.flatten_all()?.to_dtype(DType::U32)?;
        let scales = self.scales.index_select(&exponents, 0)?.unsqueeze(1)?;
        values.broadcast_mul(&scales)?.reshape((self.rows, self.cols))?.to_dtype(dtype)
    }

    /// `x @ selfᵀ` for `x` of shape `(..., cols)`.
    pub(crate) fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let Some((&cols, batch)) = x.dims().split_last() else { candle_core::bail!("a product needs a 1-D input at least") };
        if cols != self.cols {
            candle_core::bail!("input of shape {:?} does not match a {}x{} matrix", x.dims(), self.rows, self.cols);
        }
        let weights = self.dequantize(x.dtype())?;
        let rows: usize = batch.iter().product();
        let y = x.reshape((rows, cols))?.matmul(&weights.t()?)?;
        let mut shape = batch.to_vec();
        shape.push(self.rows);
        y.reshape(shape)
    }

    /// The rows named by `ids`, dequantized: shape `ids.dims() + (cols,)`.
    pub(crate) fn embedding(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let rows = self.dequantize(DType::F32)?.index_select(&ids.flatten_all()?, 0)?;
        let mut shape = ids.dims().to_vec();
        shape.push(self.cols);
        rows.reshape(shape)
    }
}
