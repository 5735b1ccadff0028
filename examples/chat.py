#!/usr/bin/env python3
"""Streams a chat reply from a running `hearth serve` with the official OpenAI client.

    hearth serve &                      # serves the default model on 127.0.0.1:5280
    python3 examples/chat.py "Why is the sky blue?"
"""
import sys

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:5280/v1", api_key="unused")
model = client.models.list().data[0].id
question = " ".join(sys.argv[1:]) or "What is the capital of France?"
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": question}],
    max_tokens=200,
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
