"""Known secrets out of whatever a server sent, before it is stored or shown.

A server may echo what it was sent: an error body quoting the request's Authorization header,
an answer repeating it, a log line. The API keys of a run are known (the client sends them), so
every text that came from a server (answer, error message, headers, a server log's tail) passes
through `redact` with them before it reaches a record, a report, a log or the terminal.

A text may also hold only the start of a key, where an error message was cut to a length:
any run of at least PREFIX_MIN characters that matches the start of a key is redacted too.
Standard library only.
"""

from __future__ import annotations

from collections.abc import Iterable

MARK = "REDACTED"
SECRET_MIN = 6  # shorter "keys" (a test's "k") would redact ordinary words
PREFIX_MIN = 10


def _secrets(secrets: Iterable[str | None]) -> list[str]:
    return sorted({s for s in secrets if s and len(s) >= SECRET_MIN}, key=len, reverse=True)


def redact(text: str | None, secrets: Iterable[str | None]) -> str | None:
    """`text` with every known secret (and any cut-off start of one) replaced by MARK."""
    if not text:
        return text
    for s in _secrets(secrets):
        if s in text:
            text = text.replace(s, MARK)
        if len(s) <= PREFIX_MIN or s[:PREFIX_MIN] not in text:
            continue
        out, i = [], 0
        while (j := text.find(s[:PREFIX_MIN], i)) >= 0:
            n = PREFIX_MIN
            while j + n < len(text) and n < len(s) and text[j + n] == s[n]:
                n += 1
            out += [text[i:j], MARK]
            i = j + n
        text = "".join(out) + text[i:]
    return text


def redact_bytes(data: bytes, secrets: Iterable[str | None]) -> bytes:
    """`redact` for a raw body (before it is decoded, shortened or parsed)."""
    for s in _secrets(secrets):
        data = data.replace(s.encode(), MARK.encode())
    return data
