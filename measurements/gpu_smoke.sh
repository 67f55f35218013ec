# On a GPU machine: GPU tests (kernels vs references, runtime vs transformers, CUDA graphs) and kernel
# micro-benchmarks. Usage: bash measurements/gpu_smoke.sh  (results under $OUT)
source measurements/device_env.sh
OUT=${OUT:-/tmp/out}
python3 -m pytest tests/kernels tests/runtime/test_runtime_gpu.py -q -rs -p no:cacheprovider -k "not interpreter" 2>&1 | tee $OUT/gpu_tests.txt | tail -40
python3 measurements/kernels_attention.py 2>&1 | tee $OUT/kernels_attention.txt | tail -40
python3 measurements/kernels_gemm.py 2>&1 | tee $OUT/kernels_gemm.txt | tail -60
