"""API keys: with `--api-key`, the right bearer token works; a wrong or missing one gets a
401 in OpenAI's error format, which the official client raises as AuthenticationError."""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import API_KEY, HearthServer

pytestmark = pytest.mark.auth


def client(server: HearthServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=60)


def test_the_right_key_is_served(keyed_server: HearthServer) -> None:
    """A completion with the configured key succeeds."""
    with client(keyed_server, API_KEY) as api:
        model = api.models.list().data[0].id
        completion = api.completions.create(model=model, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens == 3


@pytest.mark.parametrize("key", ["wrong-key", API_KEY + "x", API_KEY[:-1]])
def test_a_wrong_key_gets_401(keyed_server: HearthServer, key: str) -> None:
    """Near misses are refused too: the comparison is exact."""
    with client(keyed_server, key) as api, pytest.raises(openai.AuthenticationError) as raised:
        api.models.list()
    assert raised.value.status_code == 401
    body = raised.value.body
    assert isinstance(body, dict) and body.get("code") == "invalid_api_key", body


def test_a_missing_key_gets_401_in_openai_shape(keyed_server: HearthServer) -> None:
    """No Authorization header at all: 401 with OpenAI's error JSON, on every /v1 route."""
    for method, path in [("GET", "/models"), ("GET", "/cluster"), ("POST", "/completions"), ("POST", "/chat/completions")]:
        response = httpx.request(method, keyed_server.base_url + path, json={}, timeout=10)
        assert response.status_code == 401, (path, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "invalid_api_key"


def test_health_stays_open(keyed_server: HearthServer) -> None:
    """Supervisors probe /health without the key."""
    assert httpx.get(keyed_server.root_url + "/health", timeout=10).status_code == 200
