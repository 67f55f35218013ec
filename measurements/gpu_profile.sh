# On a GPU machine: where decode time goes, per kernel, on a 4-layer Llama-3.1-8B-shaped model (the layer
# shapes of the real 32-layer model, its embedding and LM head), in bf16 and each of ALGOS.
# Results under $OUT/profile_<format>.txt / .json.
source measurements/device_env.sh
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/p8
python3 - <<'PY'
import json
config = json.load(open("measurements/configs/llama-3.1-8b.json"))
config["num_hidden_layers"] = 4
json.dump(config, open("/tmp/p8/config.json", "w"))
PY
python3 -m llmx convert /tmp/p8 -o /tmp/p8ckpt --dummy-weights --dtype bfloat16 2>&1 | tail -1
for fmt in bf16 ${ALGOS:-fp8 int4_awq}; do
  ckpt=/tmp/p8ckpt
  if [ "$fmt" != bf16 ]; then python3 measurements/dummy_quantize.py /tmp/p8ckpt /tmp/p8-$fmt --algo $fmt; ckpt=/tmp/p8-$fmt; fi
  python3 -m llmx build $ckpt -o /tmp/p8eng-$fmt --device cuda --max-batch-size 256 --max-seq-len 4096 --max-num-tokens 8192 2>&1 | tail -1
  python3 measurements/profile_decode.py /tmp/p8eng-$fmt --batch ${BATCHES:-1,64,256} --context 256 \
    --json $OUT/profile_$fmt.json 2>&1 | tee $OUT/profile_$fmt.txt | grep -v "^    "
done
