//! GGUF headers, read here rather than by candle so that files holding tensor types
//! candle cannot represent (MXFP4, gpt-oss's expert format) open all the same.
//!
//! Only the header is parsed: metadata (as candle's [`Value`]s, which the tokenizer and
//! the chat template read), and each tensor's name, shape, type and offset. Every length
//! is bounded by the bytes left in the file before anything is allocated, as candle's
//! reader bounds them, so a malformed or hostile header is an error, never a panic or a
//! huge allocation.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};

use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

/// Caps as ggml's (`GGUF_MAX_*`, `GGML_MAX_DIMS`): a string or array this long is
/// refused, and so are values nested deeper than arrays of arrays can sensibly go.
const MAX_STRING_BYTES: u64 = 1 << 30;
const MAX_ARRAY_ELEMENTS: u64 = 1 << 30;
const MAX_TENSOR_DIMS: u32 = 4;
const MAX_VALUE_DEPTH: usize = 64;
const DEFAULT_ALIGNMENT: u64 = 32;

/// GGML's number for MXFP4 blocks (`GGML_TYPE_MXFP4`).
const MXFP4_TYPE: u32 = 39;

/// GGML's numbers (`ggml_type`) of the types candle has, every one of them.
const GGML_NUMBERS: [(u32, GgmlDType); 15] = [
    (0, GgmlDType::F32),
    (1, GgmlDType::F16),
    (2, GgmlDType::Q4_0),
    (3, GgmlDType::Q4_1),
    (6, GgmlDType::Q5_0),
    (7, GgmlDType::Q5_1),
    (8, GgmlDType::Q8_0),
    (9, GgmlDType::Q8_1),
    (10, GgmlDType::Q2K),
    (11, GgmlDType::Q3K),
    (12, GgmlDType::Q4K),
    (13, GgmlDType::Q5K),
    (14, GgmlDType::Q6K),
    (15, GgmlDType::Q8K),
    (30, GgmlDType::BF16),
];

/// Why a GGUF header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("tensor `{tensor}` is of GGML type {number}{}, which Hearth cannot read", type_name(*.number).map(|n| format!(" ({n})")).unwrap_or_default())]
    UnknownType { tensor: String, number: u32 },
    #[error("{0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

type Result<T> = std::result::Result<T, GgufError>;

fn malformed<T>(why: impl Into<String>) -> Result<T> {
    Err(GgufError::Malformed(why.into()))
}

/// The storage type of one tensor: one candle knows, or MXFP4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorType {
    Ggml(GgmlDType),
    /// 32 values per 17-byte block: an E8M0 exponent and 32 E2M1 values (OCP's MX format).
    Mxfp4,
}

impl From<GgmlDType> for TensorType {
    fn from(dtype: GgmlDType) -> Self {
        Self::Ggml(dtype)
    }
}

impl TensorType {
    /// The candle type, if candle has one.
    pub fn ggml(self) -> Option<GgmlDType> {
        match self {
            Self::Ggml(dtype) => Some(dtype),
            Self::Mxfp4 => None,
        }
    }

    /// GGML's number for the type, as GGUF stores it.
    pub fn number(self) -> u32 {
        match self {
            Self::Ggml(dtype) => GGML_NUMBERS.iter().find(|(_, d)| *d == dtype).map_or(u32::MAX, |(n, _)| *n),
            Self::Mxfp4 => MXFP4_TYPE,
        }
    }

    fn from_number(number: u32) -> Option<Self> {
        if number == MXFP4_TYPE {
            return Some(Self::Mxfp4);
        }
        GGML_NUMBERS.iter().find(|(n, _)| *n == number).map(|&(_, dtype)| Self::Ggml(dtype))
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            Self::Ggml(dtype) => dtype.block_size(),
            Self::Mxfp4 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Ggml(dtype) => dtype.type_size(),
            Self::Mxfp4 => 17,
        }
    }

    /// Whether values are stored one by one (F32, F16, BF16) rather than in quantized blocks.
    pub fn is_dense(self) -> bool {
        matches!(self, Self::Ggml(GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16))
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub kind: TensorType,
    /// Outermost dimension first, as candle orders them (GGUF stores them innermost first).
    pub dims: Vec<usize>,
    /// From the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> Option<u64> {
        self.dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64))
    }

    /// The tensor's bytes in the file, if they can be counted and are whole blocks.
    pub fn bytes(&self) -> Option<u64> {
        let elements = self.elements()?;
        let block = self.kind.block_values() as u64;
        (elements % block == 0).then(|| (elements / block).checked_mul(self.kind.block_bytes() as u64))?
    }
}

/// A parsed GGUF header.
#[derive(Debug)]
pub struct GgufHeader {
    pub metadata: HashMap<String, Value>,
    pub tensors: HashMap<String, TensorInfo>,
    /// Where the data section starts: the header's length, padded to the alignment.
    pub data_offset: u64,
}

/// GGUF's versions differ only in the width of lengths: v1's are 32-bit.
#[derive(Clone, Copy)]
struct Format {
    wide_lengths: bool,
}

struct HeaderReader<'a, R> {
    reader: &'a mut R,
    format: Format,
    /// The file's length: no length read may point past it.
    file_bytes: u64,
}

impl<R: Read + Seek> HeaderReader<'_, R> {
    fn remaining(&mut self) -> Result<u64> {
        Ok(self.file_bytes.saturating_sub(self.reader.stream_position()?))
    }

    fn bytes<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut bytes = [0u8; N];
        self.reader.read_exact(&mut bytes)?;
        Ok(bytes)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn length(&mut self) -> Result<u64> {
        if self.format.wide_lengths {
            self.u64()
        } else {
            Ok(self.u32()? as u64)
        }
    }

    fn string(&mut self) -> Result<String> {
        let len = self.length()?;
        if len > MAX_STRING_BYTES || len > self.remaining()? {
            return malformed(format!("a string of {len} bytes runs past the end of the file"));
        }
        let mut bytes = vec![0u8; len as usize];
        self.reader.read_exact(&mut bytes)?;
        // Some converters leave trailing NULs; ggml accepts invalid UTF-8 in values too.
        while bytes.last() == Some(&0) {
            bytes.pop();
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    fn value(&mut self, value_type: u32, depth: usize) -> Result<Value> {
        if depth > MAX_VALUE_DEPTH {
            return malformed(format!("values nested deeper than {MAX_VALUE_DEPTH}"));
        }
        Ok(match value_type {
            0 => Value::U8(self.bytes::<1>()?[0]),
            1 => Value::I8(self.bytes::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.bytes()?)),
            3 => Value::I16(i16::from_le_bytes(self.bytes()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.bytes()?)),
            6 => Value::F32(f32::from_le_bytes(self.bytes()?)),
            7 => match self.bytes::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return malformed(format!("a bool of value {b}")),
            },
            8 => Value::String(self.string()?),
            9 => {
                let element_type = self.u32()?;
                let len = self.length()?;
                // Each element takes at least a byte: a count past the file is a lie.
                if len > MAX_ARRAY_ELEMENTS || len > self.remaining()? {
                    return malformed(format!("an array of {len} elements runs past the end of the file"));
                }
                let mut values = Vec::new();
                for _ in 0..len {
                    values.push(self.value(element_type, depth + 1)?);
                }
                Value::Array(values)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.bytes()?)),
            12 => Value::F64(f64::from_le_bytes(self.bytes()?)),
            other => return malformed(format!("unknown metadata value type {other}")),
        })
    }
}

impl GgufHeader {
    /// Reads the header of the GGUF file `reader` holds from its start.
    pub fn read<R: Read + Seek>(reader: &mut R) -> Result<Self> {
        let file_bytes = reader.seek(SeekFrom::End(0))?;
        reader.seek(SeekFrom::Start(0))?;
        let mut header = HeaderReader { reader, format: Format { wide_lengths: true }, file_bytes };
        let magic = header.bytes::<4>()?;
        if &magic != b"GGUF" {
            return malformed(format!("not a GGUF file (it starts with {magic:02x?})"));
        }
        header.format = match header.u32()? {
            1 => Format { wide_lengths: false },
            2 | 3 => Format { wide_lengths: true },
            version => return malformed(format!("GGUF version {version}, which Hearth does not know")),
        };
        let tensor_count = header.length()?;
        let metadata_count = header.length()?;
        // A metadata entry takes at least 6 bytes, a tensor entry 17: counts past the file are lies.
        let needed = metadata_count.saturating_mul(6).saturating_add(tensor_count.saturating_mul(17));
        if needed > header.remaining()? {
            return malformed(format!(
                "the header claims {tensor_count} tensors and {metadata_count} metadata entries, more than the file holds"
            ));
        }
        let mut metadata = HashMap::new();
        for _ in 0..metadata_count {
            let key = header.string()?;
            let value_type = header.u32()?;
            let value = header.value(value_type, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = HashMap::new();
        for _ in 0..tensor_count {
            let name = header.string()?;
            let rank = header.u32()?;
            if rank > MAX_TENSOR_DIMS {
                return malformed(format!("tensor `{name}` has {rank} dimensions, more than {MAX_TENSOR_DIMS}"));
            }
            let mut dims = Vec::with_capacity(rank as usize);
            for _ in 0..rank {
                let dim = header.length()?;
                dims.push(usize::try_from(dim).map_err(|_| GgufError::Malformed(format!("tensor `{name}` is too large")))?);
            }
            dims.reverse();
            let number = header.u32()?;
            let kind = TensorType::from_number(number).ok_or_else(|| GgufError::UnknownType { tensor: name.clone(), number })?;
            let offset = header.u64()?;
            let info = TensorInfo { kind, dims, offset };
            if info.bytes().is_none() {
                return malformed(format!("tensor `{name}` of shape {:?} is not a countable number of blocks", info.dims));
            }
            tensors.insert(name, info);
        }
        let alignment = match metadata.get("general.alignment") {
            Some(Value::U8(v)) => *v as u64,
            Some(Value::U16(v)) => *v as u64,
            Some(Value::U32(v)) => *v as u64,
            Some(Value::U64(v)) => *v,
            Some(Value::I32(v)) if *v > 0 => *v as u64,
            None => DEFAULT_ALIGNMENT,
            Some(other) => return malformed(format!("`general.alignment` holds {other:?}")),
        };
        if alignment == 0 {
            return malformed("an alignment of 0");
        }
        let end = header.reader.stream_position()?;
        let data_offset = end
            .checked_next_multiple_of(alignment)
            .ok_or_else(|| GgufError::Malformed("the data section starts past any offset".into()))?;
        Ok(Self { metadata, tensors, data_offset })
    }

    /// The bytes of tensor `name`, as the file stores them.
    pub fn tensor_bytes<R: Read + Seek>(&self, reader: &mut R, name: &str) -> Result<(&TensorInfo, Vec<u8>)> {
        let Some(info) = self.tensors.get(name) else {
            return malformed(format!("the file has no tensor `{name}`"));
        };
        let bytes = info.bytes().ok_or_else(|| GgufError::Malformed(format!("tensor `{name}` is too large")))?;
        let start = self.data_offset.checked_add(info.offset);
        let file_bytes = reader.seek(SeekFrom::End(0))?;
        match start.and_then(|start| start.checked_add(bytes)) {
            Some(end) if end <= file_bytes => {}
            _ => return malformed(format!("tensor `{name}` runs past the end of the file ({file_bytes} bytes)")),
        }
        let mut data = vec![0u8; bytes as usize];
        reader.seek(SeekFrom::Start(self.data_offset + info.offset))?;
        reader.read_exact(&mut data)?;
        Ok((info, data))
    }

    /// Tensor `name` as a candle tensor on `device`; MXFP4 tensors have none (see
    /// `kernels::mxfp4`).
    pub fn qtensor<R: Read + Seek>(&self, reader: &mut R, name: &str, device: &Device) -> crate::Result<QTensor> {
        let (info, data) = self.tensor_bytes(reader, name).map_err(|e| crate::Error::InvalidModel(e.to_string()))?;
        match info.kind {
            TensorType::Ggml(dtype) => Ok(qtensor_from_ggml(dtype, &data, info.dims.clone(), device)?),
            TensorType::Mxfp4 => {
                Err(crate::Error::InvalidModel(format!("tensor `{name}` is MXFP4, which is read as a matrix only")))
            }
        }
    }
}

/// The names of the GGML tensor types Hearth cannot read, by their number in GGUF files.
fn type_name(number: u32) -> Option<&'static str> {
    Some(match number {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        40 => "NVFP4",
        _ => return None,
    })
}
