# Device call: the FP8 Llama-3.1-8B-shaped engine of gpu_fp8_engine.sh (max batch MAX_BS, default 1024). Then:
#   CELLS="2048/2048/400/512 128/128/4096/1024 ..."  measurements/step_breakdown.py --cell each (one loaded engine)
#   SWEEP=FILE                                       llmx bench --sweep FILE
#   HOST_BATCHES=256,512,1024                        measurements/host_overhead.py at those batch sizes
#   KV_TOKENS=N                                      a KV cache of N tokens for the cells (e.g. an H100's on an H200)
# Results under $OUT (breakdown.json/.txt, sweep.json/.txt, host.txt).
source measurements/device_env.sh
OUT=${OUT:-/tmp/out}
if [ -n "$HOST_BATCHES" ]; then
  for gc in on off; do
    python3 measurements/host_overhead.py --batch $HOST_BATCHES --steps 20 --modes tokens --gc $gc >> $OUT/host.txt 2>&1
  done; cat $OUT/host.txt
fi
source measurements/gpu_fp8_engine.sh
if [ -n "$CELLS" ]; then
  args=(); for c in $CELLS; do args+=(--cell "$c"); done
  python3 measurements/step_breakdown.py /tmp/l8e "${args[@]}" --profile-steps ${PROFILE_STEPS:-5} \
    ${KV_TOKENS:+--kv-cache-tokens $KV_TOKENS} \
    --json $OUT/breakdown.json 2>&1 | tee $OUT/breakdown.txt | grep -v "^    "
fi
if [ -n "$SWEEP" ]; then
  python3 -m llmx bench /tmp/l8e --sweep $SWEEP --json $OUT/sweep.json 2>&1 | tee $OUT/sweep.txt
fi
