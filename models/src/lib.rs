//! Llama-family decoders, dense and mixture-of-experts, over candle, loadable as any contiguous range of layers.
//!
//! A [`Stage`] holds the layers `start..end` of a model (plus the token embedding if it
//! is the first stage, and the final norm and LM head if it is the last). The whole model
//! is simply the one stage that holds every layer.

mod error;
mod kernels;
mod latent_attention;
mod moe;

pub mod chat_template;
pub mod config;
pub mod gguf;
pub mod sampling;
pub mod source;
pub mod stage;
pub mod synthetic;
pub mod tokenizer;

#[doc(hidden)]
pub use kernels::BenchMatrix;
pub use config::{Architecture, ModelConfig, MoeConfig};
pub use error::{Error, Result};
pub use source::{FileLayout, ModelFootprint, ModelSource};
pub use stage::{ComputePath, Stage, StageCache, StageInput, StageOutput};
