#!/usr/bin/env bash
# On the lent GPU machine (device tool), from the repository root, with .whl carried (NIXL 1.5.1
# wheels + hatchling): install NIXL (the anchor), nixl-core and nixl-posix; run the plugin's tests
# (VRAM <-> FILE included); then nixl-bench DRAM <-> FILE (page cache and O_DIRECT) against NIXL's
# POSIX backend and the dd-like baseline, and VRAM <-> FILE through the staging pool.
# Usage: bash plugins/nixl_posix/tools/gpu_run.sh [tests|dram|vram|all] [DIR for the benchmark file]
set -uo pipefail
OUT="${OUT:-/tmp/out}"
what="${1:-all}"
dir="${2:-$PWD/.benchfiles}"
mkdir -p "$OUT" "$dir"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation . ./plugins/nixl_posix 2>&1 | grep -v WARNING | tail -3
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; free -g | head -2
  uname -r; df -T "$dir" | tail -1; python3 -c 'import cupy, sys; print("python", sys.version.split()[0], "cupy", cupy.__version__)'; } 2>&1 | tee "$OUT/machine.txt"
[[ $what == tests || $what == all ]] && timeout 300 python3 -m pytest plugins/nixl_posix/tests -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -15
B=(nixl-bench --backend POSIX --target-seg FILE --filepath "$dir" --layout scattered --quick)
run() { echo; echo "\$ $*"; timeout 240 "$@" 2>&1; }
{
  if [[ $what == dram || $what == all ]]; then
    run "${B[@]}"
    run "${B[@]}" --storage-enable-direct
  fi
  if [[ $what == vram || $what == all ]]; then  # NIXL's POSIX backend takes DRAM only
    run "${B[@]}" --initiator-seg VRAM --against none
    run "${B[@]}" --initiator-seg VRAM --against none --storage-enable-direct
  fi
} | tee "$OUT/bench.txt"
rm -rf "$dir"
