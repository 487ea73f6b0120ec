"""Attribution of requests vLLM rejects under `auto` (issue 9: seen on vLLM 0.26 on an H100).

When validation raises, `auto` went: xgrammar refused -> outlines if guidance cannot take the
schema (vLLM's own has_guidance_unsupported_json_features, e.g. patternProperties), else guidance.
These tests stub vLLM's modules, so they run where vLLM is not installed.
"""

import sys
import types

import pytest

from guided_ab.in_server import attribution


@pytest.fixture
def fake_vllm(monkeypatch):
    def xgrammar_refuses(params):
        raise ValueError("The provided JSON schema contains features not supported by xgrammar.")

    class SamplingParams:
        def __init__(self, structured_outputs=None):
            self.structured_outputs = structured_outputs

        def _validate_structured_outputs(self, *args):
            raise ValueError("Grammar error: rejected")

    class StructuredOutputsParams:
        def __init__(self, json=None):
            self.json = json
            self._backend = "auto"

    mods = {
        "vllm": types.ModuleType("vllm"),
        "vllm.sampling_params": types.SimpleNamespace(SamplingParams=SamplingParams, StructuredOutputsParams=StructuredOutputsParams),
        "vllm.v1": types.ModuleType("vllm.v1"),
        "vllm.v1.structured_output": types.ModuleType("vllm.v1.structured_output"),
        "vllm.v1.structured_output.backend_xgrammar": types.SimpleNamespace(validate_xgrammar_grammar=xgrammar_refuses),
        "vllm.v1.structured_output.backend_guidance": types.SimpleNamespace(
            has_guidance_unsupported_json_features=lambda s: "patternProperties" in str(s)),
    }
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    so_config = types.SimpleNamespace(backend="auto")
    proc = types.SimpleNamespace(structured_outputs_config=so_config, model_config=None, tokenizer=None)
    return types.SimpleNamespace(input_processor=proc), mods


def test_rejected_auto_request_guidance_cannot_take_is_attributed_to_outlines(fake_vllm):
    engine, _ = fake_vllm
    schema = {"type": "object", "patternProperties": {"^x-": {"type": "string"}}}
    assert attribution.resolve_backend(engine, schema) == "outlines"


def test_rejected_auto_request_otherwise_is_attributed_to_guidance(fake_vllm):
    engine, _ = fake_vllm
    assert attribution.resolve_backend(engine, {"type": "string", "format": "topic"}) == "guidance"


def test_versions_without_the_guidance_check_fall_back_to_guidance(fake_vllm, monkeypatch):
    engine, mods = fake_vllm
    monkeypatch.setitem(sys.modules, "vllm.v1.structured_output.backend_guidance", types.SimpleNamespace())
    assert attribution.resolve_backend(engine, {"patternProperties": {}}) == "guidance"
