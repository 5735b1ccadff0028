//! The node that holds a request: it tokenizes the prompt, sends it into the pipeline,
//! and turns the tokens that come back into text, stopping where the request says.
//!
//! Any node can hold requests, whether or not it runs a stage. The holder keeps the prompt
//! and every token generated so far, which is all it needs to replay a request on a new
//! plan.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_models::chat_template::{ChatMessage, ChatTemplate};
use hearth_models::sampling::StopMatcher;
use hearth_models::tokenizer::Tokenizer;
use hearth_proto::frame::{
    ErrorCode, Expect, FinishReason as WireFinish, Generation as WireGeneration, Prefill, Reset, Sampling, StageFrame,
};
use hearth_proto::{pb, Limits};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::{AuthedChannel, Credentials};
use crate::engine::{Counters, Event, FinishReason, Generation, Outcome};

/// Sequences one holder keeps in the pipeline at once; more wait in the queue.
const MAX_ACTIVE: usize = 8;
/// Requests that may wait before new ones are turned away with 429.
const QUEUE_CAPACITY: usize = 64;
/// How long a request waits for the cluster to have a ready plan.
const PLAN_WAIT: Duration = Duration::from_secs(10);
/// After a failure, how long a request waits for a newer plan before retrying the old one.
const REPLAN_WAIT: Duration = Duration::from_secs(3);
/// Tries of one request (the first and its replays) before it fails.
const MAX_ATTEMPTS: usize = 6;

/// Where a request stands: all a replay needs.
struct Progress<'a> {
    generated: Vec<u32>,
    /// The sampler's position in its random stream after the last generated token.
    word_pos: u128,
    text: hearth_models::tokenizer::TextStream<'a>,
    stops: StopMatcher,
    first_token_at: Option<Instant>,
}

/// The pipeline requests go through: the plan's epoch, and which node its first stage
/// is and where it listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub epoch: u64,
    /// The first stage's node id, which whatever answers at `first_stage` must prove.
    pub first_node: String,
    pub first_stage: SocketAddr,
    /// How often the path to the first stage has failed over: tokens on their way over a
    /// failed path are lost, so a request in flight is replayed when this changes.
    pub failovers: u64,
}

/// A link of the pipeline moved to another path after its own failed, or a new plan's
/// first stage listens elsewhere: the request is replayed at once on the plan in force.
#[derive(Debug, thiserror::Error)]
#[error("a link of the pipeline failed over to another path, or the first stage moved")]
struct PathFailedOver;

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is busy: {0} requests are already waiting")]
    QueueFull(usize),
}

/// What a request needs from the model, known without loading any layer.
pub struct ModelInfo {
    pub id: String,
    pub context_length: usize,
    pub hidden_size: usize,
    pub vocab_size: usize,
    pub tokenizer: Tokenizer,
    pub chat_template: ChatTemplate,
}

impl ModelInfo {
    /// Reads what requests need from an opened model, without loading any layer. A model
    /// that ships no chat template gets ChatML.
    pub fn from_source(source: &hearth_models::ModelSource) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let tokenizer = source.tokenizer().context("building the tokenizer")?;
        let chat_template = match source.chat_template(&tokenizer).context("reading the chat template")? {
            Some(template) => template,
            None => {
                tracing::warn!("the model ships no chat template; using ChatML");
                ChatTemplate::chatml()
            }
        };
        let config = source.config();
        Ok(Self {
            id: source.name().to_string(),
            context_length: config.context_length,
            hidden_size: config.hidden_size,
            vocab_size: config.vocab_size,
            tokenizer,
            chat_template,
        })
    }
}

/// A cheap handle through which the API submits requests.
#[derive(Clone)]
pub struct Holder {
    inner: Arc<Inner>,
}

struct Inner {
    model: ModelInfo,
    counters: Counters,
    routes: watch::Receiver<Option<Route>>,
    slots: Semaphore,
    limits: Limits,
    /// One HTTP/2 connection per first stage (node and address), shared by all requests.
    channels: Mutex<HashMap<(String, SocketAddr), Arc<AuthedChannel>>>,
    /// With a cluster key: what this node proves itself to the first stage with.
    credentials: Option<Arc<Credentials>>,
}

impl Holder {
    /// `routes` carries the current ready plan, or `None` while there is none.
    /// `credentials` (with a cluster key) are what this node shakes hands with.
    pub fn new(
        model: ModelInfo,
        routes: watch::Receiver<Option<Route>>,
        limits: Limits,
        credentials: Option<Arc<Credentials>>,
    ) -> Self {
        let inner = Inner {
            model,
            counters: Counters::default(),
            routes,
            slots: Semaphore::new(MAX_ACTIVE),
            limits,
            channels: Mutex::new(HashMap::new()),
            credentials,
        };
        Self { inner: Arc::new(inner) }
    }

    pub fn model_id(&self) -> &str {
        &self.inner.model.id
    }

    pub fn context_length(&self) -> usize {
        self.inner.model.context_length
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.model.tokenizer
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    pub fn render_chat(&self, messages: &[ChatMessage]) -> hearth_models::Result<String> {
        self.inner.model.chat_template.render(messages, true)
    }

    /// Queues a generation; its events arrive on the returned channel. Dropping the
    /// receiver cancels the generation.
    pub fn submit(&self, request: Generation) -> Result<mpsc::Receiver<Event>, SubmitError> {
        let counters = &self.inner.counters;
        if counters.queued.fetch_add(1, Ordering::Relaxed) >= QUEUE_CAPACITY {
            counters.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(SubmitError::QueueFull(QUEUE_CAPACITY));
        }
        let (events, receiver) = mpsc::channel(256);
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let permit = inner.slots.acquire().await;
            inner.counters.queued.fetch_sub(1, Ordering::Relaxed);
            let Ok(_permit) = permit else { return };
            if events.is_closed() {
                return;
            }
            inner.counters.active.fetch_add(1, Ordering::Relaxed);
            let event = match inner.run(&request, &events).await {
                Ok(outcome) => {
                    log_outcome(&outcome);
                    Event::Done(outcome)
                }
                Err(error) => {
                    tracing::error!("generation failed: {error:#}");
                    Event::Failed(format!("{error:#}"))
                }
            };
            inner.counters.active.fetch_sub(1, Ordering::Relaxed);
            let _ = events.send(event).await;
        });
        Ok(receiver)
    }
}

impl Inner {
    /// Drives one request to its end. When the pipeline fails under it (a stage dies, the
    /// plan changes), the request is replayed on the next plan: the prompt goes in again,
    /// then the tokens generated so far are forced (each run as the decoding step it was,
    /// so the computation is the original one, but sent down the pipeline together: see
    /// `ActivationFrame.steps`), and sampling resumes where it stopped, so the client sees
    /// exactly the tokens it would have seen without the fault.
    async fn run(&self, request: &Generation, events: &mpsc::Sender<Event>) -> anyhow::Result<Outcome> {
        let started = Instant::now();
        anyhow::ensure!(
            request.prompt.len() <= self.limits.max_positions,
            "prompts longer than {} tokens are not supported yet",
            self.limits.max_positions
        );
        let mut progress = Progress {
            generated: Vec::new(),
            word_pos: 0,
            text: self.model.tokenizer.decode_stream(),
            stops: StopMatcher::new(request.stop.clone()),
            first_token_at: None,
        };
        let mut failed_epoch = None;
        let mut attempts = 0;
        let finish = loop {
            let route = self.route_after(failed_epoch).await?;
            match self.attempt(request, route.clone(), &mut progress, events).await {
                Ok(finish) => break finish,
                Err(failure) => {
                    attempts += 1;
                    anyhow::ensure!(attempts < MAX_ATTEMPTS, "giving up after {attempts} attempts: {failure:#}");
                    tracing::warn!(
                        epoch = route.epoch,
                        generated = progress.generated.len(),
                        "the pipeline failed under a request; replaying it: {failure:#}"
                    );
                    // A path that failed over is not a node loss: no new plan is coming.
                    failed_epoch = failure.downcast_ref::<PathFailedOver>().is_none().then_some(route.epoch);
                }
            }
        };
        if finish != FinishReason::Cancelled {
            let rest = progress.stops.flush();
            if !rest.is_empty() {
                let _ = events.send(Event::Text(rest)).await;
            }
        }
        let first_token_at = progress.first_token_at.unwrap_or_else(Instant::now);
        Ok(Outcome {
            finish,
            prompt_tokens: request.prompt.len(),
            completion_tokens: progress.generated.len(),
            time_to_first_token: first_token_at - started,
            decode_time: first_token_at.elapsed(),
        })
    }

    /// One pass of a request through the pipeline of `route`, from where `progress` left
    /// off. Errors mean the pipeline failed and the request may be replayed.
    async fn attempt(
        &self,
        request: &Generation,
        route: Route,
        progress: &mut Progress<'_>,
        events: &mpsc::Sender<Event>,
    ) -> anyhow::Result<FinishReason> {
        let expect = Expect {
            epoch: route.epoch,
            hidden_size: self.model.hidden_size,
            vocab_size: self.model.vocab_size.try_into().unwrap_or(u32::MAX),
        };
        let sequence_id = random_sequence_id();
        let prefill = Prefill {
            epoch: route.epoch,
            sequence_id,
            start_position: 0,
            tokens: request.prompt.clone(),
            generation: Some(WireGeneration {
                sampling: Sampling {
                    temperature: request.sampling.temperature,
                    top_p: request.sampling.top_p,
                    top_k: request.sampling.top_k.try_into().unwrap_or(u32::MAX),
                    seed: request.sampling.seed,
                    word_pos: progress.word_pos,
                },
                max_len: u32::try_from(request.prompt.len() + request.max_tokens)?,
                stop_tokens: self.model.tokenizer.stop_token_ids().to_vec(),
                forced_tokens: progress.generated.clone(),
            }),
        };
        // The tokens of a replay come back first; they are known already.
        let mut replayed = progress.generated.len();

        let (frames, outbound) = mpsc::channel(8);
        frames.send(StageFrame::Prefill(prefill).into_wire()).await?;
        let channel = self.channel(&route).await?;
        // The connection may have been made anew since the last request, to whoever holds
        // the address now: nothing goes into the pipeline before the first stage proves
        // it is the plan's.
        channel.confirm_peer().await?;
        let mut client = pb::pipeline_client::PipelineClient::new(channel.channel()).with_limits(&self.limits);
        let request = channel.request(ReceiverStream::new(outbound)).await?;
        let mut replies = match client.stream(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                // A refused ticket (the stage restarted, say): the replay shakes hands again.
                channel.check_status(&status).await;
                return Err(status.into());
            }
        };
        let reset = || StageFrame::Reset(Reset { epoch: route.epoch, sequence_id }).into_wire();
        let mut routes = self.routes.clone();
        routes.mark_unchanged();
        loop {
            let message = tokio::select! {
                message = replies.message() => message?,
                Ok(()) = routes.changed() => {
                    // Tokens on their way over a path that failed are lost; and a plan
                    // whose first stage listens elsewhere may mean this one's address is
                    // gone (a node whose address moved answers nothing on the old one).
                    // Replaying is exact either way, so the request moves over.
                    let now = routes.borrow_and_update().clone();
                    let failed_over =
                        now.as_ref().is_some_and(|now| now.epoch == route.epoch && now.failovers != route.failovers);
                    let moved =
                        now.as_ref().is_some_and(|now| now.epoch > route.epoch && now.first_stage != route.first_stage);
                    if failed_over || moved {
                        return Err(PathFailedOver.into());
                    }
                    continue;
                }
                () = events.closed() => {
                    let _ = frames.send(reset()).await;
                    return Ok(FinishReason::Cancelled);
                }
            };
            let Some(message) = message else { anyhow::bail!("the first stage closed the stream") };
            let token = match StageFrame::from_wire(message, &self.limits, &expect)? {
                StageFrame::Token(token) => token,
                StageFrame::Error(error) if error.code == ErrorCode::PathChanged => {
                    tracing::info!("{}", error.message);
                    return Err(PathFailedOver.into());
                }
                StageFrame::Error(error) => anyhow::bail!("the pipeline refused the request: {}", error.message),
                other => anyhow::bail!("unexpected frame from the first stage: {other:?}"),
            };
            if replayed > 0 {
                let expected = progress.generated[progress.generated.len() - replayed];
                anyhow::ensure!(token.id == expected, "the replay produced token {} instead of {expected}", token.id);
                replayed -= 1;
                continue;
            }
            progress.generated.push(token.id);
            progress.word_pos = token.word_pos;
            progress.first_token_at.get_or_insert_with(Instant::now);
            self.counters.generated_tokens.fetch_add(1, Ordering::Relaxed);
            if token.finish == Some(WireFinish::Stop) {
                return Ok(FinishReason::Stop);
            }
            if let Some(piece) = progress.text.step(token.id)? {
                let status = progress.stops.push(&piece);
                if !status.emit.is_empty() && events.send(Event::Text(status.emit)).await.is_err() {
                    let _ = frames.send(reset()).await;
                    return Ok(FinishReason::Cancelled);
                }
                if status.stopped {
                    let _ = frames.send(reset()).await;
                    return Ok(FinishReason::Stop);
                }
            }
            if token.finish == Some(WireFinish::Length) {
                return Ok(FinishReason::Length);
            }
        }
    }

    /// The route to use: after a failure on `failed_epoch`, prefer a newer plan (the
    /// cluster is re-forming), but settle for the same one if none comes soon — the
    /// failure may have been passing.
    async fn route_after(&self, failed_epoch: Option<u64>) -> anyhow::Result<Route> {
        if let Some(failed) = failed_epoch {
            let mut routes = self.routes.clone();
            let newer = match tokio::time::timeout(
                REPLAN_WAIT,
                routes.wait_for(|route| route.as_ref().is_some_and(|r| r.epoch > failed)),
            )
            .await
            {
                Ok(Ok(route)) => route.clone(),
                _ => None,
            };
            if let Some(route) = newer {
                return Ok(route);
            }
        }
        self.wait_for_route().await
    }

    /// The current ready plan, waiting a little for one if the cluster is re-forming.
    async fn wait_for_route(&self) -> anyhow::Result<Route> {
        let mut routes = self.routes.clone();
        let route = match tokio::time::timeout(PLAN_WAIT, routes.wait_for(Option::is_some)).await {
            Ok(Ok(route)) => route.clone(),
            _ => None,
        };
        route.ok_or_else(|| anyhow::anyhow!("the cluster has no ready plan to serve the model"))
    }

    async fn channel(&self, route: &Route) -> anyhow::Result<Arc<AuthedChannel>> {
        let (addr, key) = (route.first_stage, (route.first_node.clone(), route.first_stage));
        if let Some(channel) = self.channels.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.get(&key) {
            return Ok(channel.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy();
        let channel = Arc::new(AuthedChannel::new(channel, addr, route.first_node.as_str(), self.credentials.clone()));
        self.channels.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.insert(key, channel.clone());
        Ok(channel)
    }
}

fn log_outcome(outcome: &Outcome) {
    if outcome.finish == FinishReason::Cancelled {
        tracing::info!(tokens = outcome.completion_tokens, "client went away; generation cancelled");
        return;
    }
    let rate = outcome.completion_tokens.saturating_sub(1) as f64 / outcome.decode_time.as_secs_f64().max(1e-9);
    tracing::info!(
        prompt_tokens = outcome.prompt_tokens,
        completion_tokens = outcome.completion_tokens,
        ttft_ms = outcome.time_to_first_token.as_millis() as u64,
        tokens_per_s = format!("{rate:.1}"),
        "generation finished"
    );
}

/// A random non-zero id: holders pick sequence ids independently, so they must not collide.
fn random_sequence_id() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now()).max(1)
}
