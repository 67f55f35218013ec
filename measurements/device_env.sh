# Source on a GPU machine without internet access whose image has python3, torch and triton but not llmx's other
# dependencies: makes `import llmx` and `python3 -m llmx` work without installing, from cp312 wheels placed in
# .whl/ (typer, pydantic, pydantic_core, annotated_types, typing_inspection, typing_extensions, nvidia-modelopt,
# omegaconf, pulp).
# NVLink multicast stays off in this process and every rank llmx starts.
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/llmx
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export LLMX_TEST_CACHE=/tmp/llmx-test-cache
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
set +e
