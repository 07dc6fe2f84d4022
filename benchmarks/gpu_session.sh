#!/usr/bin/env bash
# Everything a GPU session checks, in one command on the GPU machine (docs/gpu.md, "On a GPU
# machine"): the CuPy tests with their drift tables, then the GPU benchmark against diffusers.
# Logs and the updated RESULTS.md go to $OUT (default /tmp/minisd-gpu).
#
#   bash benchmarks/gpu_session.sh            # tests, then bench_gpu.py --record
#   bash benchmarks/gpu_session.sh tests      # tests only
#   bash benchmarks/gpu_session.sh bench      # benchmark only (SD1.5, 512x512)
#   bash benchmarks/gpu_session.sh bench-xl   # the SDXL base benchmark (1024x1024)
#
# Wheels in .whl/ (e.g. diffusers, which the lent machines lack) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/minisd-gpu}
mkdir -p "$OUT"
what=${1:-all}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import cupy; print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceCount())" \
    | tee -a "$OUT/gpu.txt" || { echo "CuPy sees no GPU: cupy cases would skip" >&2; exit 1; }
rc=0
python3 -m minisd selfcheck --device cuda 2>&1 | tee "$OUT/selfcheck.txt" || rc=1
if [ "$what" = tests ] || [ "$what" = all ]; then
    # GPU-specific files in full (drift tables printed), then every cupy case of the rest.
    python3 -m pytest -q -s tests/test_gpu.py tests/test_gpu_kernels.py tests/test_conv_gemm.py \
        2>&1 | tee "$OUT/gpu_tests.log" || rc=1
    python3 -m pytest -q -k cupy tests 2>&1 | tail -40 | tee "$OUT/cupy_cases.log" || rc=1
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    python3 benchmarks/bench_gpu.py --record 2>&1 | tee "$OUT/bench_gpu.log" || rc=1
fi
if [ "$what" = bench-xl ]; then
    python3 benchmarks/bench_gpu.py --family sdxl --record 2>&1 | tee "$OUT/bench_gpu_xl.log" \
        || rc=1
fi
cp benchmarks/RESULTS.md "$OUT/"
exit $rc
