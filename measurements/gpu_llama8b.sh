# On a GPU machine: Llama-3.1-8B-shaped dummy checkpoint -> engine -> bench scenarios. Results under $OUT.
source measurements/device_env.sh
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/l8 && cp measurements/configs/llama-3.1-8b.json /tmp/l8/config.json
s=$SECONDS; [ -d /tmp/l8ckpt ] || python3 -m llmx convert /tmp/l8 -o /tmp/l8ckpt --dummy-weights --dtype bfloat16 2>&1 | tail -3; echo "convert took $((SECONDS-s)) s"
s=$SECONDS; python3 -m llmx build /tmp/l8ckpt -o /tmp/l8eng --device cuda --max-batch-size 256 --max-seq-len 4096 --max-num-tokens 8192 2>&1 | tail -3; echo "build took $((SECONDS-s)) s"
python3 measurements/llama8b_gpu.py /tmp/l8eng $OUT ${SCENARIOS:+--scenarios $SCENARIOS} 2>&1 | tee $OUT/llama8b.txt | tail -30
