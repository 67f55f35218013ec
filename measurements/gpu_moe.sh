# On a GPU machine: a mixture of experts drawn from config.json with random weights (measurements/dummy_quantize.py
# --from-config: ALGO fp8 (default; experts on kernels/fused_moe.py's fp8 path) or none (bf16)), built for CUDA
# and benchmarked at batch 1 and at full load, next to the bytes one batch-1 decode step reads
# (measurements/moe_step_bytes.py: the routed experts, not all of them).
# CONFIG: measurements/configs/qwen3-30b-a3b.json (default) or mixtral-8x7b.json. LAYERS: how many of its layers
# (default 24): the 64 GB disk holds the checkpoint and the engine together, about 0.65 GB each per fp8
# Qwen3-30B-A3B layer (1.4 GB per fp8 Mixtral layer, twice that in bf16), so the whole model may not fit;
# per-layer figures scale.
# Results under $OUT: roofline.json and one llmx-bench/1 report per scenario (measurements/llama8b_gpu.py, whose
# printed roofline counts every weight of the engine: compare batch-1 decode with roofline.json's roofline_tok_s).
source measurements/device_env.sh
CONFIG=${CONFIG:-measurements/configs/qwen3-30b-a3b.json}
LAYERS=${LAYERS:-24}
ALGO=${ALGO:-fp8}
OUT=${OUT:-/tmp/out}
SCENARIOS=${SCENARIOS:-bs1_128_128,bs1_2048_128,tput_128_128,tput_2048_128}
mkdir -p /tmp/moe "$OUT"
python3 - "$CONFIG" "$LAYERS" <<'PY'
import json, sys
config = json.load(open(sys.argv[1]))
config["num_hidden_layers"] = int(sys.argv[2])
json.dump(config, open("/tmp/moe/config.json", "w"), indent=1)
PY
rm -rf /tmp/moeq /tmp/moee
s=$SECONDS
python3 measurements/dummy_quantize.py /tmp/moe /tmp/moeq --from-config --algo "$ALGO"
python3 -m llmx build /tmp/moeq -o /tmp/moee --device cuda --max-batch-size 64 --max-seq-len 4096 \
  --max-num-tokens 8192 2>&1 | tail -1
rm -rf /tmp/moeq
echo "checkpoint + engine took $((SECONDS-s)) s"
weight_bytes=$([ "$ALGO" = none ] && echo 2 || echo 1)
python3 measurements/moe_step_bytes.py /tmp/moe --context 192 --weight-bytes "$weight_bytes" | tee "$OUT/roofline.json"
python3 measurements/llama8b_gpu.py /tmp/moee "$OUT" --scenarios "$SCENARIOS" 2>&1 | tee "$OUT/moe.txt" | tail -4
