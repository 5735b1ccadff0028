//! Generation on a model loaded in this process (for `hearth generate` and `hearth bench`),
//! and the types every generation shares, wherever its stages run.

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use candle_core::{Device, Tensor};
use hearth_models::chat_template::ChatMessage;
use hearth_models::sampling::{Sampler, SamplingParams, StopMatcher};
use hearth_models::tokenizer::Tokenizer;

use crate::holder::ModelInfo;
use hearth_models::{ModelSource, Stage, StageCache, StageInput, StageOutput};
use tokio::sync::mpsc;

/// A model loaded for generation in this process: its stages, tokenizer and chat template.
pub struct Model {
    info: ModelInfo,
    stages: Vec<Stage>,
}

impl Model {
    /// Loads every layer of `source` on `device` as a single stage.
    pub fn load(source: &ModelSource, device: &Device) -> anyhow::Result<Self> {
        let info = ModelInfo::from_source(source)?;
        let layers = 0..source.config().num_layers;
        let stage = source.load_stage(layers, device).context("loading the model's layers")?;
        Ok(Self { info, stages: vec![stage] })
    }

    /// The name clients use for this model.
    pub fn id(&self) -> &str {
        &self.info.id
    }

    pub fn context_length(&self) -> usize {
        self.info.context_length
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.info.tokenizer
    }

    /// Renders a conversation with the model's chat template, ready for the assistant's turn.
    pub fn render_chat(&self, messages: &[ChatMessage]) -> hearth_models::Result<String> {
        self.info.chat_template.render(messages, true)
    }

    /// Generates a continuation of `request.prompt`, passing the text of each token to
    /// `on_text` as soon as it is final (possibly empty, so a caller can cancel at any token
    /// by returning `Break`).
    pub fn generate(
        &self,
        request: &Generation,
        counters: &Counters,
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> anyhow::Result<Outcome> {
        let started = Instant::now();
        let mut caches: Vec<StageCache> = self.stages.iter().map(Stage::new_cache).collect();
        let mut sampler = Sampler::new(request.sampling);
        let mut text = self.info.tokenizer.decode_stream();
        let mut stops = StopMatcher::new(request.stop.clone());
        let stop_ids = self.info.tokenizer.stop_token_ids();

        let mut logits = self.forward(&request.prompt, &mut caches)?;
        let mut first_token_at = None;
        let mut completion_tokens = 0;
        let finish = loop {
            let token = with_host_slice(&logits, |l| sampler.sample(l))?;
            completion_tokens += 1;
            counters.generated_tokens.fetch_add(1, Ordering::Relaxed);
            first_token_at.get_or_insert_with(Instant::now);
            if stop_ids.contains(&token) {
                break FinishReason::Stop;
            }
            if let Some(piece) = text.step(token)? {
                let status = stops.push(&piece);
                if on_text(&status.emit).is_break() {
                    break FinishReason::Cancelled;
                }
                if status.stopped {
                    break FinishReason::Stop;
                }
            } else if on_text("").is_break() {
                break FinishReason::Cancelled;
            }
            if completion_tokens >= request.max_tokens {
                break FinishReason::Length;
            }
            logits = self.forward(&[token], &mut caches)?;
        };
        if finish != FinishReason::Cancelled {
            let rest = stops.flush();
            if !rest.is_empty() {
                // The client may have left at the very end; the outcome is the same.
                let _ = on_text(&rest);
            }
        }
        let first_token_at = first_token_at.unwrap_or_else(Instant::now);
        Ok(Outcome {
            finish,
            prompt_tokens: request.prompt.len(),
            completion_tokens,
            time_to_first_token: first_token_at - started,
            decode_time: first_token_at.elapsed(),
        })
    }

    /// Greedy decoding with no stop conditions, timed: prefill of `prompt`, then `tokens`
    /// sampled tokens. For benchmarks.
    pub fn timed_run(&self, prompt: &[u32], tokens: usize) -> anyhow::Result<Timings> {
        let mut caches: Vec<StageCache> = self.stages.iter().map(Stage::new_cache).collect();
        let mut sampler = Sampler::new(SamplingParams::greedy());
        let started = Instant::now();
        let mut logits = self.forward(prompt, &mut caches)?;
        let prefill = started.elapsed();
        let mut token = with_host_slice(&logits, |l| sampler.sample(l))?;
        let first_token = started.elapsed() - prefill;
        let decode_started = Instant::now();
        for _ in 1..tokens {
            logits = self.forward(&[token], &mut caches)?;
            token = with_host_slice(&logits, |l| sampler.sample(l))?;
        }
        Ok(Timings { prefill, first_token, decode: decode_started.elapsed() })
    }

    /// Runs new positions through every stage in order and returns the logits of the last.
    fn forward(&self, tokens: &[u32], caches: &mut [StageCache]) -> anyhow::Result<Tensor> {
        let mut hidden: Option<Tensor> = None;
        for (stage, cache) in self.stages.iter().zip(caches.iter_mut()) {
            let input = match &hidden {
                None => StageInput::Tokens(tokens),
                Some(h) => StageInput::Hidden(h),
            };
            match stage.forward(input, cache)? {
                StageOutput::Hidden(h) => hidden = Some(h),
                StageOutput::Logits(logits) => return Ok(logits),
            }
        }
        anyhow::bail!("the pipeline's last stage produced no logits")
    }
}

/// Calls `f` on a 1-D f32 tensor's values, borrowing them in place when they are on the CPU.
pub(crate) fn with_host_slice<R>(tensor: &Tensor, f: impl FnOnce(&[f32]) -> R) -> anyhow::Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(values)), Some((start, end))) =
        (&*storage, layout.contiguous_offsets())
    {
        return Ok(f(&values[start..end]));
    }
    drop(storage);
    Ok(f(&tensor.to_vec1::<f32>()?))
}

/// Where the time of a [`Model::timed_run`] went.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub prefill: Duration,
    /// Sampling the first token after the prefill.
    pub first_token: Duration,
    /// Every later token: one forward pass and one sample each.
    pub decode: Duration,
}

/// One generation request, already tokenized and validated.
#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-turn token or a stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The client went away.
    Cancelled,
}

impl FinishReason {
    pub fn as_openai(self) -> &'static str {
        match self {
            Self::Stop | Self::Cancelled => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub time_to_first_token: Duration,
    /// From the first token to the last.
    pub decode_time: Duration,
}

/// What a running generation reports to whoever asked for it.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done(Outcome),
    Failed(String),
}

/// Live figures for `/health`.
#[derive(Debug, Default)]
pub struct Counters {
    pub generated_tokens: AtomicU64,
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
}

/// Waits for a submitted generation to finish and returns its whole text.
pub async fn collect(mut events: mpsc::Receiver<Event>) -> anyhow::Result<(String, Outcome)> {
    let mut text = String::new();
    while let Some(event) = events.recv().await {
        match event {
            Event::Text(piece) => text.push_str(&piece),
            Event::Done(outcome) => return Ok((text, outcome)),
            Event::Failed(message) => anyhow::bail!(message),
        }
    }
    anyhow::bail!("the engine stopped before the generation finished")
}
