"""Batch API request lines for replay tests, made from the built-in suite's function signatures:
tool calls (named and "required") and response_format answers, plus requests that cannot fit a
4096-token context. Also writes configs/replay.jsonl (`python tests/replay_lines.py`)."""

from __future__ import annotations

import json
import re
import sys
from importlib import resources
from pathlib import Path


def suite() -> list[dict]:
    return json.loads(resources.files("guided_ab.suites").joinpath("functions.json").read_text())


def _name(sid: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", sid)[:64]


def line(cid: str, body: dict) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body}


def tool_line(e: dict, *, named: bool, max_tokens: int) -> dict:
    fn = {"name": _name(e["id"]), "description": e["prompt"][:120], "parameters": e["schema"]}
    choice = {"type": "function", "function": {"name": fn["name"]}} if named else "required"
    return line(f"tool-{e['id']}", {
        "messages": [{"role": "system", "content": "You call functions."}, {"role": "user", "content": e["prompt"]}],
        "max_tokens": max_tokens, "temperature": 0.0, "tools": [{"type": "function", "function": fn}],
        "tool_choice": choice,
    })


def answer_line(e: dict, *, max_tokens: int) -> dict:
    return line(f"json-{e['id']}", {
        "messages": [{"role": "user", "content": e["prompt"] + "\nAnswer with one compact JSON object."}],
        "max_tokens": max_tokens, "temperature": 0.0,
        "response_format": {"type": "json_schema", "json_schema": {"name": _name(e["id"]), "schema": e["schema"]}},
    })


def overflow_lines(max_tokens: int) -> list[dict]:
    """Two requests whose prompt alone cannot fit a 4096-token context (one far over, counted by
    characters; one just over, counted in tokens), and one whose prompt fits alone but not with its
    max_tokens on top (vLLM 0.32 may run it and stop at the context's end: truncated)."""
    e = suite()[0]
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": e["schema"]}}
    huge = "Please read this log line carefully. " * 2500  # ~17k tokens
    over = "hello " * 4080  # ~4110 tokens with the chat template
    near = "hello " * 4020  # ~4050 tokens with the chat template: fits 4096 alone, not with max_tokens on top
    return [
        line("overflow-huge", {"messages": [{"role": "user", "content": huge}], "max_tokens": max_tokens,
                               "temperature": 0.0, "response_format": fmt}),
        line("overflow-tokens", {"messages": [{"role": "user", "content": over}], "max_tokens": max_tokens,
                                 "temperature": 0.0, "response_format": fmt}),
        line("overflow-budget", {"messages": [{"role": "user", "content": near}], "max_tokens": max_tokens,
                                 "temperature": 0.0, "response_format": fmt}),
    ]


def bad_parameter_line(max_tokens: int) -> dict:
    """A request refused for a sampling parameter (top_p out of range): invalid_request."""
    e = suite()[1]
    ln = answer_line(e, max_tokens=max_tokens)
    ln["custom_id"] = "bad-top-p"
    ln["body"]["top_p"] = 5.0
    return ln


def mixed(n_tool: int, n_json: int, max_tokens: int) -> list[dict]:
    s = suite()
    tools = [tool_line(e, named=i % 2 == 0, max_tokens=max_tokens) for i, e in enumerate(s[:n_tool])]
    answers = [answer_line(e, max_tokens=max_tokens) for e in s[n_tool:n_tool + n_json]]
    out = []
    for i in range(max(len(tools), len(answers))):  # interleaved, as traffic would be
        out += tools[i:i + 1] + answers[i:i + 1]
    return out


def write(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("configs/replay.jsonl")
    write(out, mixed(7, 7, 96) + overflow_lines(96))
    print(out)
