#!/usr/bin/env bash
# On the lent GPU machine (device tool), from the repository root, with .whl carried:
# install NIXL 1.5.1 (the anchor), nixl-core and this plugin; run the plugin's tests; then
# nixl-bench two processes, nixl-py NVLINK vs NIXL UCX, and the DRAM<->VRAM comparison.
# make: the tests, then the prepared-list (make) rows of nixl-bench and tools/make_bench.py.
# Usage: bash plugins/nixl_nvlink/tools/gpu_run.sh [tests|bench|all|make] [DEVICES]
set -uo pipefail
what="${1:-all}"
devs="${2:-0,0}"
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation . ./plugins/nixl_nvlink 2>&1 | grep -v WARNING | tail -3
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvidia-smi topo -m; \
  python3 -c 'import cupy, sys; print("python", sys.version.split()[0], "cupy", cupy.__version__)'; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
if [ "$what" = tests ] || [ "$what" = all ] || [ "$what" = make ]; then
  timeout "${TESTS_TIMEOUT:-420}" python3 -m pytest plugins/nixl_nvlink/tests -q -rs -p no:cacheprovider -s --timeout 240 2>&1 | tee "$OUT/pytest.log" | tail -40
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  B=(nixl-bench --backend NVLINK --nixl-backend UCX --layout scattered --devices "$devs" --warmup-iter 3 --num-iter 20 --max-row-bytes 8G)
  run() { echo; echo "\$ $*"; timeout 200 "$@" 2>&1; }
  {
    run "${B[@]}" --initiator-seg VRAM --target-seg VRAM --start-block-size 4K --max-block-size 4K --batch-size 65536 --total-buffer-size 256M
    run "${B[@]}" --initiator-seg VRAM --target-seg VRAM --start-block-size 32K --max-block-size 32K --batch-size 16384 --total-buffer-size 512M
    run "${B[@]}" --initiator-seg VRAM --target-seg VRAM --start-block-size 256K --max-block-size 256K --batch-size 2048 --total-buffer-size 512M
    run "${B[@]}" --initiator-seg VRAM --target-seg VRAM --start-block-size 16M --max-block-size 16M --batch-size 32 --total-buffer-size 512M --large-blk-iter-ftr 1
    run "${B[@]}" --initiator-seg VRAM --target-seg VRAM --start-block-size 4K --max-block-size 4K --batch-size 64 --total-buffer-size 256M --num-iter 2000 --warmup-iter 200
    run "${B[@]}" --initiator-seg DRAM --target-seg VRAM --start-block-size 32K --max-block-size 32K --batch-size 16384 --total-buffer-size 512M --num-iter 50
  } | tee "$OUT/bench.txt"
  timeout 120 python3 plugins/nixl_nvlink/tools/host_copy_compare.py 2>&1 | tee "$OUT/hostcmp.txt"
fi
if [ "$what" = make ]; then
  B=(nixl-bench --backend NVLINK --nixl-backend UCX --layout scattered --devices "$devs" --prepared --against "${AGAINST:-nixl}" --initiator-seg VRAM --target-seg VRAM --start-block-size 4K --max-block-size 4K --total-buffer-size 256M --max-row-bytes 8G)
  run() { echo; echo "\$ $*"; timeout 150 "$@" 2>&1; }
  {
    run "${B[@]}" --batch-size 65536 --warmup-iter 3 --num-iter 20
    run "${B[@]}" --batch-size 64 --warmup-iter 100 --num-iter 1000
    run "${B[@]}" --batch-size 65536 --warmup-iter 3 --num-iter 20 --recreate-xfer
    run "${B[@]}" --batch-size 64 --warmup-iter 100 --num-iter 1000 --recreate-xfer
  } | tee "$OUT/bench_make.txt"
  timeout 120 python3 plugins/nixl_nvlink/tools/make_bench.py --profile 64 2>&1 | tee "$OUT/make_bench.txt"
fi
