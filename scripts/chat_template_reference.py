#!/usr/bin/env python3
"""Renders of real models' chat templates by Jinja2 set up as Hugging Face `transformers`
sets it up, for `models/tests/chat_templates.rs` to compare Hearth's renders with.

The templates (`models/tests/fixtures/chat_templates/*.jinja`) are the models' own, as
llama.cpp keeps them in `models/templates/`. Writes
`models/tests/fixtures/chat_templates/renders.json`.

    python3 scripts/chat_template_reference.py
"""

import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

FIXTURES = Path(__file__).resolve().parent.parent / "models/tests/fixtures/chat_templates"
# Each template with the special tokens its tokenizer gives it (None: undefined).
TEMPLATES = {
    "openai-gpt-oss-120b.jinja": ("<|startoftext|>", "<|return|>"),
    "deepseek-ai-DeepSeek-V3.1.jinja": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "moonshotai-Kimi-K2.jinja": ("[BOS]", "[EOS]"),
    "Qwen-Qwen3-0.6B.jinja": (None, "<|im_end|>"),
    "meta-llama-Llama-3.3-70B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
}
CONVERSATIONS = [
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}], True),
    (
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello. How can I help?"},
            {"role": "user", "content": "Name a prime."},
        ],
        True,
    ),
    ([{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes."}], False),
]


def environment() -> ImmutableSandboxedEnvironment:
    """As `transformers.utils.chat_template_utils._compile_jinja_template`."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def main() -> None:
    env = environment()
    cases = []
    for name, (bos, eos) in TEMPLATES.items():
        template = env.from_string((FIXTURES / name).read_text())
        for messages, add_generation_prompt in CONVERSATIONS:
            tokens = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
            rendered = template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None, **tokens
            )
            cases.append(
                {
                    "template": name,
                    "bos_token": bos,
                    "eos_token": eos,
                    "messages": messages,
                    "add_generation_prompt": add_generation_prompt,
                    "rendered": rendered,
                }
            )
    out = FIXTURES / "renders.json"
    out.write_text(json.dumps({"jinja2": jinja2.__version__, "cases": cases}, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {out}: {len(cases)} renders")


if __name__ == "__main__":
    main()
