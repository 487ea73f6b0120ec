"""Send one structured chat completion to an OpenAI-compatible endpoint and time it.

Streaming requests give time to first token (TTFT); every request gets an end-to-end latency,
token counts, finish_reason and the backend the server resolved (response header set by
guided_ab.attribution inside the vLLM process). Nothing here raises for a bad answer: every
outcome comes back as a RawResponse, to be classified by guided_ab.validation.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from .vllm_args import ATTRIBUTION_HEADER


@dataclass
class RawResponse:
    sent_at: float
    http_status: int | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    backend: str | None = None
    # transport-level failure: "timeout" | "connection_error" | "protocol" (garbage from the server)
    failure: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def chat_body(model: str, prompt: str, schema: dict, *, name: str, temperature: float, max_tokens: int, stream: bool) -> dict:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": temperature,
        "max_tokens": max_tokens,
        # response_format json_schema is the OpenAI-standard way; never the old `guided_json`,
        # which new vLLM servers silently ignore (unconstrained output, HTTP 200).
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64], "schema": schema},
        },
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _short(text: str, limit: int = 500) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _error_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
        if isinstance(data, dict):
            err = data.get("error", data)
            if isinstance(err, dict):
                return _short(str(err.get("message") or err))
            return _short(str(err))
    except ValueError:
        pass
    return _short(raw.decode("utf-8", "replace"))


async def _read_stream(resp: httpx.Response, out: RawResponse, t0: float) -> None:
    parts: list[str] = []
    done = False
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            out.failure, out.error = "protocol", f"malformed stream event: {_short(data, 200)}"
            return
        if not isinstance(chunk, dict):
            out.failure, out.error = "protocol", f"malformed stream event: {_short(data, 200)}"
            return
        if chunk.get("error"):
            out.failure, out.error = "protocol", f"error event in stream: {_short(str(chunk['error']))}"
            return
        for choice in chunk.get("choices") or []:
            delta = (choice.get("delta") or {}).get("content")
            if delta:
                if out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - t0
                parts.append(delta)
            if choice.get("finish_reason"):
                out.finish_reason = choice["finish_reason"]
        usage = chunk.get("usage")
        if usage:
            out.prompt_tokens = usage.get("prompt_tokens")
            out.completion_tokens = usage.get("completion_tokens")
    out.text = "".join(parts)
    if not done and out.finish_reason is None:
        out.failure, out.error = "connection_error", "stream ended before the answer was complete"


def _read_body(raw: bytes, out: RawResponse) -> None:
    try:
        data = json.loads(raw)
        choice = data["choices"][0]
        out.text = choice["message"]["content"] or ""
        out.finish_reason = choice.get("finish_reason")
        usage = data.get("usage") or {}
        out.prompt_tokens = usage.get("prompt_tokens")
        out.completion_tokens = usage.get("completion_tokens")
    except (ValueError, KeyError, IndexError, TypeError):
        out.failure, out.error = "protocol", f"HTTP 200 body is not a chat completion: {_short(raw.decode('utf-8', 'replace'), 200)}"


async def send_chat(
    http: httpx.AsyncClient,
    base_url: str,
    body: dict,
    *,
    api_key: str | None,
    timeout_s: float,
) -> RawResponse:
    """POST one chat completion; the whole exchange (headers and body) must end within timeout_s."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + "/v1/chat/completions"
    out = RawResponse(sent_at=time.time())
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            async with http.stream("POST", url, json=body, headers=headers) as resp:
                out.http_status = resp.status_code
                out.backend = resp.headers.get(ATTRIBUTION_HEADER)
                if resp.status_code != 200:
                    out.error = _error_message(await resp.aread())
                elif body.get("stream"):
                    await _read_stream(resp, out, t0)
                else:
                    _read_body(await resp.aread(), out)
    except (TimeoutError, httpx.TimeoutException):
        out.failure, out.error = "timeout", f"no complete answer within {timeout_s:g} s"
    except (httpx.TransportError, httpx.StreamError) as err:
        out.failure, out.error = "connection_error", f"{type(err).__name__}: {err}" or type(err).__name__
    out.latency_s = time.perf_counter() - t0
    return out
