"""End-to-end tests of `hearth serve`'s OpenAI-compatible API, driven by the official `openai` client.

Each test talks to a real `hearth serve` process (see conftest.py). Greedy outputs are checked
against llama.cpp's reference continuations in ../fixtures/smollm2-q4_1.json; raw `httpx` is used
only where the client would hide what is being tested (malformed bodies, SSE framing, disconnects).

Run with: python3 -m pytest tests/api -q
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest
from openai.types import Completion, CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

if TYPE_CHECKING:
    from conftest import HearthServer

REFERENCE_PATH = Path(__file__).resolve().parent.parent / "fixtures" / "smollm2-q4_1.json"


# --- reference outputs ----------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """One llama.cpp greedy continuation of a raw prompt (no chat template, no BOS)."""

    prompt: str
    prompt_ids: list[int]
    generated_ids: list[int]
    pieces: list[str]
    text: str
    top5_logits: list[list[list[float]]]  # per generated position: [token id, logit] x 5

    def prefix(self, n_tokens: int) -> str:
        """The text of the first `n_tokens` generated tokens."""
        return "".join(self.pieces[:n_tokens])

    def divergence(self, got: str) -> str:
        """Where `got` leaves the reference text, with llama.cpp's top logits at that step."""
        consumed = ""
        for step, piece in enumerate(self.pieces):
            if not got.startswith(consumed + piece):
                top = ", ".join(f"{int(t)}: {logit:.3f}" for t, logit in self.top5_logits[step][:3])
                return (
                    f"diverges at generated token {step} (reference piece {piece!r} after {consumed!r}); "
                    f"llama.cpp's top logits there: {top}"
                )
            consumed += piece
        return "the reference text is a prefix of the output"

    @property
    def slug(self) -> str:
        return "-".join("".join(c if c.isalnum() else " " for c in self.prompt).split()).lower()


def load_references(path: Path = REFERENCE_PATH) -> list[Reference]:
    with path.open(encoding="utf-8") as f:
        entries = json.load(f)["completions"]
    return [
        Reference(
            prompt=e["prompt"],
            prompt_ids=e["prompt_ids"],
            generated_ids=e["generated_ids"],
            pieces=e["pieces"],
            text=e["text"],
            top5_logits=e["top5_logits_per_step"],
        )
        for e in entries
    ]


def reference_for(prompt: str) -> Reference:
    return next(r for r in REFERENCES if r.prompt == prompt)


REFERENCES = load_references()
CAPITAL = reference_for("The capital of France is")  # " Paris.\n\nThe United States has ... 311 ..."
STORY = reference_for("Once upon a time")

QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the capital of France?"}]
# The system message SmolLM2's chat template inserts when the conversation has none.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
FINISH_REASONS = {"stop", "length"}


# --- request helpers ----------------------------------------------------------------


def greedy_completion(
    client: openai.OpenAI, model: str, prompt: str | list[str], max_tokens: int, **params: Any
) -> Completion:
    return client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, **params
    )


def greedy_chat(
    client: openai.OpenAI,
    model: str,
    messages: list[ChatCompletionMessageParam],
    max_tokens: int,
    **params: Any,
) -> ChatCompletion:
    return client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, **params
    )


def count_tokens(client: openai.OpenAI, model: str, text: str) -> int:
    """How many tokens the server makes of `text` as a raw prompt (its usage.prompt_tokens)."""
    usage = greedy_completion(client, model, text, max_tokens=1).usage
    assert usage is not None, "completion response has no usage"
    return usage.prompt_tokens


def assert_usage(
    usage: CompletionUsage | None, *, prompt: int | None = None, completion: int | None = None
) -> None:
    """Usage is present, consistent, and (where given) has the expected counts."""
    assert usage is not None, "response has no usage"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, f"inconsistent usage: {usage}"
    if prompt is not None:
        assert usage.prompt_tokens == prompt, f"usage.prompt_tokens {usage.prompt_tokens} != {prompt}"
    if completion is not None:
        assert usage.completion_tokens == completion, (
            f"usage.completion_tokens {usage.completion_tokens} != {completion}"
        )


@dataclass
class Streamed:
    """A streamed response put back together."""

    text: str = ""
    finish_reason: str | None = None
    usage: CompletionUsage | None = None
    finish_chunks: int = 0


def stream_completion(client: openai.OpenAI, **request: Any) -> Streamed:
    result = Streamed()
    with client.completions.create(stream=True, **request) as stream:
        for chunk in stream:
            result.usage = chunk.usage or result.usage
            for choice in chunk.choices:
                result.text += choice.text or ""
                if choice.finish_reason is not None:
                    result.finish_reason = choice.finish_reason
                    result.finish_chunks += 1
    return result


def stream_chat(client: openai.OpenAI, **request: Any) -> Streamed:
    result = Streamed()
    with client.chat.completions.create(stream=True, **request) as stream:
        for chunk in stream:
            result.usage = chunk.usage or result.usage
            for choice in chunk.choices:
                result.text += choice.delta.content or ""
                if choice.finish_reason is not None:
                    result.finish_reason = choice.finish_reason
                    result.finish_chunks += 1
    return result


def sse_payloads(http: httpx.Client, path: str, body: Mapping[str, Any]) -> list[str]:
    """POST a streaming request; return the `data:` payloads of its Server-Sent Events in order."""
    with http.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            response.read()
            pytest.fail(f"POST {path} -> {response.status_code}: {response.text[:500]}")
        content_type = response.headers.get("content-type", "")
        assert content_type.startswith("text/event-stream"), f"stream Content-Type is {content_type!r}"
        return [
            line[len("data:") :].removeprefix(" ")
            for line in response.iter_lines()
            if line.startswith("data:")
        ]


def stream_chunks(payloads: list[str], object_name: str) -> list[dict[str, Any]]:
    """Check the stream ends with a single `data: [DONE]`; return the JSON chunks before it."""
    assert payloads, "the stream carried no data events"
    assert payloads[-1] == "[DONE]", f"the last event is {payloads[-1]!r}, not [DONE]"
    assert payloads.count("[DONE]") == 1, "[DONE] sent more than once"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        assert chunk.get("object") == object_name, f"chunk object is {chunk.get('object')!r}: {chunk}"
    return chunks


def assert_finish_is_last(chunks: list[dict[str, Any]]) -> str:
    """Exactly one choice chunk has a finish_reason, and it is the last one; return that reason."""
    with_choices = [c for c in chunks if c.get("choices")]
    assert with_choices, "no chunk carried a choice"
    for chunk in with_choices:
        assert len(chunk["choices"]) == 1 and chunk["choices"][0].get("index") == 0, f"bad choices: {chunk}"
    finishing = [i for i, c in enumerate(with_choices) if c["choices"][0].get("finish_reason") is not None]
    assert finishing == [len(with_choices) - 1], (
        f"finish_reason must be set once, on the last choice chunk; set on chunks {finishing} "
        f"of {len(with_choices)}"
    )
    reason = with_choices[-1]["choices"][0]["finish_reason"]
    assert reason in FINISH_REASONS, f"finish_reason {reason!r}"
    return reason


def assert_usage_chunk(chunk: dict[str, Any]) -> dict[str, int]:
    """The include_usage chunk: no choices, and consistent integer counts."""
    assert chunk.get("choices") == [], f"the usage chunk must have choices: [], got {chunk}"
    usage = chunk.get("usage")
    assert isinstance(usage, dict), f"the last chunk has no usage: {chunk}"
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert isinstance(usage.get(key), int), f"usage.{key} is not an integer: {usage}"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], f"{usage}"
    return usage


# --- error helpers ------------------------------------------------------------------

DROP = object()  # in BadRequest.changes: remove this field from the base request


@dataclass(frozen=True)
class BadRequest:
    """A request the server must refuse, and what the contract fixes about the refusal."""

    endpoint: str  # "completions" or "chat"
    changes: Mapping[str, Any] = field(default_factory=dict)
    raw: bytes | None = None  # sent verbatim (as application/json) instead of a JSON body
    status: int = 400
    type: str | None = None
    param: str | None = None
    code: str | None = None

    @property
    def path(self) -> str:
        return "/v1/completions" if self.endpoint == "completions" else "/v1/chat/completions"

    def body(self, model: str) -> dict[str, Any]:
        base: dict[str, Any] = {"model": model, "max_tokens": 1, "temperature": 0}
        if self.endpoint == "completions":
            base["prompt"] = "Hello"
        else:
            base["messages"] = [{"role": "user", "content": "Hello"}]
        for key, value in self.changes.items():
            if value is DROP:
                base.pop(key, None)
            else:
                base[key] = value
        return base

    def send(self, http: httpx.Client, model: str) -> httpx.Response:
        if self.raw is not None:
            return http.post(self.path, content=self.raw, headers={"content-type": "application/json"})
        return http.post(self.path, json=self.body(model))


def assert_error_body(body: Any) -> dict[str, Any]:
    """`body` is OpenAI's error JSON; return its `error` object."""
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), (
        f"not an OpenAI error body: {body!r}"
    )
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"], f"error.message missing: {error}"
    assert isinstance(error.get("type"), str) and error["type"], f"error.type missing: {error}"
    for key in ("param", "code"):
        assert key in error, f"error.{key} must be present (string or null): {error}"
        assert error[key] is None or isinstance(error[key], str), f"error.{key} not a string/null: {error}"
    return error


def assert_refused(response: httpx.Response, case: BadRequest) -> dict[str, Any]:
    assert response.status_code == case.status, (
        f"expected HTTP {case.status}, got {response.status_code}: {response.text[:300]}"
    )
    try:
        body = response.json()
    except ValueError:
        pytest.fail(f"error response is not JSON: {response.text[:300]!r}")
    error = assert_error_body(body)
    for key in ("type", "param", "code"):
        expected = getattr(case, key)
        if expected is not None:
            assert error[key] == expected, f"error.{key} is {error[key]!r}, expected {expected!r}: {error}"
    return error


def bad(endpoint: str, case_id: str, **kwargs: Any) -> Any:
    return pytest.param(BadRequest(endpoint, **kwargs), id=f"{endpoint}-{case_id}")


BOTH = ("completions", "chat")
TOOLS = [
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}
]

BAD_REQUESTS = [
    *(
        bad(e, "malformed-json", raw=b'{"model": "m", "max_tokens": 1,', type="invalid_request_error")
        for e in BOTH
    ),
    bad("completions", "body-is-array", raw=b"[]"),
    bad("completions", "body-is-string", raw=b'"The capital of France is"'),
    bad("chat", "body-is-number", raw=b"42"),
    bad("completions", "missing-prompt", changes={"prompt": DROP}),
    bad("chat", "missing-messages", changes={"messages": DROP}),
    *(bad(e, "missing-model", changes={"model": DROP}) for e in BOTH),
    *(
        bad(e, "unknown-model", changes={"model": "no-such-model"}, status=404, code="model_not_found")
        for e in BOTH
    ),
    bad("chat", "empty-messages", changes={"messages": []}, param="messages"),
    bad("chat", "invalid-role", changes={"messages": [{"role": "wizard", "content": "Hello"}]}),
    bad("chat", "message-without-content", changes={"messages": [{"role": "user"}]}),
    bad("completions", "two-prompts", changes={"prompt": ["Hello", "Bye"]}),
    bad("completions", "five-stop-strings", changes={"stop": ["a", "b", "c", "d", "e"]}),
    *(bad(e, "n-2", changes={"n": 2}, param="n") for e in BOTH),
    bad("chat", "logprobs", changes={"logprobs": True}, param="logprobs"),
    bad("completions", "logprobs", changes={"logprobs": 1}, param="logprobs"),
    bad("chat", "tools", changes={"tools": TOOLS}, param="tools"),
    *(
        bad(e, f"temperature={t}", changes={"temperature": t}, param="temperature")
        for e in BOTH
        for t in (-1, 5)
    ),
    *(bad(e, "top-p-0", changes={"top_p": 0}) for e in BOTH),
    *(
        bad(e, f"max_tokens={n}", changes={"max_tokens": n}, param="max_tokens")
        for e in BOTH
        for n in (0, -3)
    ),
]


# --- discovery and health -------------------------------------------------------------


def test_models_lists_exactly_one_model(http: httpx.Client) -> None:
    """GET /v1/models is an OpenAI model list with a single hearth-owned model."""
    response = http.get("/v1/models")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body.get("object") == "list", body
    assert isinstance(body.get("data"), list) and len(body["data"]) == 1, f"expected one model: {body}"
    model = body["data"][0]
    assert isinstance(model.get("id"), str) and model["id"], model
    assert model.get("object") == "model", model
    assert isinstance(model.get("created"), int) and not isinstance(model["created"], bool), model
    assert model.get("owned_by") == "hearth", model


def test_health_reports_status_and_idle_counters(server: HearthServer, model_id: str) -> None:
    """GET /health says ok, names the served model, and shows no work while idle."""
    health = server.health()
    assert health.get("status") == "ok", health
    assert health.get("model") == model_id, f"/health model {health.get('model')!r} != {model_id!r}"
    for key in ("active_requests", "queued_requests", "generated_tokens_total"):
        assert isinstance(health.get(key), int) and health[key] >= 0, f"{key}: {health}"
    assert health["active_requests"] == 0 and health["queued_requests"] == 0, f"idle server: {health}"


def test_generated_tokens_total_counts_sampled_tokens(
    server: HearthServer, client: openai.OpenAI, model_id: str
) -> None:
    """generated_tokens_total grows by exactly the tokens a request generated."""
    before = server.health()["generated_tokens_total"]
    completion = greedy_completion(client, model_id, CAPITAL.prompt, max_tokens=5)
    assert_usage(completion.usage, completion=5)
    after = server.health()["generated_tokens_total"]
    assert after - before == 5, f"generated_tokens_total went {before} -> {after} for a 5-token completion"


# --- completions ------------------------------------------------------------------------


@pytest.mark.reference_model
@pytest.mark.parametrize("ref", REFERENCES[:4], ids=lambda r: r.slug)
def test_greedy_completion_matches_llama_cpp(client: openai.OpenAI, model_id: str, ref: Reference) -> None:
    """Greedy 24-token completions equal llama.cpp's reference text, with real token counts."""
    completion = greedy_completion(client, model_id, ref.prompt, max_tokens=len(ref.generated_ids))
    assert completion.object == "text_completion"
    assert len(completion.choices) == 1, completion.choices
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.text == ref.text, (
        f"greedy text differs from llama.cpp:\n got {choice.text!r}\nwant {ref.text!r}\n{ref.divergence(choice.text)}"
    )
    assert choice.finish_reason == "length"
    assert_usage(completion.usage, prompt=len(ref.prompt_ids), completion=len(ref.generated_ids))


def test_prompt_as_single_element_list(client: openai.OpenAI, model_id: str) -> None:
    """prompt=[str] is served like prompt=str."""
    completion = greedy_completion(client, model_id, [CAPITAL.prompt], max_tokens=4)
    assert completion.choices[0].text == CAPITAL.prefix(4)
    assert_usage(completion.usage, prompt=len(CAPITAL.prompt_ids), completion=4)


@pytest.mark.parametrize("max_tokens", [1, 3])
def test_max_tokens_caps_completion(client: openai.OpenAI, model_id: str, max_tokens: int) -> None:
    """max_tokens=N yields N tokens and finish_reason "length" when the model would go on."""
    completion = greedy_completion(client, model_id, CAPITAL.prompt, max_tokens=max_tokens)
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.text == CAPITAL.prefix(max_tokens)
    assert_usage(completion.usage, completion=max_tokens)


# --- streaming ----------------------------------------------------------------------------


@pytest.mark.streaming
def test_streamed_completion_equals_non_streamed(client: openai.OpenAI, model_id: str) -> None:
    """The streamed text, finish_reason and usage of a greedy completion equal the non-streamed ones."""
    request: dict[str, Any] = {"model": model_id, "prompt": STORY.prompt, "max_tokens": 16, "temperature": 0}
    plain = client.completions.create(**request)
    streamed = stream_completion(client, **request, stream_options={"include_usage": True})
    assert streamed.text == plain.choices[0].text
    assert streamed.finish_reason == plain.choices[0].finish_reason == "length"
    assert streamed.finish_chunks == 1, f"finish_reason was set on {streamed.finish_chunks} chunks"
    assert streamed.usage is not None and plain.usage is not None, "usage missing"
    assert (streamed.usage.prompt_tokens, streamed.usage.completion_tokens) == (
        plain.usage.prompt_tokens,
        plain.usage.completion_tokens,
    )


@pytest.mark.streaming
def test_completion_stream_framing_with_usage(http: httpx.Client, model_id: str) -> None:
    """SSE framing: text_completion chunks, one finish chunk, a choices-less usage chunk, then [DONE]."""
    body = {
        "model": model_id,
        "prompt": CAPITAL.prompt,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = stream_chunks(sse_payloads(http, "/v1/completions", body), "text_completion")
    usage = assert_usage_chunk(chunks[-1])
    assert all(c.get("choices") for c in chunks[:-1]), "only the final usage chunk may have no choices"
    assert assert_finish_is_last(chunks[:-1]) == "length"
    text = "".join(c["choices"][0].get("text") or "" for c in chunks[:-1])
    assert text == CAPITAL.prefix(6)
    assert usage == {"prompt_tokens": len(CAPITAL.prompt_ids), "completion_tokens": 6, "total_tokens": 11}


@pytest.mark.streaming
def test_completion_stream_without_usage_option_has_no_usage_chunk(http: httpx.Client, model_id: str) -> None:
    """Without stream_options.include_usage every chunk carries a choice and the finish chunk is last."""
    body = {"model": model_id, "prompt": CAPITAL.prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    chunks = stream_chunks(sse_payloads(http, "/v1/completions", body), "text_completion")
    assert all(c.get("choices") for c in chunks), f"unexpected choices-less chunk: {chunks}"
    assert assert_finish_is_last(chunks) == "length"
    assert "".join(c["choices"][0].get("text") or "" for c in chunks) == CAPITAL.prefix(2)


@pytest.mark.streaming
@pytest.mark.chat
def test_chat_stream_framing_with_usage(http: httpx.Client, model_id: str) -> None:
    """SSE framing for chat: chat.completion.chunk deltas, one finish chunk, a usage chunk, [DONE]."""
    body = {
        "model": model_id,
        "messages": QUESTION,
        "max_tokens": 6,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = stream_chunks(sse_payloads(http, "/v1/chat/completions", body), "chat.completion.chunk")
    usage = assert_usage_chunk(chunks[-1])
    assert all(c.get("choices") for c in chunks[:-1]), "only the final usage chunk may have no choices"
    assert_finish_is_last(chunks[:-1])
    for chunk in chunks[:-1]:
        delta = chunk["choices"][0].get("delta")
        assert isinstance(delta, dict), f"chat chunk without a delta object: {chunk}"
        assert delta.get("role") in (None, "assistant"), f"delta role: {chunk}"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert content, "streamed chat produced no content"
    assert 1 <= usage["completion_tokens"] <= 6, usage
    assert usage["prompt_tokens"] > 20, f"chat template with default system message is longer: {usage}"


# --- sampling ------------------------------------------------------------------------------

SAMPLE_SEEDS = (11, 11, 12, 13)


@pytest.fixture(scope="module")
def seeded_samples(client: openai.OpenAI, model_id: str) -> list[str]:
    """Texts of the same temperature-0.8 request under SAMPLE_SEEDS (the first seed twice)."""
    return [
        client.completions.create(
            model=model_id, prompt=STORY.prompt, max_tokens=12, temperature=0.8, top_p=0.95, seed=seed
        )
        .choices[0]
        .text
        for seed in SAMPLE_SEEDS
    ]


@pytest.mark.sampling
def test_same_seed_gives_same_text(seeded_samples: list[str]) -> None:
    """Sampling at temperature 0.8 with a fixed seed is reproducible."""
    first, again = seeded_samples[0], seeded_samples[1]
    assert first == again, f"seed {SAMPLE_SEEDS[0]} gave {first!r} then {again!r}"
    assert first, "seeded sample is empty"


@pytest.mark.sampling
def test_different_seeds_give_different_text(seeded_samples: list[str]) -> None:
    """The seed actually drives sampling: other seeds do not all reproduce the first seed's text."""
    first, others = seeded_samples[0], seeded_samples[2:]
    assert any(text != first for text in others), (
        f"seeds {SAMPLE_SEEDS[2:]} all gave seed {SAMPLE_SEEDS[0]}'s text {first!r}"
    )


# --- stop sequences -------------------------------------------------------------------------


def expected_before_stop(text: str, stops: str | list[str]) -> str:
    """`text` cut right before the earliest occurrence of any stop string."""
    stop_list = [stops] if isinstance(stops, str) else stops
    cut = min(i for i in (text.find(s) for s in stop_list) if i >= 0)
    return text[:cut]


STOP_CASES = [
    pytest.param(".", id="str-period"),
    pytest.param(["."], id="list-period"),
    pytest.param(["aris"], id="inside-first-token"),
    pytest.param(["311", "Berlin", "London", "Madrid"], id="four-strings-multi-token"),
]


@pytest.mark.stop
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("stop", STOP_CASES)
def test_stop_sequence_ends_text_before_match(
    client: openai.OpenAI, model_id: str, stop: str | list[str], stream: bool
) -> None:
    """Generation ends right before the first stop match, which never shows in the text."""
    expected = expected_before_stop(CAPITAL.text, stop)
    request: dict[str, Any] = {
        "model": model_id,
        "prompt": CAPITAL.prompt,
        "max_tokens": 24,
        "temperature": 0,
        "stop": stop,
    }
    if stream:
        result = stream_completion(client, **request)
        text, finish = result.text, result.finish_reason
    else:
        choice = client.completions.create(**request).choices[0]
        text, finish = choice.text, choice.finish_reason
    assert text == expected, f"stop={stop!r}: got {text!r}, want {expected!r}"
    assert finish == "stop"
    stop_list = [stop] if isinstance(stop, str) else stop
    assert not any(s in text for s in stop_list), f"a stop string leaked into {text!r}"


# --- context window (second server, --context 256) ----------------------------------------


@pytest.mark.context
def test_request_within_small_context_is_served(
    small_context_client: openai.OpenAI, small_context_model_id: str
) -> None:
    """With --context 256 a short request is served as usual."""
    completion = greedy_completion(small_context_client, small_context_model_id, CAPITAL.prompt, max_tokens=4)
    assert completion.choices[0].text == CAPITAL.prefix(4)
    assert_usage(completion.usage, prompt=len(CAPITAL.prompt_ids), completion=4)


@pytest.mark.context
@pytest.mark.parametrize("endpoint", BOTH)
def test_prompt_longer_than_context_is_rejected(
    small_context_client: openai.OpenAI, small_context_model_id: str, small_context: int, endpoint: str
) -> None:
    """A prompt past the context window is a 400 context_length_exceeded."""
    long_text = " hello" * (small_context + 100)
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "completions":
            greedy_completion(small_context_client, small_context_model_id, long_text, max_tokens=1)
        else:
            greedy_chat(
                small_context_client,
                small_context_model_id,
                [{"role": "user", "content": long_text}],
                max_tokens=1,
            )
    assert_error_body(info.value.response.json())
    assert info.value.code == "context_length_exceeded", info.value.response.text


@pytest.mark.context
@pytest.mark.parametrize("endpoint", BOTH)
def test_max_tokens_past_context_is_rejected(
    small_context_client: openai.OpenAI, small_context_model_id: str, small_context: int, endpoint: str
) -> None:
    """prompt_tokens + max_tokens > context is a 400 context_length_exceeded on param max_tokens."""
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "completions":
            over_by_one = small_context - len(CAPITAL.prompt_ids) + 1
            greedy_completion(
                small_context_client, small_context_model_id, CAPITAL.prompt, max_tokens=over_by_one
            )
        else:
            greedy_chat(small_context_client, small_context_model_id, QUESTION, max_tokens=small_context)
    assert_error_body(info.value.response.json())
    assert info.value.code == "context_length_exceeded", info.value.response.text
    assert info.value.param == "max_tokens", info.value.response.text


@pytest.mark.context
def test_max_tokens_filling_context_exactly_is_accepted(
    small_context_server: HearthServer, small_context_model_id: str, small_context: int
) -> None:
    """prompt_tokens + max_tokens == context is allowed (read the first chunk, then hang up)."""
    body = {
        "model": small_context_model_id,
        "prompt": CAPITAL.prompt,
        "max_tokens": small_context - len(CAPITAL.prompt_ids),
        "temperature": 0,
        "stream": True,
    }
    with (
        httpx.Client(base_url=small_context_server.root_url, timeout=60) as own,
        own.stream("POST", "/v1/completions", json=body) as response,
    ):
        if response.status_code != 200:
            response.read()
        assert response.status_code == 200, (
            f"{body['max_tokens']} + prompt == context refused: {response.text}"
        )
        first = next(line for line in response.iter_lines() if line.startswith("data:"))
    assert "[DONE]" not in first, "stream ended without a chunk"


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.errors
@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_gets_openai_error(http: httpx.Client, model_id: str, case: BadRequest) -> None:
    """Invalid requests get the right status and OpenAI's error JSON, naming the param where fixed."""
    assert_refused(case.send(http, model_id), case)


@pytest.mark.errors
def test_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    """The openai client sees an unknown model as NotFoundError with code model_not_found."""
    with pytest.raises(openai.NotFoundError) as info:
        greedy_completion(client, "no-such-model", CAPITAL.prompt, max_tokens=1)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"


@pytest.mark.errors
@pytest.mark.chat
def test_empty_messages_raises_bad_request(client: openai.OpenAI, model_id: str) -> None:
    """The openai client sees empty messages as BadRequestError on param messages."""
    with pytest.raises(openai.BadRequestError) as info:
        greedy_chat(client, model_id, [], max_tokens=1)
    assert info.value.param == "messages"


@pytest.mark.errors
@pytest.mark.chat
@pytest.mark.parametrize(
    "param, value", [("n", 2), ("logprobs", True), ("tools", TOOLS)], ids=["n", "logprobs", "tools"]
)
def test_unsupported_parameter_raises_bad_request(
    client: openai.OpenAI, model_id: str, param: str, value: Any
) -> None:
    """The openai client sees an unsupported parameter as BadRequestError naming it."""
    with pytest.raises(openai.BadRequestError) as info:
        greedy_chat(client, model_id, QUESTION, max_tokens=1, **{param: value})
    assert info.value.param == param


@pytest.mark.errors
def test_server_keeps_serving_after_bad_requests(
    server: HearthServer, http: httpx.Client, client: openai.OpenAI, model_id: str
) -> None:
    """After the whole batch of bad requests the server is healthy, idle, and still answers correctly."""
    for param in BAD_REQUESTS:
        case: BadRequest = param.values[0]
        case.send(http, model_id)
    server.ensure_running()
    health = server.health()
    assert health["status"] == "ok" and health["active_requests"] == 0 and health["queued_requests"] == 0, (
        health
    )
    assert greedy_completion(client, model_id, CAPITAL.prompt, max_tokens=2).choices[
        0
    ].text == CAPITAL.prefix(2)


# --- concurrency and cancellation -----------------------------------------------------------


def first_sse_chunks(response: httpx.Response, count: int) -> list[str]:
    """Read up to `count` JSON data payloads from a streaming response."""
    payloads: list[str] = []
    for line in response.iter_lines():
        if line.startswith("data:") and "[DONE]" not in line:
            payloads.append(line)
            if len(payloads) == count:
                break
    return payloads


@pytest.mark.concurrency
@pytest.mark.streaming
def test_client_disconnect_stops_generation(server: HearthServer, model_id: str) -> None:
    """Closing a stream mid-way stops its generation: the token counter freezes, nothing stays active."""
    body = {
        "model": model_id,
        "prompt": STORY.prompt,
        "max_tokens": 2000,
        "temperature": 0.8,
        "seed": 1,
        "stream": True,
    }
    before = server.health()["generated_tokens_total"]
    with (
        httpx.Client(base_url=server.root_url, timeout=60) as own,  # its own connection, closed on exit
        own.stream("POST", "/v1/completions", json=body) as response,
    ):
        assert response.status_code == 200, response.read()
        received = first_sse_chunks(response, 3)
    assert len(received) == 3, f"the stream ended after {len(received)} chunks"
    time.sleep(1.0)  # grace period for the server to notice
    first = server.health()
    time.sleep(1.0)
    second = server.health()
    assert first["generated_tokens_total"] > before, "the streamed request generated nothing"
    assert second["generated_tokens_total"] == first["generated_tokens_total"], (
        "generation continues after the client hung up: generated_tokens_total "
        f"{first['generated_tokens_total']} -> {second['generated_tokens_total']} in 1 s"
    )
    assert second["active_requests"] == 0 and second["queued_requests"] == 0, second


@pytest.mark.concurrency
@pytest.mark.reference_model
def test_concurrent_requests_match_sequential(
    server: HearthServer, client: openai.OpenAI, model_id: str
) -> None:
    """Four greedy completions sent at once each equal the same request sent alone."""
    refs = REFERENCES[:4]
    max_tokens = 12

    def run(prompt: str) -> str:
        return greedy_completion(client, model_id, prompt, max_tokens=max_tokens).choices[0].text

    alone = [run(ref.prompt) for ref in refs]
    for ref, text in zip(refs, alone):
        assert text == ref.prefix(max_tokens), f"sequential {ref.prompt!r}: {text!r} != reference"

    barrier = threading.Barrier(len(refs))

    def run_together(prompt: str) -> str:
        barrier.wait(timeout=30)
        return run(prompt)

    peak_in_flight = 0
    with ThreadPoolExecutor(max_workers=len(refs)) as pool:
        futures = [pool.submit(run_together, ref.prompt) for ref in refs]
        while not all(f.done() for f in futures):
            health = server.health()
            peak_in_flight = max(peak_in_flight, health["active_requests"] + health["queued_requests"])
            time.sleep(0.05)
        together = [f.result() for f in futures]

    for ref, solo, concurrent in zip(refs, alone, together):
        assert concurrent == solo, f"{ref.prompt!r}: concurrent {concurrent!r} != alone {solo!r}"
    assert peak_in_flight >= 2, f"/health never showed more than {peak_in_flight} request(s) in flight"


# --- chat ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_answer(client: openai.OpenAI, model_id: str) -> ChatCompletion:
    """The non-streamed greedy answer to QUESTION."""
    return greedy_chat(client, model_id, QUESTION, max_tokens=32)


@pytest.mark.chat
def test_chat_greedy_answer(chat_answer: ChatCompletion) -> None:
    """A greedy chat completion is a well-formed assistant answer over the templated prompt."""
    assert chat_answer.object == "chat.completion"
    assert len(chat_answer.choices) == 1
    choice = chat_answer.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    content = choice.message.content
    assert isinstance(content, str) and content.strip(), f"empty answer: {content!r}"
    assert "<|im_end|>" not in content and "<|im_start|>" not in content, (
        f"special tokens leaked: {content!r}"
    )
    assert choice.finish_reason in FINISH_REASONS
    assert_usage(chat_answer.usage)
    assert chat_answer.usage is not None and chat_answer.usage.prompt_tokens > 20, (
        f"prompt_tokens {chat_answer.usage} too small for the chat template with its system message"
    )
    assert 1 <= chat_answer.usage.completion_tokens <= 32


@pytest.mark.chat
@pytest.mark.streaming
def test_chat_stream_equals_non_streamed(
    client: openai.OpenAI, model_id: str, chat_answer: ChatCompletion
) -> None:
    """The streamed greedy chat answer reassembles to the non-streamed one."""
    streamed = stream_chat(
        client,
        model=model_id,
        messages=QUESTION,
        max_tokens=32,
        temperature=0,
        stream_options={"include_usage": True},
    )
    assert streamed.text == chat_answer.choices[0].message.content
    assert streamed.finish_reason == chat_answer.choices[0].finish_reason
    assert streamed.usage is not None and chat_answer.usage is not None
    assert streamed.usage.prompt_tokens == chat_answer.usage.prompt_tokens
    assert streamed.usage.completion_tokens == chat_answer.usage.completion_tokens


def chat_prompt_tokens(client: openai.OpenAI, model: str, messages: list[ChatCompletionMessageParam]) -> int:
    usage = greedy_chat(client, model, messages, max_tokens=1).usage
    assert usage is not None, "chat response has no usage"
    return usage.prompt_tokens


@pytest.mark.chat
@pytest.mark.reference_model
def test_chat_explicit_default_system_message_matches_implicit(
    client: openai.OpenAI, model_id: str, chat_answer: ChatCompletion
) -> None:
    """Sending SmolLM2's default system message explicitly gives the same prompt as sending none."""
    explicit = chat_prompt_tokens(
        client, model_id, [{"role": "system", "content": SMOLLM2_DEFAULT_SYSTEM}, *QUESTION]
    )
    assert chat_answer.usage is not None
    assert explicit == chat_answer.usage.prompt_tokens, (
        f"explicit default system message: {explicit} prompt tokens; implicit: {chat_answer.usage.prompt_tokens}"
    )


@pytest.mark.chat
@pytest.mark.reference_model
def test_chat_user_system_message_replaces_default(
    client: openai.OpenAI, model_id: str, chat_answer: ChatCompletion
) -> None:
    """A user system message takes the default one's place: prompt_tokens shift by their length difference."""
    custom = "Answer in one word."
    with_custom = chat_prompt_tokens(client, model_id, [{"role": "system", "content": custom}, *QUESTION])
    assert chat_answer.usage is not None
    implicit = chat_answer.usage.prompt_tokens
    expected = (
        implicit
        - count_tokens(client, model_id, SMOLLM2_DEFAULT_SYSTEM)
        + count_tokens(client, model_id, custom)
    )
    assert with_custom == expected, (
        f"with system {custom!r}: {with_custom} prompt tokens, expected {expected} "
        f"(default-system prompt has {implicit})"
    )


@pytest.mark.chat
def test_chat_multi_turn_conversation(
    client: openai.OpenAI, model_id: str, chat_answer: ChatCompletion
) -> None:
    """A conversation with an earlier assistant turn is accepted and templated in full."""
    messages: list[ChatCompletionMessageParam] = [
        *QUESTION,
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    longer = chat_prompt_tokens(client, model_id, messages)
    assert chat_answer.usage is not None
    assert longer > chat_answer.usage.prompt_tokens + 5, (
        f"three turns: {longer} prompt tokens, one turn: {chat_answer.usage.prompt_tokens}"
    )
