# On a GPU machine: Llama-3.1-8B-shaped dummy checkpoint quantized for speed (measurements/dummy_quantize.py),
# built and benchmarked per format. Results under $OUT. ALGOS defaults to "fp8 int4_awq"; KV_DTYPE=fp8
# adds an fp8 KV cache; MAX_BS sets the engine's max batch size (default 256).
source measurements/device_env.sh
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/l8 && cp measurements/configs/llama-3.1-8b.json /tmp/l8/config.json
[ -d /tmp/l8ckpt ] || python3 -m llmx convert /tmp/l8 -o /tmp/l8ckpt --dummy-weights --dtype bfloat16 2>&1 | tail -1
for algo in ${ALGOS:-fp8 int4_awq}; do
  s=$SECONDS; python3 measurements/dummy_quantize.py /tmp/l8ckpt /tmp/l8-$algo --algo $algo ${KV_DTYPE:+--kv-cache-dtype $KV_DTYPE}; echo "quantize took $((SECONDS-s)) s"
  python3 -m llmx build /tmp/l8-$algo -o /tmp/l8eng-$algo --device cuda --max-batch-size ${MAX_BS:-256} --max-seq-len 4096 --max-num-tokens 8192 2>&1 | tail -1
  rm -rf /tmp/l8-$algo
  mkdir -p $OUT/$algo
  python3 measurements/llama8b_gpu.py /tmp/l8eng-$algo $OUT/$algo --scenarios ${SCENARIOS:-bs1_128_128,tput_128_128} 2>&1 | tee $OUT/$algo/llama8b.txt | tail -4
  rm -rf /tmp/l8eng-$algo
done
