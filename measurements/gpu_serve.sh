# Device call: `llmx serve` on the FP8 Llama-3.1-8B-shaped engine that gpu_throughput.sh builds (dummy weights,
# FP8 KV cache, max batch 1024, max seq len 4096, 8192 tokens a step, --no-tune), driven by `llmx bench
# --endpoint` at ISL/OSL 128/128 and 2048/128 with Poisson rates 4, 16, 64 req/s and at maximum load, next to the
# in-process `llmx bench` at maximum load of the same workloads. The serve extra's wheels come from .whl-serve/
# (carried; `pip download --no-deps starlette uvicorn prometheus-client h11 anyio sniffio idna`).
# Results under $OUT: summary.txt (one line per run, written as each ends) and serve.log.
source measurements/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl-serve/*.whl
OUT=${OUT:-/tmp/out}
ulimit -n 65536
source measurements/gpu_fp8_engine.sh
RES=/tmp/res; mkdir -p $RES
summarize() {  # one line per report, appended to $OUT/summary.txt as soon as it exists (a cut call keeps them)
  python3 - "$1" <<'PY' | tee -a $OUT/summary.txt
import json, os, sys
r = json.load(open(sys.argv[1])); m = r["metrics"]; c = r["config"]
print(f"{os.path.basename(sys.argv[1]):20s} isl {c['isl']:5} osl {c['osl']:4} rate {str(c['request_rate']):5} "
      f"n {c['num_requests']:5} out {m['output_throughput_tok_s']:9.1f} tok/s  TTFT p50 {m['ttft_ms']['p50']:8.1f} "
      f"mean {m['ttft_ms']['mean']:8.1f} ms  TPOT p50 {m['tpot_ms']['p50']:6.2f} mean {m['tpot_ms']['mean']:6.2f} ms")
PY
}
# ISL:OSL:requests at maximum load
WORKLOADS=${WORKLOADS:-"128:128:1024 2048:128:256"}
for w in $WORKLOADS; do
  IFS=: read isl osl n <<< "$w"
  python3 -m llmx bench /tmp/l8e --isl $isl --osl $osl --num-requests $n --warmup 8 --json $RES/inproc-$isl.json \
    > /dev/null 2>&1 && summarize $RES/inproc-$isl.json
done
python3 -m llmx serve /tmp/l8e --port 8000 --served-model-name llama8b-fp8 > $OUT/serve.log 2>&1 &
server=$!
for _ in $(seq 600); do
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')" 2>/dev/null && break
  sleep 0.5
done
for w in $WORKLOADS; do
  IFS=: read isl osl n <<< "$w"
  for load in ${LOADS:-max 64 16 4}; do
    args=(--num-requests $n)  # max load: every request at once; else Poisson arrivals, >= 64 requests
    [ $load = max ] || args=(--request-rate $load --num-requests $((load * 6 > 64 ? load * 6 : 64)))
    python3 -m llmx bench /tmp/l8e --endpoint http://127.0.0.1:8000/v1 --isl $isl --osl $osl --warmup 8 "${args[@]}" \
      --json $RES/serve-$isl-$load.json > /dev/null 2>> $OUT/serve.log && summarize $RES/serve-$isl-$load.json
  done
done
kill -TERM $server; wait $server; echo "server exit code $?" | tee -a $OUT/summary.txt
