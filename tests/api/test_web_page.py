"""The web page at `/`: served to anyone (it holds no data), and its script, run in Node
against the real server with a minimal stand-in for the browser's DOM, shows the cluster
and streams a chat answer; behind an API key, it asks for the key, then works with it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from conftest import API_KEY, HearthServer

# A stand-in for the few DOM and browser calls the page makes, then the page's own script,
# then the steps of the test: a cluster refresh, an optional key, and one chat turn.
HARNESS = r"""
const base = process.env.HEARTH_ROOT;
const elements = new Map();
function element(id) {
  const e = {
    id, textContent: "", value: "", disabled: false, className: "", style: {},
    scrollTop: 0, scrollHeight: 0, children: [], listeners: {},
    appendChild(child) { this.children.push(child); return child; },
    replaceChildren() { this.children = []; },
    addEventListener(type, fn) { this.listeners[type] = fn; },
    requestSubmit() { this.listeners.submit({ preventDefault() {} }); },
  };
  return e;
}
globalThis.document = {
  getElementById(id) { if (!elements.has(id)) elements.set(id, element(id)); return elements.get(id); },
  createElement(tag) { return element(tag); },
};
const store = new Map();
globalThis.localStorage = { getItem: (k) => store.get(k) ?? null, setItem: (k, v) => store.set(k, v) };
globalThis.setInterval = () => 0;
const realFetch = globalThis.fetch;
globalThis.fetch = (path, options) => realFetch(base + path, options);
async function until(check, what) {
  for (let i = 0; i < 200; i++) { if (check()) return; await new Promise((r) => setTimeout(r, 100)); }
  throw new Error("timed out waiting for " + what);
}
"""

STEPS = r"""
(async () => {
  const get = (id) => document.getElementById(id);
  const key = process.env.HEARTH_KEY;
  if (key) {
    await until(() => get("key-row").style.display === "block", "the page to ask for the key");
    get("key").value = key;
    get("key-save").listeners.click();
  }
  await until(() => get("nodes").children.length > 0, "the cluster table");
  const rows = get("nodes").children.map((row) => row.children.map((cell) => cell.textContent));
  get("prompt").value = "What is the capital of France?";
  get("chat").listeners.submit({ preventDefault() {} });
  await until(() => !get("send").disabled && get("log").children.length === 2 && get("log").children[1].textContent, "a reply");
  console.log(JSON.stringify({
    summary: get("summary").textContent,
    rows,
    user: get("log").children[0].textContent,
    reply: get("log").children[1].textContent,
    // The page keeps a turn only when its answer came through whole.
    turns: history.length,
  }));
})().catch((error) => { console.error(error); process.exit(1); });
"""


def page_script(server: HearthServer) -> str:
    response = httpx.get(server.root_url + "/", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert "connect-src 'self'" in response.headers["content-security-policy"]
    scripts = re.findall(r"<script>(.*?)</script>", response.text, re.S)
    assert len(scripts) == 1, "the page should carry exactly one inline script"
    return scripts[0]


def run_page(server: HearthServer, tmp_path: Path, key: str | None) -> dict:
    node = shutil.which("node")
    if node is None:
        pytest.skip("SKIPPED: Node.js is not installed, so the web page's script cannot be run")
    script = tmp_path / "page.js"
    script.write_text(HARNESS + page_script(server) + STEPS)
    env = {"HEARTH_ROOT": server.root_url, "PATH": "/usr/bin:/bin"}
    if key:
        env["HEARTH_KEY"] = key
    done = subprocess.run([node, str(script)], capture_output=True, text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, f"the page's script failed:\n{done.stderr}\n{done.stdout}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_page_shows_the_cluster_and_chats(server: HearthServer, tmp_path: Path) -> None:
    shown = run_page(server, tmp_path, None)
    assert "ready" in shown["summary"] and "node(s)" in shown["summary"], shown
    assert shown["rows"] and shown["rows"][0][4] == "0..30" and shown["rows"][0][5] == "ready", shown["rows"]
    assert shown["user"] == "What is the capital of France?"
    # The page samples as the server does by default, so the answer's words vary.
    assert shown["turns"] == 2 and shown["reply"].strip(), f"the chat failed: {shown['reply']!r}"



def test_the_page_is_open_and_asks_for_the_key(keyed_server: HearthServer, tmp_path: Path) -> None:
    assert httpx.get(keyed_server.root_url + "/", timeout=10).status_code == 200
    shown = run_page(keyed_server, tmp_path, API_KEY)
    assert "ready" in shown["summary"], shown
    assert shown["turns"] == 2 and shown["reply"].strip(), f"the chat failed: {shown['reply']!r}"
