# Sourced by the GPU scripts after device_env.sh: the FP8 Llama-3.1-8B-shaped engine at /tmp/l8e (FP8 weights and
# activations, FP8 KV cache, dummy weights drawn from measurements/configs/llama-3.1-8b.json, max batch MAX_BS
# (default 1024), max seq len 4096, 8192 tokens a step, --no-tune). A machine that still holds an engine built
# with the same settings reuses it (/tmp/l8e.settings records them).
settings="max_bs=${MAX_BS:-1024} seq=4096 tokens=8192"
if [ -f /tmp/l8e/engine.json ] && [ "$(cat /tmp/l8e.settings 2>/dev/null)" = "$settings" ]; then
  echo "reusing /tmp/l8e ($settings)"
else
  rm -rf /tmp/l8e /tmp/l8e.settings
  mkdir -p /tmp/l8 && cp measurements/configs/llama-3.1-8b.json /tmp/l8/config.json
  s=$SECONDS
  python3 measurements/dummy_quantize.py /tmp/l8 /tmp/l8q --from-config --algo fp8 --kv-cache-dtype fp8 2>&1 | tail -1
  python3 -m llmx build /tmp/l8q -o /tmp/l8e --device cuda --max-batch-size ${MAX_BS:-1024} --max-seq-len 4096 \
    --max-num-tokens 8192 --no-tune 2>&1 | tail -1
  rm -rf /tmp/l8q
  [ -f /tmp/l8e/engine.json ] && echo "$settings" > /tmp/l8e.settings
  echo "checkpoint + engine took $((SECONDS-s)) s"
fi
