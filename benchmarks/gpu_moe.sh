# On a GPU machine: a mixture of experts drawn from config.json with random weights (benchmarks/dummy_quantize.py
# --from-config --algo none: bf16), built for CUDA and benchmarked at batch 1 and at full load, next to the
# bytes one batch-1 decode step reads (benchmarks/moe_step_bytes.py: the routed experts, not all of them).
# CONFIG: benchmarks/configs/qwen3-30b-a3b.json (default) or mixtral-8x7b.json. LAYERS: how many of its layers
# (default 16): the machine's 64 GB disk holds the bf16 checkpoint and the engine together, about 1.3 GB each per
# Qwen3-30B-A3B layer (2.9 GB per Mixtral layer), so the whole model does not fit; per-layer figures scale.
# Results under $OUT: roofline.json and one llmx-bench/1 report per scenario (benchmarks/llama8b_gpu.py, whose
# printed roofline counts every weight of the engine: compare batch-1 decode with roofline.json's roofline_tok_s).
source benchmarks/device_env.sh
CONFIG=${CONFIG:-benchmarks/configs/qwen3-30b-a3b.json}
LAYERS=${LAYERS:-16}
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
python3 benchmarks/dummy_quantize.py /tmp/moe /tmp/moeq --from-config --algo none
python3 -m llmx build /tmp/moeq -o /tmp/moee --device cuda --max-batch-size 64 --max-seq-len 4096 \
  --max-num-tokens 8192 2>&1 | tail -1
rm -rf /tmp/moeq
echo "checkpoint + engine took $((SECONDS-s)) s"
python3 benchmarks/moe_step_bytes.py /tmp/moe --context 192 | tee "$OUT/roofline.json"
python3 benchmarks/llama8b_gpu.py /tmp/moee "$OUT" --scenarios "$SCENARIOS" 2>&1 | tee "$OUT/moe.txt" | tail -4
