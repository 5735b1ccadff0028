//! The OpenAI-compatible HTTP API: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.
//!
//! Requests are parsed by hand from the raw body rather than by axum's `Json` extractor, so
//! that every malformed request gets OpenAI's error shape and a message that names the
//! offending parameter.

use std::convert::Infallible;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRef, Request, State};
use axum::middleware::{self, Next};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::body::Bytes;
use axum::{Json, Router};
use hearth_models::chat_template::ChatMessage;
use hearth_models::sampling::SamplingParams;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::cluster::ClusterView;
use crate::data_plane::DataPlaneStats;
use crate::engine::{self, Event, Generation, Outcome};
use crate::holder::{Holder, SubmitError};

/// Request bodies larger than this are refused before parsing.
const MAX_BODY_BYTES: usize = 4 << 20;
/// Stop strings a request may give, as OpenAI allows.
const MAX_STOP_STRINGS: usize = 4;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// Set once this node knows its model: a node that joined without the model file
    /// learns it from a peer, and answers 503 until then.
    pub holder: Arc<OnceLock<Holder>>,
    pub cluster: watch::Receiver<ClusterView>,
    /// This node's data plane, for its counters.
    pub data_plane: Arc<DataPlaneStats>,
}

impl AppState {
    fn holder(&self) -> Result<Holder, ApiError> {
        self.holder.get().cloned().ok_or_else(|| {
            ApiError::invalid("this node is still getting the model from its peers; try again shortly")
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .kind("server_error")
                .code("model_unavailable")
        })
    }
}

impl FromRef<AppState> for watch::Receiver<ClusterView> {
    fn from_ref(state: &AppState) -> Self {
        state.cluster.clone()
    }
}

/// The API's routes. With `api_key`, every `/v1` request must carry
/// `Authorization: Bearer <api_key>`, as OpenAI clients send it; `/health` stays open so
/// that supervisors can probe the node.
pub fn router(state: AppState, api_key: Option<String>) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/cluster", get(cluster_view))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found);
    let v1 = match api_key {
        Some(key) => v1.layer(middleware::from_fn_with_state(Arc::<str>::from(key), require_api_key)),
        None => v1,
    };
    Router::new()
        .route("/health", get(health))
        .merge(v1)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Refuses requests without the right bearer token, in OpenAI's error shape.
async fn require_api_key(State(key): State<Arc<str>>, request: Request, next: Next) -> Response {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    match given {
        Some(token) if constant_time_eq(token.as_bytes(), key.as_bytes()) => next.run(request).await,
        Some(_) => ApiError::unauthorized("incorrect API key provided").into_response(),
        None => ApiError::unauthorized("no API key provided: send `Authorization: Bearer <key>`").into_response(),
    }
}

/// Compares without an early exit, so the time taken says nothing about the key.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    fn param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    fn unauthorized(message: &str) -> Self {
        Self::invalid(message).status(StatusCode::UNAUTHORIZED).code("invalid_api_key")
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::invalid(message).status(StatusCode::INTERNAL_SERVER_ERROR).kind("server_error")
    }

    fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": { "message": self.message, "type": self.kind, "param": self.param, "code": self.code }
        });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<SubmitError> for ApiError {
    fn from(error: SubmitError) -> Self {
        let status = match error {
            SubmitError::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
        };
        Self::invalid(error.to_string()).status(status).kind("server_error")
    }
}

async fn not_found() -> ApiError {
    ApiError::invalid("no such endpoint; see /v1/models, /v1/completions, /v1/chat/completions")
        .status(StatusCode::NOT_FOUND)
}

/// 200 when the node can serve requests (its cluster has a ready plan), else 503.
async fn health(State(state): State<AppState>) -> Response {
    let Ok(holder) = state.holder() else {
        let body = json!({ "status": "starting", "problem": "getting the model from peers", "model": null });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    };
    let (holder, cluster) = (&holder, &state.cluster);
    let counters = holder.counters();
    let load = std::sync::atomic::Ordering::Relaxed;
    let (ready, problem) = {
        let view = cluster.borrow();
        (view.ready, view.problem.clone())
    };
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = Json(json!({
        "status": if ready { "ok" } else { "starting" },
        "problem": problem,
        "model": holder.model_id(),
        "active_requests": counters.active.load(load),
        "queued_requests": counters.queued.load(load),
        "generated_tokens_total": counters.generated_tokens.load(load),
        "data_plane": {
            "frames_accepted": state.data_plane.frames_accepted.load(load),
            "frames_refused": state.data_plane.frames_refused.load(load),
        },
    }));
    (status, body).into_response()
}

async fn cluster_view(State(cluster): State<watch::Receiver<ClusterView>>) -> Json<ClusterView> {
    Json(cluster.borrow().clone())
}

async fn models(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let holder = state.holder()?;
    Ok(Json(json!({
        "object": "list",
        "data": [{ "id": holder.model_id(), "object": "model", "created": unix_time(), "owned_by": "hearth" }],
    })))
}

/// Parameters shared by both endpoints.
#[derive(Debug, Deserialize)]
struct CommonParams {
    model: Option<String>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<StopParam>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopParam {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PromptParam {
    Text(String),
    Batch(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawMessage {
    role: String,
    content: Option<MessageContent>,
}

/// Which endpoint a request came to: they differ only in how the prompt is given and how
/// responses are shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

async fn completions(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    handle(state, body?, Endpoint::Completions).await
}

async fn chat_completions(State(state): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    handle(state, body?, Endpoint::Chat).await
}

impl From<BytesRejection> for ApiError {
    /// Too large a body, or one that could not be read, in OpenAI's error shape.
    fn from(rejection: BytesRejection) -> Self {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!("the request body is larger than {} bytes", MAX_BODY_BYTES)
        } else {
            format!("cannot read the request body: {}", rejection.body_text())
        };
        Self::invalid(message).status(status)
    }
}

async fn handle(state: AppState, body: Bytes, endpoint: Endpoint) -> Result<Response, ApiError> {
    // A cluster that cannot hold the model says so at once; one still forming gets a few
    // seconds' grace from the holder.
    if let Some(problem) = state.cluster.borrow().problem.clone() {
        return Err(ApiError::invalid(format!("the cluster cannot serve the model right now: {problem}"))
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .kind("server_error")
            .code("cluster_unavailable"));
    }
    let holder = state.holder()?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(fields) = &body else {
        return Err(ApiError::invalid("the request body must be a JSON object"));
    };
    reject_unsupported(fields)?;
    let params: CommonParams = serde_json::from_value(body.clone()).map_err(|e| ApiError::invalid(e.to_string()))?;
    check_model(&holder, params.model.as_deref())?;

    let prompt_text = match endpoint {
        Endpoint::Completions => completion_prompt(fields)?,
        Endpoint::Chat => {
            let messages = chat_messages(fields)?;
            holder
                .render_chat(&messages)
                .map_err(|e| ApiError::invalid(format!("cannot apply the chat template: {e}")).param("messages"))?
        }
    };
    let prompt_param = if endpoint == Endpoint::Chat { "messages" } else { "prompt" };
    let prompt = holder.tokenizer().encode(&prompt_text).map_err(|e| ApiError::internal(e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty").param(prompt_param));
    }
    let generation = generation_request(&holder, &params, prompt, prompt_param)?;

    let include_usage = params.stream_options.as_ref().is_some_and(|o| o.include_usage);
    let events = holder.submit(generation)?;
    let reply = Reply { endpoint, id: response_id(endpoint), model: holder.model_id().to_string(), created: unix_time() };
    if params.stream {
        Ok(reply.stream(events, include_usage).into_response())
    } else {
        let (text, outcome) = engine::collect(events).await.map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(Json(reply.complete(&text, &outcome)).into_response())
    }
}

/// Parameters OpenAI defines that Hearth does not implement: refused rather than ignored,
/// so a client never silently gets something other than what it asked for.
fn reject_unsupported(fields: &serde_json::Map<String, Value>) -> Result<(), ApiError> {
    let refuse = |param: &'static str, why: &str| Err(ApiError::invalid(format!("`{param}` is not supported: {why}")).param(param));
    let is_set = |v: &Value| !matches!(v, Value::Null | Value::Bool(false));
    for (param, value) in fields {
        match (param.as_str(), value) {
            ("n", v) if v.as_i64() != Some(1) && !v.is_null() => return refuse("n", "only n=1 is served"),
            ("best_of", v) if v.as_i64() != Some(1) && !v.is_null() => return refuse("best_of", "only 1"),
            ("logprobs", v) if is_set(v) => return refuse("logprobs", "log probabilities are not returned"),
            ("top_logprobs", v) if is_set(v) => return refuse("top_logprobs", "log probabilities are not returned"),
            ("echo", v) if is_set(v) => return refuse("echo", "the prompt is not echoed"),
            ("suffix", v) if is_set(v) => return refuse("suffix", "insertion is not supported"),
            ("tools", v) if is_set(v) => return refuse("tools", "tool calling is not supported"),
            ("functions", v) if is_set(v) => return refuse("functions", "function calling is not supported"),
            ("function_call", v) if is_set(v) && v != "none" => return refuse("function_call", "function calling is not supported"),
            ("tool_choice", v) if is_set(v) && v != "none" => return refuse("tool_choice", "tool calling is not supported"),
            ("logit_bias", Value::Object(m)) if !m.is_empty() => return refuse("logit_bias", "logit biases are not supported"),
            ("presence_penalty", v) if v.as_f64().is_some_and(|p| p != 0.0) => return refuse("presence_penalty", "penalties are not supported"),
            ("frequency_penalty", v) if v.as_f64().is_some_and(|p| p != 0.0) => return refuse("frequency_penalty", "penalties are not supported"),
            ("response_format", v) if is_set(v) && v.get("type").and_then(Value::as_str) != Some("text") => {
                return refuse("response_format", "only text responses are supported")
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_model(holder: &Holder, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None => Err(ApiError::invalid("`model` is required").param("model")),
        Some(name) if name == holder.model_id() => Ok(()),
        Some(name) => {
            // Echo the name back safely: it came from the client and may hold anything.
            let shown: String = name.chars().take(100).flat_map(char::escape_default).collect();
            Err(ApiError::invalid(format!(
                "the model `{shown}` does not exist; this node serves `{}` (see /v1/models)",
                holder.model_id()
            ))
            .status(StatusCode::NOT_FOUND)
            .param("model")
            .code("model_not_found"))
        }
    }
}

fn completion_prompt(fields: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
    let value = fields.get("prompt").ok_or_else(|| ApiError::invalid("`prompt` is required").param("prompt"))?;
    let prompt: PromptParam = serde_json::from_value(value.clone())
        .map_err(|_| ApiError::invalid("`prompt` must be a string (or a list of one string)").param("prompt"))?;
    match prompt {
        PromptParam::Text(text) => Ok(text),
        PromptParam::Batch(mut texts) if texts.len() == 1 => Ok(texts.remove(0)),
        PromptParam::Batch(_) => Err(ApiError::invalid("only one prompt per request is supported").param("prompt")),
    }
}

fn chat_messages(fields: &serde_json::Map<String, Value>) -> Result<Vec<ChatMessage>, ApiError> {
    let bad = |message: String| ApiError::invalid(message).param("messages");
    let value = fields.get("messages").ok_or_else(|| bad("`messages` is required".into()))?;
    let raw: Vec<RawMessage> = serde_json::from_value(value.clone())
        .map_err(|e| bad(format!("`messages` must be a list of {{role, content}} objects: {e}")))?;
    if raw.is_empty() {
        return Err(bad("`messages` must not be empty".into()));
    }
    raw.into_iter()
        .enumerate()
        .map(|(i, message)| {
            let role = match message.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    let shown: String = other.chars().take(40).flat_map(char::escape_default).collect();
                    return Err(bad(format!(
                        "messages[{i}].role `{shown}` is not one of system, developer, user, assistant"
                    )));
                }
            };
            let content = match message.content {
                // Only an assistant turn (one that called tools, in OpenAI's API) may lack content.
                None if role == "assistant" => String::new(),
                None => return Err(bad(format!("messages[{i}].content is required"))),
                Some(MessageContent::Text(text)) => text,
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(piece)) => text.push_str(&piece),
                            (kind, _) => {
                                return Err(bad(format!("messages[{i}]: content parts of type `{kind}` are not supported")))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage { role: role.to_string(), content })
        })
        .collect()
}

fn generation_request(
    holder: &Holder,
    params: &CommonParams,
    prompt: Vec<u32>,
    prompt_param: &'static str,
) -> Result<Generation, ApiError> {
    let context = holder.context_length();
    if prompt.len() >= context {
        return Err(ApiError::invalid(format!(
            "the prompt is {} tokens long; this model's context is {context} tokens, which must also hold at least one generated token",
            prompt.len()
        ))
        .param(prompt_param)
        .code("context_length_exceeded"));
    }
    let room = context - prompt.len();
    let max_tokens = match params.max_completion_tokens.or(params.max_tokens) {
        None => room,
        Some(n) if n < 1 => return Err(ApiError::invalid("`max_tokens` must be at least 1").param("max_tokens")),
        Some(n) if n as u64 > room as u64 => {
            return Err(ApiError::invalid(format!(
                "this model's context is {context} tokens; the prompt takes {} and max_tokens asks for {n} more",
                prompt.len()
            ))
            .param("max_tokens")
            .code("context_length_exceeded"))
        }
        Some(n) => n as usize,
    };
    let temperature = params.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid("`temperature` must be between 0 and 2").param("temperature"));
    }
    let top_p = params.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("`top_p` must be greater than 0 and at most 1").param("top_p"));
    }
    let top_k = match params.top_k {
        None => 0,
        Some(k) if k < 0 => return Err(ApiError::invalid("`top_k` must not be negative").param("top_k")),
        Some(k) => k as usize,
    };
    let seed = match params.seed {
        Some(seed) => seed as u64,
        None => rand_seed(),
    };
    let sampling = SamplingParams { temperature, top_p, top_k, seed };
    sampling.validate().map_err(|e| ApiError::invalid(e.to_string()))?;
    let stop = match &params.stop {
        None => Vec::new(),
        Some(StopParam::One(s)) => vec![s.clone()],
        Some(StopParam::Many(list)) if list.len() <= MAX_STOP_STRINGS => list.clone(),
        Some(StopParam::Many(_)) => {
            return Err(ApiError::invalid(format!("at most {MAX_STOP_STRINGS} stop strings")).param("stop"))
        }
    };
    Ok(Generation { prompt, sampling, max_tokens, stop })
}

/// Shapes holder output into OpenAI responses for one request.
struct Reply {
    endpoint: Endpoint,
    id: String,
    model: String,
    created: u64,
}

impl Reply {
    fn object(&self, streaming: bool) -> &'static str {
        match (self.endpoint, streaming) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    fn complete(&self, text: &str, outcome: &Outcome) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": outcome.finish.as_openai(),
            }),
            Endpoint::Chat => json!({
                "index": 0, "message": { "role": "assistant", "content": text },
                "logprobs": null, "finish_reason": outcome.finish.as_openai(),
            }),
        };
        json!({
            "id": self.id, "object": self.object(false), "created": self.created, "model": self.model,
            "choices": [choice], "usage": usage(outcome),
        })
    }

    fn chunk(&self, text: Option<&str>, finish: Option<&str>, role: bool) -> Value {
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
            }),
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(text) = text {
                    delta.insert("content".into(), text.into());
                }
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
            }
        };
        json!({
            "id": self.id, "object": self.object(true), "created": self.created, "model": self.model,
            "choices": [choice],
        })
    }

    fn usage_chunk(&self, outcome: &Outcome) -> Value {
        json!({
            "id": self.id, "object": self.object(true), "created": self.created, "model": self.model,
            "choices": [], "usage": usage(outcome),
        })
    }

    /// Server-sent events ending in `data: [DONE]`. When the client leaves, the response
    /// stream is dropped, this task sees it and drops `events`, which cancels the generation.
    fn stream(self, mut events: mpsc::Receiver<Event>, include_usage: bool) -> impl IntoResponse {
        let (sender, receiver) = mpsc::channel::<Result<SseEvent, Infallible>>(16);
        tokio::spawn(async move {
            let send = |data: String| sender.send(Ok(SseEvent::default().data(data)));
            if self.endpoint == Endpoint::Chat && send(self.chunk(Some(""), None, true).to_string()).await.is_err() {
                return;
            }
            loop {
                let event = tokio::select! {
                    event = events.recv() => event,
                    () = sender.closed() => return,
                };
                let data = match event {
                    Some(Event::Text(text)) => self.chunk(Some(&text), None, false),
                    Some(Event::Done(outcome)) => {
                        let _ = send(self.chunk(None, Some(outcome.finish.as_openai()), false).to_string()).await;
                        if include_usage {
                            let _ = send(self.usage_chunk(&outcome).to_string()).await;
                        }
                        break;
                    }
                    Some(Event::Failed(message)) => {
                        let error = json!({ "error": { "message": message, "type": "server_error", "param": null, "code": null } });
                        let _ = send(error.to_string()).await;
                        break;
                    }
                    None => break,
                };
                if send(data.to_string()).await.is_err() {
                    return;
                }
            }
            let _ = send("[DONE]".to_string()).await;
        });
        Sse::new(ReceiverStream::new(receiver)).keep_alive(KeepAlive::default())
    }
}

fn usage(outcome: &Outcome) -> Value {
    json!({
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    })
}

fn response_id(endpoint: Endpoint) -> String {
    let prefix = match endpoint {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
    };
    format!("{prefix}-{:016x}", rand_seed())
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A fresh seed for requests that give none: OS randomness through std's hasher keys.
fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now())
}
