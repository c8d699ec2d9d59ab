#!/usr/bin/env bash
# Decoder on one GPU, realsize models (published dimensions, random weights) or a real checkpoint:
#   1. batched == unbatched on the device (float32; bfloat16 flow with a looser bound),
#   2. bench_decoder_batching.py for 1..64 concurrent streams: flow float32, flow bfloat16, and flow
#      bfloat16 with the estimator compiled with CUDA graphs (reduce-overhead),
#   3. one results table: benchmarks/results/decoder_batching-gpu.md.
# About 5-8 minutes on one H100. Needs a CUDA build of torch in $PYTHON (default .venv/bin/python).
#   benchmarks/gpu_decoder.sh                    # realsize random weights
#   DECODER_MODEL=/path/glm-4-voice-decoder benchmarks/gpu_decoder.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT_DIR:-benchmarks/results}
STREAMS=${STREAMS:-1,2,4,8,16,32,64}
mkdir -p "$OUT"
"$PY" - <<'PYEOF'
import sys, torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to this torch build: set PYTHON to an interpreter with CUDA torch")
print("torch", torch.__version__, "on", torch.cuda.get_device_name(0))
PYEOF
MODEL_ARGS=(--size realsize)
if [[ -n "${DECODER_MODEL:-}" ]]; then MODEL_ARGS=(--model "$DECODER_MODEL"); fi

{
  echo "## Parity on the GPU (batched vs unbatched, per stream)"
  echo '```'
  "$PY" benchmarks/gpu_decoder_parity.py "${MODEL_ARGS[@]}" --device cuda --dtype float32 || true
  "$PY" benchmarks/gpu_decoder_parity.py "${MODEL_ARGS[@]}" --device cuda --dtype bfloat16 || true
  echo '```'
} | tee "$OUT/decoder_gpu_parity.md"

parts=()
for cfg in "float32 off" "bfloat16 off" "bfloat16 reduce-overhead"; do
  read -r dtype comp <<<"$cfg"
  part="$OUT/decoder_batching-gpu-$dtype-$comp.md"
  timeout 240 "$PY" benchmarks/bench_decoder_batching.py "${MODEL_ARGS[@]}" --device cuda --dtype "$dtype" \
    --compile "$comp" --streams "$STREAMS" --tokens 110 --rounds 2 --out "$part" || echo "($cfg: failed or timed out)"
  [[ -f "$part" ]] && parts+=("$part")
done
{
  echo "# Decoder batching on the GPU"
  echo
  cat "$OUT/decoder_gpu_parity.md"
  for p in "${parts[@]}"; do echo; sed 's/^# /## /' "$p"; done
} > "$OUT/decoder_batching-gpu.md"
echo "written $OUT/decoder_batching-gpu.md"
