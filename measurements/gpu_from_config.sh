# On a GPU machine: Llama-3.1-8B-shaped engines drawn straight from config.json (measurements/dummy_quantize.py
# --from-config: no 16 GB CPU-drawn checkpoint), built and benchmarked one after another, each removed before
# the next. RUNS lists NAME:ALGO:MAX_BS:SCENARIOS[:ENV=VALUE,...] entries; results under $OUT/NAME/.
# DUMMY_FLAGS_<ALGO> adds dummy_quantize flags per algorithm (e.g. DUMMY_FLAGS_int4_awq=--quantize-lm-head);
# BUILD_FLAGS adds llmx build flags (e.g. --no-tune). A run whose ALGO and MAX_BS equal the previous run's reuses
# that engine (A/B runs differ only in ENV).
source measurements/device_env.sh
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/l8 && cp measurements/configs/llama-3.1-8b.json /tmp/l8/config.json
previous=""
for run in $RUNS; do
  IFS=: read -r name algo max_bs scenarios envs <<< "$run"
  if [ "$previous" != "$algo:$max_bs" ]; then
    rm -rf /tmp/l8q /tmp/l8e
    flags_var=DUMMY_FLAGS_$algo
    s=$SECONDS; python3 measurements/dummy_quantize.py /tmp/l8 /tmp/l8q --from-config --algo $algo ${!flags_var}
    python3 -m llmx build /tmp/l8q -o /tmp/l8e --device cuda --max-batch-size $max_bs --max-seq-len 4096 \
      --max-num-tokens 8192 $BUILD_FLAGS 2>&1 | tail -1
    echo "$algo checkpoint + engine took $((SECONDS-s)) s"
    rm -rf /tmp/l8q
    previous=$algo:$max_bs
  fi
  mkdir -p $OUT/$name
  env ${envs//,/ } python3 measurements/llama8b_gpu.py /tmp/l8e $OUT/$name --scenarios $scenarios 2>&1 \
    | tee $OUT/$name/llama8b.txt | tail -1
done
