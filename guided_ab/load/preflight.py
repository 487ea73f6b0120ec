"""Pre-flight: will each planned request fit the served model's context?

Before the A/B phase, every planned prompt is counted with the served model's own tokenizer
(vLLM's `POST /tokenize` with the request's `messages` and `tools`, which applies the same chat
template the server will: `{"count", "max_model_len", ...}`), and a request whose prompt plus
`max_tokens` exceeds `max_model_len` is named: the server would refuse it (`context_overflow`),
whatever the backend. The workload's `preflight` setting says what then happens (phases.py):
`keep` sends it and classifies the refusal, `drop` replaces it with another request of the pool.

Only arms this project serves (local, Modal: vLLM, where /tokenize exists) are counted; an
external endpoint may not serve /tokenize, and is not asked. A server that does not answer
/tokenize leaves the count unknown (said so), never a failed phase.
"""

from __future__ import annotations

from typing import Any

import httpx

from guided_ab.config import Workload
from guided_ab.workload import WorkItem


def prompt_request(item: WorkItem, wl: Workload) -> tuple[dict[str, Any], int]:
    """(the /tokenize body: messages and tools as the chat request sends them, the request's max_tokens)."""
    if item.body is not None:
        body = item.body
        out: dict[str, Any] = {"messages": body["messages"]}
        if body.get("tools"):
            out["tools"] = body["tools"]
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or wl.max_tokens
        return out, int(max_tokens)
    return {"messages": [{"role": "user", "content": item.render(wl.prompt_template)}]}, wl.max_tokens


def count_prompts(items: list[WorkItem], base_url: str, model: str, wl: Workload, *,
                  api_key: str | None = None, timeout_s: float = 10.0,
                  transport: httpx.BaseTransport | None = None) -> dict[str, Any]:
    """Count every item's prompt tokens on one server: {"counted", "not_counted", "max_model_len",
    "too_long": [{"schema_id", "custom_id", "prompt_tokens", "max_tokens", "max_model_len"}],
    "tokens": {schema_id: count}, "counted_by", "error"}. Stops at the first failure (a server
    without /tokenize answers every request alike)."""
    url = base_url.rstrip("/") + "/tokenize"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    out: dict[str, Any] = {"counted_by": f"{url} (the served model's tokenizer and chat template)", "counted": 0,
                           "not_counted": 0, "max_model_len": None, "too_long": [], "tokens": {}, "error": None}
    with httpx.Client(timeout=timeout_s, headers=headers, transport=transport) as http:
        for i, item in enumerate(items):
            payload, max_tokens = prompt_request(item, wl)
            try:
                resp = http.post(url, json={"model": model, **payload})
                resp.raise_for_status()
                data = resp.json()
                count, limit = int(data["count"]), int(data["max_model_len"])
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as err:
                out["error"] = f"{url}: {type(err).__name__}: {str(err)[:200]}"
                out["not_counted"] = len(items) - i
                break
            out["counted"] += 1
            out["max_model_len"] = limit
            out["tokens"][item.schema_id] = count
            if count + max_tokens > limit:
                out["too_long"].append({"schema_id": item.schema_id, "custom_id": item.custom_id, "prompt_tokens": count,
                                        "max_tokens": max_tokens, "max_model_len": limit})
    return out


def summary(result: dict[str, Any]) -> str:
    """One line for the console and the logs."""
    if not result.get("counted"):
        return f"pre-flight: prompts not counted ({result.get('error') or result.get('skipped') or 'nothing to count'})"
    n_bad = len(result["too_long"])
    line = (f"pre-flight: {result['counted']} prompts counted with {result['counted_by']}; {n_bad} cannot fit "
            f"max_model_len {result['max_model_len']} - max_tokens")
    if n_bad:
        line += " (" + ", ".join(f"{t['schema_id']} {t['prompt_tokens']}+{t['max_tokens']}" for t in result["too_long"][:5])
        line += ", ...)" if n_bad > 5 else ")"
    if result.get("dropped"):
        line += f"; dropped and replaced: {len(result['dropped'])}"
    return line
