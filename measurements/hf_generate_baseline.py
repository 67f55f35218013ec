"""The baseline users have today: Hugging Face transformers `generate()` on the same GPU and shapes.

Random-initialised Llama-3.1-8B shapes in bf16 (weights made on the GPU), greedy, EOS disabled so every
request produces exactly --osl tokens. Prints output tok/s per batch size.

    python measurements/hf_generate_baseline.py [--config measurements/configs/llama-3.1-8b.json] [--batch 1,64]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="measurements/configs/llama-3.1-8b.json")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=128)
    args = ap.parse_args()
    raw = json.load(open(args.config))
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    gen = torch.Generator(device="cuda").manual_seed(0)
    for bs in (int(b) for b in args.batch.split(",")):
        ids = torch.randint(1000, 100000, (bs, args.isl), device="cuda", generator=gen)
        kwargs = dict(max_new_tokens=args.osl, min_new_tokens=args.osl, do_sample=False, pad_token_id=0)
        model.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kwargs)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tokens = (out.shape[1] - args.isl) * bs
        print(f"transformers generate bs{bs} {args.isl}/{args.osl}: {tokens / seconds:.1f} output tok/s "
              f"({seconds:.2f} s, {tokens} tokens)", flush=True)


if __name__ == "__main__":
    main()
