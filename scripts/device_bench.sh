#!/usr/bin/env bash
# Train-step benchmark of the paper models (configs/paper.py: 400M and 1.5B) for every LayerNorm
# placement, in bfloat16, on an NVIDIA GPU machine (one H100 or H200), with perijax's GPU XLA
# settings (perijax/launchers/slurm.py). docs/performance.md describes the numbers.
#
# The GPU machine has jax (CUDA), flax, optax and orbax but no network and no ml-collections.
# Before copying the repository there, fetch the missing wheel into .whl/ (Python 3.12, x86-64):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl ml-collections==1.1.0
#
# (`perijax train` on real data also needs grain==0.2.18, array-record==0.8.6 and portpicker; the
# benchmark does not.) Then, in the repository root on the GPU machine:
#
#   OUT=/path/to/results bash scripts/device_bench.sh
#
# Writes to $OUT (default runs/device-bench): env.txt (GPU, versions, flags), bench-<size>.log
# and bench-<size>.json per model size (the JSON is rewritten after every placement, so a run cut
# short keeps what it measured) and summary.txt. Estimated time on one H100 (not yet measured):
# about 5 minutes (start-up ~30 s; per size ~15 s plus, per placement, ~30 s to initialize and
# compile and ~10 s of steps); each size is capped at PER_SIZE_TIMEOUT seconds, so the script
# ends within about 8 minutes.
#
# Settings (environment variables, defaults in brackets): SIZES ["400m 1.5b"],
# PLACEMENTS [pre,peri,post,output], WARMUP [3], STEPS [10], SEQ_LEN [8192], BATCH_400M [2] and
# BATCH_1_5B [1] sequences per GPU (docs/scaling.md: ~35 / ~42 GiB planned per H100),
# ATTENTION [xla; cudnn for cuDNN flash attention], EXTRA_XLA_FLAGS [], BENCH_ARGS [] (more
# `perijax bench` arguments, e.g. "--repeats 2"), WHEELS [.whl], PYTHON [python3],
# PER_SIZE_TIMEOUT [200].
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-runs/device-bench}"
SIZES="${SIZES:-400m 1.5b}"
PLACEMENTS="${PLACEMENTS:-pre,peri,post,output}"
WARMUP="${WARMUP:-3}"
STEPS="${STEPS:-10}"
SEQ_LEN="${SEQ_LEN:-8192}"
ATTENTION="${ATTENTION:-xla}"
WHEELS="${WHEELS:-.whl}"
PYTHON="${PYTHON:-python3}"
PER_SIZE_TIMEOUT="${PER_SIZE_TIMEOUT:-200}"
SITE="${SITE:-/tmp/perijax-site}"
read -ra bench_args <<<"${BENCH_ARGS:-}"

say() { printf '\n=== %s (%s)\n' "$*" "$(date -u +%H:%M:%S)"; }
die() {
  printf 'device_bench: error: %s\n' "$*" >&2
  exit 1
}

mkdir -p "$OUT"
ENV_TXT="$OUT/env.txt"
: >"$ENV_TXT"

# --- the GPU
say "GPU"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs an NVIDIA GPU"
nvidia-smi | tee -a "$ENV_TXT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  | tee -a "$ENV_TXT"

# --- install: carried wheels (no index: the machine is offline), then the project
say "install"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
shopt -u nullglob
if ((${#wheels[@]})); then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}" || die "installing the wheels in $WHEELS failed"
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "installed ${#wheels[@]} wheel(s) from $WHEELS into $SITE"
fi
# An editable install needs setuptools from the machine (no build isolation offline); where that
# fails, the source tree on PYTHONPATH is the same code.
if "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1; then
  echo "perijax installed (editable)"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "pip install -e . failed offline: using PYTHONPATH=$PWD"
fi
"$PYTHON" - <<'EOF' 2>&1 | tee -a "$ENV_TXT" || die "the Python environment is not usable (above)"
import importlib.util
import sys

missing = [m for m in ("jax", "flax", "optax", "orbax.checkpoint", "ml_collections")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (carry wheels in $WHEELS)")
import flax
import jax
import jaxlib

import perijax.bench  # noqa: F401  (the whole import chain of the benchmark)
import perijax.train  # noqa: F401

print(f"python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
      f"flax {flax.__version__}")
print(f"devices: {jax.devices()}")
if jax.default_backend() != "gpu":
    sys.exit(f"jax's backend is {jax.default_backend()!r}, not gpu")
print(f"gpus: {jax.device_count()}")
EOF
NGPU="$(sed -n 's/^gpus: //p' "$ENV_TXT" | tail -n 1)"
[[ "$NGPU" =~ ^[0-9]+$ ]] || die "could not count the GPUs"

# --- XLA settings recommended by perijax for H100-class GPUs, checked before use (an unknown
# flag aborts every later process).
say "XLA settings"
flags="$("$PYTHON" -c 'from perijax.launchers.slurm import H100_XLA_FLAGS as f
print(" ".join(flag for flag, _ in f))')"
flags="$flags${EXTRA_XLA_FLAGS:+ $EXTRA_XLA_FLAGS}"
if XLA_FLAGS="$flags" "$PYTHON" -c 'import jax.numpy as j; j.ones(8).sum().block_until_ready()' \
  >/dev/null 2>"$OUT/xla_flags_probe.txt"; then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$flags"
  rm -f "$OUT/xla_flags_probe.txt"
else
  echo "WARNING: this jaxlib rejects the recommended XLA flags; running WITHOUT them:" >&2
  tail -n 3 "$OUT/xla_flags_probe.txt" >&2
fi
# JAX preallocates 75% of GPU memory by default; perijax's GPU setting is 90% (the older variable
# name XLA_PYTHON_CLIENT_MEM_FRACTION wins if set: setting both is an error).
if [[ -z "${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" ]]; then
  export XLA_CLIENT_MEM_FRACTION="${XLA_CLIENT_MEM_FRACTION:-0.90}"
fi
{
  echo "XLA_FLAGS=${XLA_FLAGS:-}"
  echo "XLA_CLIENT_MEM_FRACTION=${XLA_CLIENT_MEM_FRACTION:-}" \
    "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-}"
  echo "GPUs: $NGPU; sizes: $SIZES; placements: $PLACEMENTS; warmup $WARMUP, steps $STEPS"
  echo "seq_len $SEQ_LEN; attention $ATTENTION"
} | tee -a "$ENV_TXT"

# --- the benchmark: one process per model size (a failure or timeout costs only that size)
failed=()
for size in $SIZES; do
  case "$size" in
    400m) per_gpu="${BATCH_400M:-2}" ;;
    1.5b) per_gpu="${BATCH_1_5B:-1}" ;;
    *) per_gpu="${BATCH:-1}" ;;
  esac
  say "perijax bench configs/paper.py:size=$size, $per_gpu sequence(s) of $SEQ_LEN per GPU"
  set +e
  timeout --kill-after=20 "$PER_SIZE_TIMEOUT" "$PYTHON" -u -m perijax.bench \
    --config "configs/paper.py:size=$size" --placements "$PLACEMENTS" \
    --warmup "$WARMUP" --steps "$STEPS" --json "$OUT/bench-$size.json" \
    --config.model.dtype=bfloat16 --config.model.attention="$ATTENTION" \
    --config.data.seq_len="$SEQ_LEN" --config.train.grad_accum_steps=1 \
    --config.train.global_batch_size=$((per_gpu * NGPU)) "${bench_args[@]}" 2>&1 \
    | tee "$OUT/bench-$size.log"
  rc=${PIPESTATUS[0]}
  set -e
  if ((rc == 124 || rc == 137)); then
    echo "device_bench: size=$size stopped after ${PER_SIZE_TIMEOUT}s; partial results kept" >&2
    failed+=("$size(timeout)")
  elif ((rc != 0)); then
    echo "device_bench: size=$size failed with exit code $rc (see $OUT/bench-$size.log)" >&2
    failed+=("$size(rc=$rc)")
  fi
done

# --- summary of every JSON written
say "summary"
"$PYTHON" - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json
import pathlib
import sys

GIB = 1024**3
for path in sorted(pathlib.Path(sys.argv[1]).glob("bench-*.json")):
    r = json.loads(path.read_text())
    peak = r["peak"]
    tflops = "unknown" if peak["tflops"] is None else f"{peak['tflops']:.4g}"
    print(f"{path.name}: {r['device']['count']} x {r['device']['device_kind']}, "
          f"{r['tokens_per_step']:,} tokens/step, peak {tflops} TFLOP/s per "
          f"{peak['unit']} ({peak['source']}){'' if r['complete'] else ', INCOMPLETE'}")
    print(f"  {'placement':<9}{'compile s':>10}{'step ms':>9}{'tokens/s':>10}"
          f"{'TFLOP/s/GPU':>12}{'MFU':>7}{'peak GiB':>10}{'plan GiB':>9}{'vs pre':>8}")
    for name, p in r["placements"].items():
        if "step_time_s" not in p:
            print(f"  {name:<9}failed: {p.get('error', 'not run')}")
            continue
        m = p["memory"]
        dev = m["device_peak_bytes"]
        mem = "-" if dev is None else f"{dev / GIB:.1f}"
        mem = mem if dev is None or m["device_peak_is_exact"] else "<=" + mem
        plan = "-" if m["compiled_peak"] is None else f"{m['compiled_peak'] / GIB:.1f}"
        mfu = "-" if p["mfu"] is None else f"{100 * p['mfu']:.1f}%"
        over = p["overhead_vs_pre_pct"]
        print(f"  {name:<9}{p['compile_s']:>10.1f}{p['step_time_s']['median'] * 1e3:>9.1f}"
              f"{p['tokens_per_s']:>10,.0f}{p['model_tflops_per_s_per_device']:>12.1f}{mfu:>7}"
              f"{mem:>10}{plan:>9}{'-' if over is None else f'{over:+.1f}%':>8}")
EOF

if ((${#failed[@]})); then
  die "not all sizes finished: ${failed[*]}"
fi
echo "device_bench: done; results in $OUT"
