#!/usr/bin/env bash
# The prepared GPU check: one command, from the repository root, on the machine to check.
#
#     bash benchmarks/gpu_check.sh            # OUT=/some/folder keeps the logs and the summary there
#
# On a machine with a CUDA GPU it installs what it needs (the package with its test extras and triton; torch as
# installed, or torch from the package index when none is), then runs, each with a time limit:
#   1. the GPU-marked tests (tests/test_gpu.py: the Triton kernel on the device against the float64 formula and
#      the CPU path, the CUDA pipeline, the CLI with --device cuda);
#   2. benchmarks/bench_gpu.py on a pair that fits (EXPO_GPU_CHECK_GB, default 2 GB in all), one end-to-end run;
#   3. `expo extrapolate --device cuda` on that pair, checked element by element by `expo verify` (a sample of
#      the chunks: EXPO_GPU_CHECK_SAMPLE, default 0.25);
# and prints one summary table. It should finish in under 8 minutes on one H100/H200 including installs, and it
# exits non-zero when any step fails. Without a GPU it says so, runs the Triton-interpreter tests, and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/expo-gpu-check.XXXXXX)}
mkdir -p "$OUT"
WORK=${EXPO_GPU_CHECK_WORK:-$OUT/work}
GB=${EXPO_GPU_CHECK_GB:-2}
SAMPLE=${EXPO_GPU_CHECK_SAMPLE:-0.25}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
declare -a NAMES=() RESULTS=() SECONDS_TAKEN=()
started=$(date +%s)

step() {  # step NAME LIMIT_S COMMAND...: run it, log it under $OUT, remember the result
    local name=$1 limit=$2; shift 2
    local log="$OUT/$(echo "$name" | tr ' /' '__').log" t0 rc
    t0=$(date +%s)
    echo "== $name (limit ${limit} s): $*" | tee "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    rc=$?
    tail -n 15 "$log"
    NAMES+=("$name"); SECONDS_TAKEN+=("$(( $(date +%s) - t0 ))")
    if [ $rc -eq 0 ]; then RESULTS+=("ok"); elif [ $rc -eq 124 ]; then RESULTS+=("TIMEOUT"); else RESULTS+=("FAILED (rc $rc)"); fi
    return $rc
}

summary() {
    echo
    echo "| step | result | seconds |" | tee "$OUT/summary.md"
    echo "|---|---|---|" | tee -a "$OUT/summary.md"
    for i in "${!NAMES[@]}"; do
        echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${SECONDS_TAKEN[$i]} |" | tee -a "$OUT/summary.md"
    done
    echo "total: $(( $(date +%s) - started )) s; logs in $OUT" | tee -a "$OUT/summary.md"
}

has_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU
}

python -m pip --version >/dev/null 2>&1 || { echo "gpu_check: no python with pip here"; exit 1; }
if python -c "import torch" 2>/dev/null; then
    step "install" 300 python -m pip install -q -e ".[test]"
else
    step "install" 300 python -m pip install -q torch -e ".[test]"
fi || { summary; exit 1; }

if ! has_gpu; then
    echo "gpu_check: no CUDA GPU on this machine (nvidia-smi lists none): running the Triton-interpreter tests only"
    step "interpreter tests" 600 env TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/test_gpu.py
    rc=$?
    summary
    exit $rc
fi

nvidia-smi -L | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', \
triton.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$OUT/gpu.txt"
failed=0
step "GPU tests" 240 python -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py || failed=1
step "bench_gpu.py" 240 python benchmarks/bench_gpu.py --workdir "$WORK" --size-gb "$GB" --repeat 1 \
    --markdown "$OUT/bench_gpu.md" || failed=1
pair=$(ls -d "$WORK"/gpu-pair-* 2>/dev/null | head -n 1)
if [ -n "$pair" ]; then
    step "expo extrapolate --device cuda" 120 expo extrapolate --sft "$pair/sft" --aligned "$pair/aligned" \
        --alpha 0.3 --out "$WORK/expo-cuda" --device cuda --overwrite || failed=1
    step "expo verify (sample $SAMPLE)" 180 expo verify "$WORK/expo-cuda" --sft "$pair/sft" \
        --aligned "$pair/aligned" --sample "$SAMPLE" || failed=1
else
    NAMES+=("expo extrapolate --device cuda"); RESULTS+=("FAILED (bench_gpu.py built no pair)"); SECONDS_TAKEN+=(0)
    failed=1
fi
[ -f "$OUT/bench_gpu.md" ] && cat "$OUT/bench_gpu.md"
summary
exit $failed
