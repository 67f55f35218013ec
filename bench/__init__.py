"""Benchmarking: seeded workloads, a driver that keeps requests in flight, latency/throughput metrics,
JSON reports and regression gates against a previous report.

    workload   -> the requests (synthetic exact lengths, or a jsonl dataset)
    driver     -> feeds them to an LLM (fixed concurrency or Poisson arrivals) and timestamps every token
    metrics    -> throughput, TTFT / TPOT / ITL / E2E distributions, memory and KV-cache use
    report     -> the `llmx-bench/1` JSON document and its table
    regression -> compare a report (or a perplexity) with a baseline
"""
