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

mod cors;

pub use cors::{CorsOrigin, CorsOriginError};

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
/// that supervisors can probe the node, and so does the web page at `/` (which holds no
/// data: it asks the key of its user for the `/v1` calls it makes). Browsers let only
/// `cors_origins` (none by default) read the answers from other pages.
pub fn router(state: AppState, api_key: Option<String>, cors_origins: &[CorsOrigin]) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/cluster", get(cluster_view))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found);
    let open = Router::new().route("/health", get(health)).route("/", get(page));
    guard(open, v1, api_key, cors_origins).with_state(state)
}

/// The web page: the cluster as this node sees it, and a chat, both through this API.
const PAGE: &str = include_str!("api/page.html");

/// What the page may do: run its own inline script and styles, talk to this origin only,
/// and not be framed by other sites.
const PAGE_POLICY: &str =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'";

async fn page() -> Response {
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    ];
    (headers, PAGE).into_response()
}

/// Puts the API's layers around its routes: `v1` behind the API key, if any; request
/// bodies capped; and CORS outermost, so that it answers preflights (which carry no API
/// key) itself and marks refusals readable too.
fn guard<S: Clone + Send + Sync + 'static>(
    open: Router<S>,
    v1: Router<S>,
    api_key: Option<String>,
    cors_origins: &[CorsOrigin],
) -> Router<S> {
    let v1 = match api_key {
        Some(key) => v1.layer(middleware::from_fn_with_state(Arc::<str>::from(key), require_api_key)),
        None => v1,
    };
    let routes = open.merge(v1).layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    match cors::layer(cors_origins) {
        Some(cors) => routes.layer(cors),
        None => routes,
    }
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
pub(crate) struct CommonParams {
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
pub(crate) enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    /// The parameter that holds the prompt.
    pub(crate) fn prompt_param(self) -> &'static str {
        match self {
            Self::Completions => "prompt",
            Self::Chat => "messages",
        }
    }
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
    let ParsedRequest { params, prompt } = parse_request(&body, endpoint, holder.model_id())?;
    let prompt_text = match prompt {
        PromptSource::Text(text) => text,
        PromptSource::Chat(messages) => holder
            .render_chat(&messages)
            .map_err(|e| ApiError::invalid(format!("cannot apply the chat template: {e}")).param("messages"))?,
    };
    let prompt_param = endpoint.prompt_param();
    let prompt = holder.tokenizer().encode(&prompt_text).map_err(|e| ApiError::internal(e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid("the prompt is empty").param(prompt_param));
    }
    let generation = generation_request(&params, prompt, holder.context_length(), prompt_param)?;

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

/// A request body, parsed and checked as far as it can be without the model's tokenizer.
#[derive(Debug)]
pub(crate) struct ParsedRequest {
    pub(crate) params: CommonParams,
    pub(crate) prompt: PromptSource,
}

/// The prompt as the client gave it, before the chat template and the tokenizer.
#[derive(Debug)]
pub(crate) enum PromptSource {
    Text(String),
    Chat(Vec<ChatMessage>),
}

/// Parses a request to `endpoint` of a node serving `model_id`. Every way a body can be
/// wrong ends here, in OpenAI's error shape, before the request reaches the model.
pub(crate) fn parse_request(body: &[u8], endpoint: Endpoint, model_id: &str) -> Result<ParsedRequest, ApiError> {
    let KnownFields(fields) = serde_json::from_slice(body).map_err(|e| match e.classify() {
        // The fields' values take any JSON, so only a body of another type is a data error.
        serde_json::error::Category::Data => ApiError::invalid("the request body must be a JSON object"),
        _ => ApiError::invalid(format!("the request body is not valid JSON: {e}")),
    })?;
    reject_unsupported(&fields)?;
    let params = CommonParams::deserialize(&fields).map_err(|e| ApiError::invalid(e.to_string()))?;
    check_model(model_id, params.model.as_deref())?;
    let prompt = match endpoint {
        Endpoint::Completions => PromptSource::Text(completion_prompt(&fields)?),
        Endpoint::Chat => PromptSource::Chat(chat_messages(&fields)?),
    };
    Ok(ParsedRequest { params, prompt })
}

/// The top-level fields of a request body that either endpoint reads or refuses.
const KNOWN_FIELDS: &[&str] = &[
    // Read: CommonParams, and each endpoint's prompt.
    "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
    "stream_options", "prompt", "messages",
    // Refused when set: see `reject_unsupported`.
    "n", "best_of", "logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "function_call",
    "tool_choice", "logit_bias", "presence_penalty", "frequency_penalty", "response_format",
];

/// A body's [`KNOWN_FIELDS`]. Every other field is skipped as it is parsed, never stored:
/// a parsed JSON value takes many times the bytes of its text, so a body padded with
/// unknown fields would otherwise cost the node a hundred times its size.
struct KnownFields(serde_json::Map<String, Value>);

impl<'de> Deserialize<'de> for KnownFields {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = KnownFields;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<KnownFields, A::Error> {
                let mut fields = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    if KNOWN_FIELDS.contains(&key.as_str()) {
                        // A repeated field keeps its last value, as in any JSON object.
                        fields.insert(key, map.next_value()?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(KnownFields(fields))
            }
        }
        deserializer.deserialize_map(Fields)
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

fn check_model(model_id: &str, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        None => Err(ApiError::invalid("`model` is required").param("model")),
        Some(name) if name == model_id => Ok(()),
        Some(name) => {
            // Echo the name back safely: it came from the client and may hold anything.
            let shown: String = name.chars().take(100).flat_map(char::escape_default).collect();
            Err(ApiError::invalid(format!(
                "the model `{shown}` does not exist; this node serves `{model_id}` (see /v1/models)"
            ))
            .status(StatusCode::NOT_FOUND)
            .param("model")
            .code("model_not_found"))
        }
    }
}

fn completion_prompt(fields: &serde_json::Map<String, Value>) -> Result<String, ApiError> {
    let value = fields.get("prompt").ok_or_else(|| ApiError::invalid("`prompt` is required").param("prompt"))?;
    let prompt = PromptParam::deserialize(value)
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
    let raw = Vec::<RawMessage>::deserialize(value)
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

/// The generation a request asks for, given its tokenized prompt and the model's
/// `context` length in tokens.
pub(crate) fn generation_request(
    params: &CommonParams,
    prompt: Vec<u32>,
    context: usize,
    prompt_param: &'static str,
) -> Result<Generation, ApiError> {
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

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Method, Request};
    use tower::ServiceExt;

    use super::*;

    const PAGE: &str = "https://chat.example.org";
    const STRANGER: &str = "https://evil.example.net";

    /// The API's layers around stand-in routes.
    fn app(api_key: Option<&str>, cors_origins: &[&str]) -> Router {
        let origins: Vec<CorsOrigin> = cors_origins.iter().map(|origin| origin.parse().unwrap()).collect();
        let open = Router::new().route("/health", get(|| async { "ok" }));
        let v1 = Router::new().route("/v1/chat/completions", post(|| async { "done" }));
        guard(open, v1, api_key.map(String::from), &origins)
    }

    #[tokio::test]
    async fn the_web_page_is_served_without_a_key_and_locked_to_its_origin() {
        let open = Router::new().route("/", get(page));
        let v1 = Router::new().route("/v1/chat/completions", post(|| async { "done" }));
        let app = guard(open, v1, Some("secret".into()), &[]);
        let response = send(&app, Request::builder().uri("/").body(Body::empty()).unwrap()).await;
        assert_eq!(response.status(), StatusCode::OK);
        let header = |name| response.headers().get(name).map(|v: &axum::http::HeaderValue| v.to_str().unwrap().to_owned());
        assert_eq!(header(header::CONTENT_TYPE).as_deref(), Some("text/html; charset=utf-8"));
        let policy = header(header::CONTENT_SECURITY_POLICY).unwrap_or_default();
        assert!(policy.contains("connect-src 'self'") && policy.contains("frame-ancestors 'none'"), "{policy}");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        for needed in ["/v1/cluster", "/v1/models", "/v1/chat/completions", "Authorization"] {
            assert!(body.contains(needed), "the page never calls {needed}");
        }
        assert!(!body.contains("innerHTML"), "text from the API must not become markup");
    }

    fn preflight(origin: &str) -> Request<Body> {
        Request::builder()
            .method(Method::OPTIONS)
            .uri("/v1/chat/completions")
            .header(header::ORIGIN, origin)
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "authorization,content-type")
            .body(Body::empty())
            .unwrap()
    }

    fn post_from(origin: &str, api_key: &str) -> Request<Body> {
        Request::builder()
            .method(Method::POST)
            .uri("/v1/chat/completions")
            .header(header::ORIGIN, origin)
            .header(header::AUTHORIZATION, format!("Bearer {api_key}"))
            .body(Body::from("{}"))
            .unwrap()
    }

    async fn send(app: &Router, request: Request<Body>) -> Response {
        app.clone().oneshot(request).await.unwrap()
    }

    fn allowed_origin(response: &Response) -> Option<&str> {
        response.headers().get(header::ACCESS_CONTROL_ALLOW_ORIGIN).map(|value| value.to_str().unwrap())
    }

    #[tokio::test]
    async fn only_configured_origins_pass_preflight_even_with_an_api_key() {
        let app = app(Some("secret"), &[PAGE]);

        let allowed = send(&app, preflight(PAGE)).await;
        assert!(allowed.status().is_success(), "{}", allowed.status());
        assert_eq!(allowed_origin(&allowed), Some(PAGE));
        let headers = allowed.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS].to_str().unwrap();
        assert!(headers.contains("authorization"), "{headers}");

        let refused = send(&app, preflight(STRANGER)).await;
        assert_eq!(allowed_origin(&refused), None);

        let answered = send(&app, post_from(PAGE, "secret")).await;
        assert_eq!(answered.status(), StatusCode::OK);
        assert_eq!(allowed_origin(&answered), Some(PAGE));
        let unreadable = send(&app, post_from(STRANGER, "secret")).await;
        assert_eq!(allowed_origin(&unreadable), None);
        // A refusal is readable by an allowed page, so it can tell its user why.
        let wrong_key = send(&app, post_from(PAGE, "guess")).await;
        assert_eq!(wrong_key.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(allowed_origin(&wrong_key), Some(PAGE));
    }

    #[tokio::test]
    async fn without_configured_origins_no_cors_headers_are_sent() {
        let app = app(None, &[]);
        for origin in [PAGE, STRANGER] {
            let preflight = send(&app, preflight(origin)).await;
            assert!(!preflight.status().is_success(), "{}", preflight.status());
            let cors_headers: Vec<_> =
                preflight.headers().keys().filter(|name| name.as_str().starts_with("access-control-")).collect();
            assert!(cors_headers.is_empty(), "{cors_headers:?}");
            let answered = send(&app, post_from(origin, "unused")).await;
            assert_eq!(answered.status(), StatusCode::OK);
            assert_eq!(allowed_origin(&answered), None);
        }
    }

    #[tokio::test]
    async fn any_origin_only_when_asked_for() {
        let app = app(None, &["*"]);
        let allowed = send(&app, preflight(STRANGER)).await;
        assert!(allowed.status().is_success(), "{}", allowed.status());
        assert_eq!(allowed_origin(&allowed), Some("*"));
    }
}
