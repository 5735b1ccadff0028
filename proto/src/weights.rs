//! The messages of `Pipeline.FetchWeights`, which gives a joining node its model file's
//! header and its stage's weights.
//!
//! Validation checks that a chunk is well formed and lies within its tensor; checking
//! its digest against its data, and the tensor against the model, is the receiver's
//! job, since only it knows the model.

use std::ops::Range;

use bytes::Bytes;

use crate::error::check_len_range;
use crate::limits::Limits;
use crate::pb;
use crate::FrameError;

/// The longest model or tensor name, in bytes.
pub const MAX_NAME_BYTES: usize = 512;

/// The most tensor names one request may list.
pub const MAX_REQUESTED_TENSORS: usize = 4096;

/// The length of a SHA-256 digest.
pub const SHA256_LEN: usize = 32;

/// The name the chunks of a model file's header travel under. GGUF tensor names never
/// hold `<`, so it names no tensor.
pub const HEADER_NAME: &str = "<header>";

/// The largest model file header a node accepts, in bytes: the header holds the whole
/// tokenizer, a few MiB for the largest vocabularies; this leaves ample room.
pub const MAX_HEADER_BYTES: u64 = 64 << 20;

/// What a weight request asks for; see [`pb::WeightRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightRequest {
    /// The model, as the cluster names it.
    pub model: String,
    pub part: WeightPart,
}

/// The part of a model a [`WeightRequest`] asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightPart {
    /// The model file's header: everything before the data section.
    Header,
    /// The tensors of one stage.
    Stage {
        /// The stage's layers; never empty.
        layers: Range<u32>,
        /// If not empty, only these tensors of the stage.
        tensors: Vec<String>,
    },
}

impl WeightRequest {
    pub fn from_wire(request: pb::WeightRequest) -> Result<Self, FrameError> {
        let pb::WeightRequest { model, layer_start, layer_end, tensors, header } = request;
        check_len_range("model name", model.len(), 1, MAX_NAME_BYTES)?;
        if header {
            if layer_start != 0 || layer_end != 0 || !tensors.is_empty() {
                return Err(FrameError::HeaderWithStage);
            }
            return Ok(Self { model, part: WeightPart::Header });
        }
        if layer_start >= layer_end {
            return Err(FrameError::EmptyLayerRange { start: layer_start, end: layer_end });
        }
        if tensors.len() > MAX_REQUESTED_TENSORS {
            return Err(FrameError::TooMany {
                what: "tensor names",
                got: tensors.len() as u64,
                max: MAX_REQUESTED_TENSORS as u64,
            });
        }
        for tensor in &tensors {
            check_len_range("tensor name", tensor.len(), 1, MAX_NAME_BYTES)?;
        }
        Ok(Self { model, part: WeightPart::Stage { layers: layer_start..layer_end, tensors } })
    }

    pub fn into_wire(self) -> pb::WeightRequest {
        let Self { model, part } = self;
        match part {
            WeightPart::Header => pb::WeightRequest { model, header: true, ..Default::default() },
            WeightPart::Stage { layers, tensors } => pb::WeightRequest {
                model,
                layer_start: layers.start,
                layer_end: layers.end,
                tensors,
                header: false,
            },
        }
    }
}

/// A contiguous piece of one tensor's bytes; see [`pb::WeightChunk`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightChunk {
    pub tensor: String,
    /// Where `data` starts in the tensor's bytes.
    pub offset: u64,
    /// The length of the whole tensor in bytes: a claim, to check against the model's
    /// own metadata before allocating anything by it.
    pub tensor_size: u64,
    pub data: Bytes,
    /// SHA-256 of `data`, not yet compared with it.
    pub sha256: [u8; SHA256_LEN],
}

impl WeightChunk {
    pub fn from_wire(chunk: pb::WeightChunk, limits: &Limits) -> Result<Self, FrameError> {
        let pb::WeightChunk { tensor, offset, tensor_size, data, sha256 } = chunk;
        check_len_range("tensor name", tensor.len(), 1, MAX_NAME_BYTES)?;
        if data.len() > limits.max_chunk_bytes {
            return Err(FrameError::TooLarge {
                what: "weight chunk",
                bytes: data.len(),
                max: limits.max_chunk_bytes,
            });
        }
        match offset.checked_add(data.len() as u64) {
            Some(end) if end <= tensor_size => {}
            _ => {
                return Err(FrameError::ChunkOutOfBounds {
                    offset,
                    len: data.len(),
                    size: tensor_size,
                })
            }
        }
        if data.is_empty() && tensor_size > 0 {
            return Err(FrameError::EmptyChunk);
        }
        let sha256 =
            <[u8; SHA256_LEN]>::try_from(&sha256[..]).map_err(|_| FrameError::WrongLength {
                field: "SHA-256 digest",
                got: sha256.len(),
                expected: SHA256_LEN,
            })?;
        Ok(Self { tensor, offset, tensor_size, data, sha256 })
    }

    pub fn into_wire(self) -> pb::WeightChunk {
        let Self { tensor, offset, tensor_size, data, sha256 } = self;
        pb::WeightChunk {
            tensor,
            offset,
            tensor_size,
            data,
            sha256: Bytes::copy_from_slice(&sha256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk() -> pb::WeightChunk {
        pb::WeightChunk {
            tensor: "model.layers.0.mlp.up_proj.weight".into(),
            offset: 96,
            tensor_size: 128,
            data: Bytes::from(vec![7; 32]),
            sha256: Bytes::from(vec![0; SHA256_LEN]),
        }
    }

    fn refuse(chunk: pb::WeightChunk) -> FrameError {
        WeightChunk::from_wire(chunk, &Limits::default()).unwrap_err()
    }

    #[test]
    fn chunks_round_trip() {
        let chunk = WeightChunk::from_wire(chunk(), &Limits::default()).unwrap();
        assert_eq!(
            WeightChunk::from_wire(chunk.clone().into_wire(), &Limits::default()),
            Ok(chunk)
        );
        let empty_tensor =
            pb::WeightChunk { offset: 0, tensor_size: 0, data: Bytes::new(), ..self::chunk() };
        assert!(WeightChunk::from_wire(empty_tensor, &Limits::default()).is_ok());
    }

    #[test]
    fn refuses_malformed_chunks() {
        assert_eq!(
            refuse(pb::WeightChunk { sha256: Bytes::from_static(&[0; 20]), ..chunk() }),
            FrameError::WrongLength { field: "SHA-256 digest", got: 20, expected: 32 }
        );
        assert_eq!(
            refuse(pb::WeightChunk { offset: 97, ..chunk() }),
            FrameError::ChunkOutOfBounds { offset: 97, len: 32, size: 128 }
        );
        assert_eq!(
            refuse(pb::WeightChunk { offset: u64::MAX, ..chunk() }),
            FrameError::ChunkOutOfBounds { offset: u64::MAX, len: 32, size: 128 }
        );
        assert_eq!(
            refuse(pb::WeightChunk { data: Bytes::new(), ..chunk() }),
            FrameError::EmptyChunk
        );
        assert!(matches!(
            refuse(pb::WeightChunk { tensor: String::new(), ..chunk() }),
            FrameError::LengthOutOfRange { field: "tensor name", got: 0, .. }
        ));
        let limits = Limits { max_chunk_bytes: 16, ..Limits::default() };
        assert_eq!(
            WeightChunk::from_wire(chunk(), &limits),
            Err(FrameError::TooLarge { what: "weight chunk", bytes: 32, max: 16 })
        );
    }

    #[test]
    fn requests_round_trip_and_are_checked() {
        let stage = |layers, tensors| WeightRequest {
            model: "smollm2".into(),
            part: WeightPart::Stage { layers, tensors },
        };
        let request = stage(4..9, vec![]);
        assert_eq!(WeightRequest::from_wire(request.clone().into_wire()), Ok(request));
        let header = WeightRequest { model: "smollm2".into(), part: WeightPart::Header };
        assert_eq!(WeightRequest::from_wire(header.clone().into_wire()), Ok(header));

        let wire = |layer_start, layer_end, tensors: Vec<String>| pb::WeightRequest {
            model: "smollm2".into(),
            layer_start,
            layer_end,
            tensors,
            header: false,
        };
        assert_eq!(
            WeightRequest::from_wire(wire(3, 3, vec![])),
            Err(FrameError::EmptyLayerRange { start: 3, end: 3 })
        );
        assert_eq!(
            WeightRequest::from_wire(wire(0, 1, vec!["t".into(); MAX_REQUESTED_TENSORS + 1])),
            Err(FrameError::TooMany { what: "tensor names", got: 4097, max: 4096 })
        );
        assert!(matches!(
            WeightRequest::from_wire(wire(0, 1, vec!["x".repeat(MAX_NAME_BYTES + 1)])),
            Err(FrameError::LengthOutOfRange { field: "tensor name", got: 513, .. })
        ));
        assert!(matches!(
            WeightRequest::from_wire(pb::WeightRequest {
                model: String::new(),
                ..wire(0, 1, vec![])
            }),
            Err(FrameError::LengthOutOfRange { field: "model name", .. })
        ));
        // A header request names nothing else: which of the two was meant is unclear.
        for confused in [wire(0, 1, vec![]), wire(0, 0, vec!["blk.0.attn_q.weight".into()])] {
            assert_eq!(
                WeightRequest::from_wire(pb::WeightRequest { header: true, ..confused }),
                Err(FrameError::HeaderWithStage)
            );
        }
    }
}
