import pytest

from guided_ab.load.classify import classify
from guided_ab.load.client import RawResponse

SCHEMA = {
    "type": "object",
    "properties": {"email": {"type": "string", "format": "email"}, "n": {"type": "integer", "minimum": 1}},
    "required": ["email", "n"],
    "additionalProperties": False,
}


def raw(**kw):
    base = dict(sent_at=0.0, http_status=200, finish_reason="stop", text='{"email": "a@b.co", "n": 2}')
    base.update(kw)
    return RawResponse(**base)


@pytest.mark.parametrize(
    "kw, outcome",
    [
        ({}, "success"),
        ({"http_status": 400, "text": None, "error": "Grammar error: Unimplemented keys"}, "rejected"),
        ({"http_status": 503, "text": None}, "server_error"),
        ({"failure": "timeout", "http_status": None}, "timeout"),
        ({"failure": "connection_error", "http_status": 200}, "connection_error"),
        ({"failure": "protocol"}, "invalid_json"),
        ({"failure": "rejected", "error": "HTTP 400 (in stream): Grammar error"}, "rejected"),  # vLLM streams its 400s
        ({"failure": "server_error", "error": "HTTP 500 (in stream): boom"}, "server_error"),
        ({"finish_reason": "length", "text": '{"email": "a@'}, "truncated"),
        ({"text": "sure! here it is"}, "invalid_json"),
        ({"text": '{"email": "not-an-email", "n": 2}'}, "schema_violation"),  # format is checked
        ({"text": '{"email": "a@b.co", "n": 0}'}, "schema_violation"),
        ({"text": '{"email": "a@b.co", "n": 2, "x": 1}'}, "schema_violation"),
    ],
)
def test_each_answer_gets_exactly_one_class(kw, outcome):
    got, error = classify(raw(**kw), SCHEMA)
    assert got == outcome
    assert (error is None) == (outcome == "success")


def test_rejection_keeps_the_server_message():
    _, error = classify(raw(http_status=400, error="Grammar error: Unimplemented keys: [\"uniqueItems\"]"), SCHEMA)
    assert "uniqueItems" in error


def test_vllm_stream_error_event_is_classified_by_its_code():
    from guided_ab.load.client import stream_error

    assert stream_error({"message": "Grammar error: Unimplemented keys", "code": 400})[0] == "rejected"
    assert stream_error({"message": "engine dead", "code": 503})[0] == "server_error"
    assert stream_error("garbage")[0] == "protocol"
