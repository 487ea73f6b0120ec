#!/usr/bin/env bash
# Runs ON the lent GPU machine, in the repository copy the device tool made (the last call of
# bench/gpu/send.md's sequence): joins the pieces earlier calls left in /tmp/pieces with the one
# this call carries, unpacks the two Python sites and the JSONSchemaBench subsets, and runs
#   python3 -m guided_ab.cli run configs/gpu-h100.yaml
# exactly as here, with the vLLM server Python = the image's python3 + the carried vLLM site.
# What comes back through $OUT: run.log, the run directory (runs.tgz), checks.txt, pip-freeze.txt.
#
# Usage (device): bash bench/gpu/remote.sh [CONFIG]      env: RUN_TIMEOUT_S (default 500)
set -uo pipefail
R=$(pwd)
G=/tmp/gpu
O=${OUT:-/tmp/out}
CONFIG=${1:-configs/gpu-h100.yaml}
mkdir -p /tmp/pieces "$O"
t0=$(date +%s)
stamp() { echo "[remote +$(( $(date +%s) - t0 ))s] $*"; }

cp .gpu-pieces/part-* /tmp/pieces/ 2>/dev/null
stamp "pieces: $(ls /tmp/pieces | tr '\n' ' ')"
want=$(awk '/^sha256/{print $2}' bench/gpu/pieces.manifest)
have=$(cat /tmp/pieces/part-* | sha256sum | cut -d' ' -f1)
if [ "$want" != "$have" ]; then
  stamp "pieces incomplete or corrupt: sha256 $have, manifest says $want"; ls -l /tmp/pieces; exit 3
fi
if [ "$(cat "$G/.sha256" 2>/dev/null)" = "$have" ]; then  # a re-run on the same warm machine
  stamp "already unpacked"
else
  rm -rf "$G" && mkdir -p "$G" && cat /tmp/pieces/part-* | tar -xz -C "$G" || { stamp "unpack failed"; exit 3; }
  echo "$have" > "$G/.sha256"
  stamp "unpacked: $(du -sh $G | cut -f1)"
fi

# the config's suite is ../shared/jsonschemabench (relative to the repo root), as on a developer's checkout
mkdir -p "$R/../shared" && ln -sfn "$G/jsonschemabench" "$R/../shared/jsonschemabench"

# The server's Python: the image's python3 (torch 2.11 cu130) + the vLLM site, without the
# orchestrator's site (vLLM pins fastapi<0.137, Prefect 3.9 needs >=0.139). local.py prepends
# the repo root to PYTHONPATH (for guided_ab.in_server.attribution); that stays.
cat > "$G/vpython" <<EOF
#!/bin/sh
PP=\$(printf %s "\${PYTHONPATH:-}" | tr ':' '\n' | grep -vx "$G/osite" | paste -sd: -)
export PYTHONPATH="$G/vsite\${PP:+:\$PP}"
exec python3 "\$@"
EOF
chmod +x "$G/vpython"
export GUIDED_AB_VLLM_PYTHON="$G/vpython"
export PYTHONPATH="$G/osite:$R"
export PREFECT_HOME=/tmp/prefect-home GUIDED_AB_CACHE=/tmp/guided-ab-cache
export VLLM_USE_FLASHINFER_SAMPLER=0  # flashinfer is not carried: PyTorch top-k/top-p sampler
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PYTHONUNBUFFERED=1
# kept as the image sets them (KINDS.md): NVLink multicast off
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
  "$G/vpython" -c 'import vllm, xgrammar, llguidance; from importlib.metadata import version as v; print("vllm", vllm.__version__, "xgrammar", v("xgrammar"), "llguidance", v("llguidance"), "apache-tvm-ffi", v("apache-tvm-ffi"))'
  python3 -c 'import prefect, guided_ab.cli; print("prefect", prefect.__version__)'
} 2>&1 | tee "$O/checks.txt"
grep -q '^vllm ' "$O/checks.txt" || { stamp "vLLM does not import with the carried site"; exit 4; }
stamp "imports checked"
python3 -m pip list --format=freeze > "$O/pip-freeze.txt" 2>/dev/null

# the embedded model, converted by the product's own code with the server Python (timed apart)
python3 -c "from guided_ab.arms.local_model import ensure_embedded_model; print(ensure_embedded_model('$G/vpython'))" 2>&1 | tail -3
stamp "model ready"

stamp "guided-ab run $CONFIG"
timeout "${RUN_TIMEOUT_S:-500}" python3 -m guided_ab.cli run "$CONFIG" > "$O/run.log" 2>&1
rc=$?
stamp "guided-ab run exited $rc"
tail -60 "$O/run.log"
for f in runs/*/logs/*.log; do [ -f "$f" ] && { echo "== $f"; grep -E "Error|error|Traceback|backend|Using|FLASH|compile|graph" "$f" | tail -8; }; done
tar -czf "$O/runs.tgz" runs 2>/dev/null
ls -la "$O"
exit $rc
