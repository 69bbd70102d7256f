#!/usr/bin/env bash
# The first accelerator measurement of perijax, on one NVIDIA GPU machine (H100 or H200), in four
# self-checking stages; docs/performance.md describes the numbers:
#
#   1. attention agreement: cuDNN flash attention and the blockwise kernel against the XLA path,
#      loss and every gradient of a 2-layer model with the 400M model's heads, bfloat16,
#      T = 2,048 (scripts/attention_check.py); a mismatch stops the script;
#   2. `perijax bench` of the 400M model, Pre-LN and Peri-LN, at the paper's sequence length
#      (8,192) with model.attention=auto (cuDNN), at the largest micro-batch per GPU of
#      BATCHES_400M that runs (an out-of-memory try goes on to the next);
#   3. float8: the 400M Peri-LN step again at stage 2's micro-batch with model.matmul_dtype=float8
#      (e4m3/e5m2 weight matmuls), against stage 2's bfloat16 Peri-LN step; a failure is
#      reported in the summary, not fatal (FLOAT8=0 skips it);
#   4. a 1.5B fit check: Peri-LN, a few steps at the largest micro-batch of BATCHES_1_5B that runs.
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
# Writes to $OUT (default runs/device-bench): env.txt (GPU, versions, flags), attention.json and
# .log, bench-<size>-b<batch>.log/.json per try (the JSON is rewritten after every placement, so
# a run cut short keeps what it measured), chosen.txt and summary.txt. Estimated time on one
# H100/H200 (not yet measured): 7-9 minutes; each bench try is capped at PER_TRY_TIMEOUT seconds.
#
# It fails (non-zero exit, "device_bench: error: ...") when the backend is not a GPU, a kernel
# disagrees with the XLA path, no micro-batch of a size runs, model.attention=auto did not run
# cudnn, or a measured number is impossible (MFU outside (0, 100%], a non-finite loss).
#
# Settings (environment variables, defaults in brackets): BATCHES_400M ["16 8 4 2 1"] and
# BATCHES_1_5B ["4 2 1"] sequences per GPU, PLACEMENTS [pre,peri], WARMUP [3], STEPS [10],
# SEQ_LEN [8192], ATTENTION [auto], REMAT [the config's, full], EXTRA_XLA_FLAGS [], BENCH_ARGS []
# (more `perijax bench` arguments), WHEELS [.whl], PYTHON [python3], PER_TRY_TIMEOUT [240],
# SKIP_1_5B [0], FLOAT8 [1].
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-runs/device-bench}"
BATCHES_400M="${BATCHES_400M:-16 8 4 2 1}"
BATCHES_1_5B="${BATCHES_1_5B:-4 2 1}"
PLACEMENTS="${PLACEMENTS:-pre,peri}"
WARMUP="${WARMUP:-3}"
STEPS="${STEPS:-10}"
SEQ_LEN="${SEQ_LEN:-8192}"
ATTENTION="${ATTENTION:-auto}"
REMAT="${REMAT:-}"
WHEELS="${WHEELS:-.whl}"
PYTHON="${PYTHON:-python3}"
PER_TRY_TIMEOUT="${PER_TRY_TIMEOUT:-240}"
SKIP_1_5B="${SKIP_1_5B:-0}"
FLOAT8="${FLOAT8:-1}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/perijax-jax-cache}"
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

import perijax.cli.bench  # noqa: F401  (the whole import chain of the benchmark)
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
  echo "GPUs: $NGPU; placements: $PLACEMENTS; warmup $WARMUP, steps $STEPS"
  echo "seq_len $SEQ_LEN; attention $ATTENTION; remat ${REMAT:-config default}"
  echo "micro-batches per GPU tried: 400M $BATCHES_400M; 1.5B $BATCHES_1_5B"
} | tee -a "$ENV_TXT"

# --- 1. the attention kernels agree with the XLA path (bfloat16)
say "attention: cudnn and blockwise against xla"
set +e
"$PYTHON" -u scripts/attention_check.py --kernels cudnn,blockwise --seq-len 2048 \
  --json "$OUT/attention.json" 2>&1 | tee "$OUT/attention.log"
rc=${PIPESTATUS[0]}
set -e
((rc == 0)) || die "attention kernels disagree or cannot run (exit $rc; $OUT/attention.log)"

# --- 2 and 3: perijax bench at the largest micro-batch that runs. bench records a placement that
# failed (out of memory) in its JSON and goes on; a try counts only if every placement ran.
remat_args=()
if [[ -n "$REMAT" ]]; then remat_args=(--config.model.remat="$REMAT"); fi
try_bench() { # size placements warmup steps per_gpu [tag extra-args...] -> 0 if all ran
  local size=$1 placements=$2 warmup=$3 steps=$4 per_gpu=$5 tag=${6:-} rc
  local extra=("${@:7}")
  local name="bench-$size${tag:+-$tag}-b$per_gpu"
  say "perijax bench configs/paper.py:size=$size ($placements${tag:+, $tag}), $per_gpu x $SEQ_LEN per GPU"
  set +e
  timeout --kill-after=20 "$PER_TRY_TIMEOUT" "$PYTHON" -u -m perijax.cli.bench \
    --config "configs/paper.py:size=$size" --placements "$placements" \
    --warmup "$warmup" --steps "$steps" --json "$OUT/$name.json" \
    --config.model.dtype=bfloat16 --config.model.attention="$ATTENTION" "${remat_args[@]}" \
    --config.data.seq_len="$SEQ_LEN" --config.train.grad_accum_steps=1 \
    --config.train.global_batch_size=$((per_gpu * NGPU)) "${bench_args[@]}" "${extra[@]}" 2>&1 \
    | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  if ((rc != 0)); then
    echo "device_bench: $name exited with $rc" >&2
    return 1
  fi
  "$PYTHON" - "$OUT/$name.json" <<'EOF'
import json
import sys

r = json.load(open(sys.argv[1]))
bad = {n: p.get("error", "not run") for n, p in r["placements"].items() if "step_time_s" not in p}
if bad:
    sys.exit(f"device_bench: not every placement ran: {bad}")
EOF
}
largest_that_runs() { # size placements warmup steps "batches..."
  local b
  for b in $5; do
    if try_bench "$1" "$2" "$3" "$4" "$b"; then
      echo "$1 $b" >>"$OUT/chosen.txt"
      return 0
    fi
  done
  return 1
}
: >"$OUT/chosen.txt"
largest_that_runs 400m "$PLACEMENTS" "$WARMUP" "$STEPS" "$BATCHES_400M" \
  || die "no micro-batch of '$BATCHES_400M' ran the 400M model"
# --- 3. float8 weight matmuls: the 400M Peri-LN step at stage 2's micro-batch (a failure is
# recorded in summary.txt, not fatal: the bfloat16 numbers stand on their own).
if [[ "$FLOAT8" == 1 ]]; then
  b400="$(sed -n 's/^400m //p' "$OUT/chosen.txt")"
  if try_bench 400m peri "$WARMUP" "$STEPS" "$b400" f8 --config.model.matmul_dtype=float8; then
    echo "400m-f8 $b400" >>"$OUT/chosen.txt"
  else
    echo "400m-f8 $b400 failed" >>"$OUT/chosen.txt"
  fi
fi
if [[ "$SKIP_1_5B" != 1 ]]; then
  largest_that_runs 1.5b peri 1 3 "$BATCHES_1_5B" \
    || die "no micro-batch of '$BATCHES_1_5B' ran the 1.5B model"
fi

# --- summary of the chosen runs, with the checks that make a number believable
say "summary"
set +e
"$PYTHON" - "$OUT" "$ATTENTION" <<'EOF' | tee "$OUT/summary.txt"
import json
import math
import pathlib
import sys

out, attention = pathlib.Path(sys.argv[1]), sys.argv[2]
GIB = 1024**3
problems = []
tries = [line.split() for line in (out / "chosen.txt").read_text().split("\n") if line]
for size, per_gpu, *failed in tries:
    name = f"bench-{size}-b{per_gpu}"
    if failed:
        print(f"{name}: FAILED, not counted (reported, not fatal): see {name}.log")
        continue
    r = json.loads((out / f"{name}.json").read_text())
    peak = r["peak"]
    tflops = "unknown" if peak["tflops"] is None else f"{peak['tflops']:.4g}"
    ran = r["config"]["model"]["attention"]
    print(f"{name}: {r['device']['count']} x {r['device']['device_kind']}, jax "
          f"{r['versions']['jax']}, {per_gpu} x {r['config']['data']['seq_len']} tokens per GPU, "
          f"attention {ran}, remat {r['config']['model']['remat']}, matmuls "
          f"{r['config']['model']['matmul_dtype']}, peak {tflops} TFLOP/s per "
          f"{peak['unit']} ({peak['source']})")
    if attention == "auto" and ran != "cudnn":
        problems.append(f"{name}: model.attention=auto ran {ran}, not cudnn")
    print(f"  {'placement':<9}{'compile s':>10}{'step ms':>9}{'tokens/s':>10}"
          f"{'TFLOP/s/GPU':>12}{'MFU':>7}{'peak GiB':>10}{'plan GiB':>9}{'vs pre':>8}")
    for pname, p in r["placements"].items():
        m = p["memory"]
        dev = m["device_peak_bytes"]
        mem = "-" if dev is None else f"{dev / GIB:.1f}"
        mem = mem if dev is None or m["device_peak_is_exact"] else "<=" + mem
        plan = "-" if m["compiled_peak"] is None else f"{m['compiled_peak'] / GIB:.1f}"
        mfu = "-" if p["mfu"] is None else f"{100 * p['mfu']:.1f}%"
        over = p["overhead_vs_pre_pct"]
        print(f"  {pname:<9}{p['compile_s']:>10.1f}{p['step_time_s']['median'] * 1e3:>9.1f}"
              f"{p['tokens_per_s']:>10,.0f}{p['model_tflops_per_s_per_device']:>12.1f}{mfu:>7}"
              f"{mem:>10}{plan:>9}{'-' if over is None else f'{over:+.1f}%':>8}")
        if p["mfu"] is not None and not 0 < p["mfu"] <= 1:
            problems.append(f"{name}/{pname}: MFU {p['mfu']} is impossible")
        loss = p.get("loss")
        if not (p["tokens_per_s"] > 0 and loss is not None and math.isfinite(loss)):
            problems.append(f"{name}/{pname}: tokens/s {p['tokens_per_s']}, loss {loss}")
chosen = dict(parts for parts in tries if len(parts) == 2)  # "size batch"; a failed try has 3
if "400m-f8" in chosen and (f8 := out / f"bench-400m-f8-b{chosen['400m-f8']}.json").exists():
    bf16 = json.loads((out / f"bench-400m-b{chosen['400m']}.json").read_text())["placements"]
    fp8 = json.loads(f8.read_text())["placements"]
    if "step_time_s" in bf16.get("peri", {}) and "step_time_s" in fp8.get("peri", {}):
        ratio = bf16["peri"]["step_time_s"]["median"] / fp8["peri"]["step_time_s"]["median"]
        print(f"float8 / bfloat16 speed, 400M Peri-LN: {ratio:.3f}x (median step times)")
for problem in problems:
    print(f"CHECK FAILED: {problem}")
sys.exit(1 if problems else 0)
EOF
rc=${PIPESTATUS[0]}
set -e
((rc == 0)) || die "the results failed their checks (above)"
echo "device_bench: done; results in $OUT"
