#!/usr/bin/env bash
# GPU check: what a run on one GPU costs, in one command (under 8 minutes on one data-centre GPU).
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU: writes docs/benchmarks/gpu.md (+ gpu/*.json)
#   bash benchmarks/gpu_check.sh --quick    # CPU-runnable parts at tiny sizes (< ~1 min), for CI; same report layout
#   options: --output_dir DIR (default docs/benchmarks; with --quick, a temporary folder unless given)
#            PYTHON=/path/to/python (default: python)
#
# It measures, side by side in one run:
#   1. masking: cluster_wise_mask against one Gram GEMM of each clip's T*N tokens (preallocated output), time and
#      peak memory, at the paper's shape (B=8, T=8, N=196, C=768) and a large one (B=64, T=16, N=256), plus the host
#      syncs the mask call makes (benchmarks/bench_masking.py --device);
#   2. the base-shape pretraining step at mask ratio 0.8 vs unmasked, in bf16, with the online teacher and with
#      cached teacher targets (benchmarks/bench_pretrain.py);
#   3. the data loader's clips/s against what the step consumes (benchmarks/bench_data.py).
# Nothing is installed: it needs only the project's own environment. Without a GPU it runs the CPU-runnable parts in
# their quick form and says so in the report. Exit status: the number of parts that failed or could not run.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON="${PYTHON:-python}"
QUICK=0
OUTPUT_DIR=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1; shift ;;
        --output_dir) OUTPUT_DIR="$2"; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (use --quick, --output_dir DIR)" >&2; exit 2 ;;
    esac
done

export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
HAS_GPU="$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)"
if [[ -z "$OUTPUT_DIR" ]]; then
    if [[ "$QUICK" == 1 ]]; then OUTPUT_DIR="$(mktemp -d)"; else OUTPUT_DIR="docs/benchmarks"; fi
fi
RAW="$OUTPUT_DIR/gpu"
mkdir -p "$RAW"
REPORT="$OUTPUT_DIR/gpu.md"
FAILED=0
START=$SECONDS

if [[ "$HAS_GPU" == 1 && "$QUICK" == 0 ]]; then
    MODE="gpu"
    DEVICE="cuda"
    DEVICE_NAME="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())')"
    MASK_SHAPES=(8x8x196 64x16x256)
    MASK_ROUNDS=5
    # tiny and base presets, unmasked vs 0.8, online teacher vs cached targets, bf16 autocast with a bf16 teacher
    PRETRAIN_ARGS=(--device cuda --mixed_precision bf16 --steps 5 --output_dir "$RAW/pretrain")
    DATA_ARGS=(--output_dir "$RAW/data")
else
    MODE="quick"
    DEVICE="cpu"
    DEVICE_NAME="CPU ($(nproc) cores)"
    MASK_SHAPES=(2x4x196)
    MASK_ROUNDS=2
    PRETRAIN_ARGS=(--quick --threads 1 --output_dir "$RAW/pretrain")
    DATA_ARGS=(--quick --output_dir "$RAW/data")
fi

run_part() {  # run_part NAME LOGFILE COMMAND...: runs, keeps the log, counts a failure
    local name="$1" log="$2"
    shift 2
    echo "== $name: $*"
    if "$@" >"$log" 2>&1; then
        tail -n 20 "$log"
        echo "$name: ok" >>"$RAW/status.txt"
    else
        local rc=$?
        tail -n 20 "$log"
        echo "$name: FAILED (exit $rc, log $log)" >>"$RAW/status.txt"
        FAILED=$((FAILED + 1))
    fi
}

: >"$RAW/status.txt"
run_part masking "$RAW/masking.log" "$PYTHON" benchmarks/bench_masking.py --device "$DEVICE" \
    --shapes "${MASK_SHAPES[@]}" --rounds "$MASK_ROUNDS" --threads 1 --output_json "$RAW/masking.json"
run_part pretraining "$RAW/pretrain.log" "$PYTHON" benchmarks/bench_pretrain.py "${PRETRAIN_ARGS[@]}"
if [[ -f benchmarks/bench_data.py ]]; then
    run_part data "$RAW/data.log" "$PYTHON" benchmarks/bench_data.py "${DATA_ARGS[@]}"
else
    echo "data: NOT RUN (benchmarks/bench_data.py does not exist in this checkout)" >>"$RAW/status.txt"
    FAILED=$((FAILED + 1))
fi

ELAPSED=$((SECONDS - START))
"$PYTHON" - "$REPORT" "$RAW" "$MODE" "$DEVICE_NAME" "$ELAPSED" <<'PY'
import json
import sys
from pathlib import Path

report, raw, mode, device_name, elapsed = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
lines = [
    "# GPU check",
    "",
    f"`bash benchmarks/gpu_check.sh{' --quick' if mode == 'quick' else ''}` on {device_name}, {elapsed} s.",
    "",
]
if mode == "quick":
    lines += [
        "**Quick form**: no CUDA GPU was visible (or `--quick` was given), so only the CPU-runnable parts ran, at tiny "
        "sizes. These are not GPU numbers.",
        "",
    ]
lines += ["Parts:", ""] + [f"- {line}" for line in (raw / "status.txt").read_text().splitlines()] + [""]

masking = raw / "masking.json"
if masking.exists():
    rows = json.loads(masking.read_text())
    lines += [
        "## Masking vs its GEMM limit",
        "",
        "`cluster_wise_mask` (mask ratio 0.8, C = 768, fp32) against one Gram GEMM of each clip's T*N tokens into a "
        "preallocated output (`benchmarks/bench_masking.py --device`); alternating rounds, minimum and median.",
        "",
        "| device | B | T | N | GEMM ms | mask ms | mask / GEMM (minima) | mask / GEMM (median) | GEMM extra MiB | "
        "mask extra MiB | host syncs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        extra = [row.get("gemm_peak_extra_mib"), row.get("mask_peak_extra_mib"), row.get("host_syncs")]
        extra = ["-" if value is None else f"{value:.0f}" for value in extra]
        lines.append(
            f"| {row['device']} | {row['B']} | {row['T']} | {row['N']} | {row['gemm_min_s'] * 1e3:.2f} | "
            f"{row['mask_min_s'] * 1e3:.2f} | {row['ratio_of_minima']:.2f}x | {row['ratio_median']:.2f}x | "
            + " | ".join(extra)
            + " |"
        )
    lines.append("")

pretrain = raw / "pretrain" / "pretrain.md"
if pretrain.exists():
    body = pretrain.read_text().splitlines()
    lines += ["## Pretraining step: mask ratio 0.8 vs unmasked", ""] + [
        line for line in body if not line.startswith("# ")
    ] + [""]

data = raw / "data" / "data.json"
if data.exists():
    lines += ["## Data loader", "", "```json", data.read_text().strip(), "```", ""]

Path(report).write_text("\n".join(lines))
print(f"wrote {report}")
PY
echo "gpu_check: $FAILED part(s) failed or did not run; report $REPORT"
exit "$FAILED"
