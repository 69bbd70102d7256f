"""`perijax bench`: time the real train step per LayerNorm placement and report step time,
tokens/s, model TFLOP/s, MFU, XLA's FLOP count and peak memory.

    perijax bench --config configs/small.py --placements pre,peri --repeats 4 --steps 5 --warmup 2
    perijax bench --config configs/paper.py:size=400m --placements all --steps 10 --warmup 3 \\
        --config.model.dtype=bfloat16 --config.train.global_batch_size=2 --json bench.json

The state is built by `train.init_state` on the configured mesh and the step is the trainer's own
`train.compile_train_step` (same shardings, state donated), lowered and compiled ahead of time
for the compile time, `cost_analysis` and `memory_analysis`. It is the plain step that most
training steps run (the telemetry variant runs on log steps only). Batches are random tokens put
on the devices before timing, so no input pipeline is timed; each step is timed from dispatch to
`block_until_ready`. Model FLOPs come from perijax/flops.py. MFU divides the achieved model
FLOP/s by a peak: per chip from a dense-bfloat16 table on GPUs and TPUs; on CPU, the best
dense-matmul throughput this machine reaches in the same run (its fake devices share the cores,
so the CPU peak is per process). With `--repeats R` the placements are interleaved R times,
in reverse order on every second round (pre, peri, peri, pre, pre, peri, ...), so that machine
noise and the position within a round hit all of them alike.
docs/performance.md explains every number and the JSON file.

Over 500 lines on purpose: the measurement and the report that states what each number means
(MFU's peak, XLA's FLOPs, compiled-estimate memory) change together, so they stay together.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from perijax import __version__
from perijax import config as config_lib
from perijax.cli.common import DEFAULT_CONFIG, fail, split_overrides
from perijax.config import Config, ConfigError, to_dict
from perijax.peaks import GIB, PEAK_SIZES, resolve_peak

# `--placements all` (every perijax.config.PLACEMENTS entry), in the order of the first round.
ALL_PLACEMENTS = ("pre", "peri", "post", "output")


Log = Callable[[str], None]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench",
        help="time the train step per LayerNorm placement: tokens/s, MFU, peak memory",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE[:ARG]")
    p.add_argument(
        "--placements",
        metavar="LIST",
        help="comma-separated placements (pre,peri,post,output) or 'all' "
        "(default: the config's model.ln_placement)",
    )
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat (default: 10)")
    p.add_argument(
        "--warmup", type=int, default=2, help="untimed steps before each repeat (default: 2)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds over the placements, every second one in reverse order; medians are taken "
        "over them (default: 1)",
    )
    p.add_argument("--json", dest="json_path", metavar="OUT", help="also write every number here")
    p.add_argument(
        "--no-peak",
        action="store_true",
        help="skip the peak (no MFU; on CPU this skips the matmul measurement)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        metavar="T",
        help="peak dense TFLOP/s per chip (per process on CPU) to compute MFU against, instead "
        "of the table or the CPU measurement",
    )
    p.add_argument(
        "--peak-sizes",
        default=",".join(map(str, PEAK_SIZES)),
        metavar="N,N",
        help="square matmul sizes measured for the CPU peak, besides the model's own matmul "
        "shapes (default: %(default)s)",
    )
    return p


# ------------------------------------------------------------------------------------ helpers
def parse_placements(text: str | None, default: str) -> list[str]:
    if text is None:
        return [default]
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(ALL_PLACEMENTS)
    for name in names:
        if name not in ALL_PLACEMENTS:
            raise ConfigError(
                f"--placements: unknown placement {name!r}: expected a comma-separated list of "
                f"{', '.join(ALL_PLACEMENTS)}, or all"
            )
    if not names:
        raise ConfigError("--placements is empty: expected e.g. pre,peri or all")
    return list(dict.fromkeys(names))


def _summary(times: Sequence[float]) -> dict[str, float]:
    if len(times) > 1:
        p25, _, p75 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        p25 = p75 = times[0]
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "p25": p25,
        "p75": p75,
    }


def _device_peak_bytes(devices: Sequence[Any]) -> int | None:
    """Largest `peak_bytes_in_use` over `devices` (a process-lifetime high-water mark), or None
    where the backend keeps no statistics (CPU)."""
    stats = [d.memory_stats() for d in devices]
    if not stats or any(not s or "peak_bytes_in_use" not in s for s in stats):
        return None
    return max(int(s["peak_bytes_in_use"]) for s in stats)


def _time_steps(step: Callable, state: Any, batch: Any, warmup: int, steps: int):
    """Runs `warmup` then `steps` steps; returns (seconds per timed step, final state, loss)."""
    import jax

    metrics = None
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside the timed loop would be charged to one step
    times = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times, state, float(jax.device_get(metrics["train/loss"]))


def _with_placement(cfg: Config, placement: str) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ln_placement=placement))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


# -------------------------------------------------------------------------------------- bench
def bench(
    cfg: Config,
    placements: Sequence[str],
    *,
    steps: int,
    warmup: int,
    repeats: int,
    no_peak: bool = False,
    peak_tflops: float | None = None,
    peak_sizes: Sequence[int] = PEAK_SIZES,
    log: Log = lambda s: None,
    on_update: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measures every placement; returns the report (the JSON file's content, less `command`).
    `on_update` receives the report so far (`complete: false`) after each placement and repeat,
    so an interrupted run keeps what it measured."""
    import jax

    from perijax import attention as attention_lib
    from perijax import sharding as sharding_lib
    from perijax import train as train_lib
    from perijax.flops import weight_matmul_shapes
    from perijax.model import check_backend

    # --- mesh and batch: checked before anything is measured.
    check_backend(cfg.model)
    mesh, cfg = train_lib.setup(cfg)
    devices = list(mesh.devices.flat)
    local_devices = [d for d in devices if d.process_index == jax.process_index()]
    seq_len = cfg.data.seq_len
    tokens_per_step = cfg.train.global_batch_size * seq_len
    batch, global_shape, rows = _random_batch(cfg, mesh)
    log(
        f"placements {', '.join(placements)} on {sharding_lib.describe(mesh)}: {warmup} warmup + "
        f"{steps} timed steps x {repeats} repeat(s); attention "
        f"{attention_lib.describe(cfg.model.attention)}"
    )

    # --- peak
    device = devices[0]
    peak = resolve_peak(
        device.platform,
        device.device_kind,
        len(devices),
        no_peak=no_peak,
        peak_tflops=peak_tflops,
        sizes=peak_sizes,
        log=log,
        # The weight matmuls at one microbatch's tokens per process (its fake CPU devices share
        # the cores the peak is measured on).
        shapes=list(weight_matmul_shapes(cfg.model, rows * seq_len)),
    )
    settings = {
        "placements": list(placements),
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
    }
    header = _header(cfg, mesh, peak, settings, global_shape)

    def report(complete: bool) -> dict[str, Any]:
        out = {p: _placement_report(cfg, p, results[p], header) for p in placements}
        _add_overheads(out)
        return {**header, "complete": complete, "placements": out}

    # --- placements, interleaved over repeats
    results: dict[str, dict[str, Any]] = {p: {"per_repeat": []} for p in placements}
    compiled: dict[str, Any] = {}
    for r in range(repeats):
        # Every second round runs backwards (ABBA): a placement's position within a round (after
        # a fresh state, or after the other placement's heap) then cancels in the paired ratios.
        order = list(placements) if r % 2 == 0 else list(reversed(placements))
        header["order"].append(order)
        for p in order:
            res = results[p]
            if "error" in res:
                continue
            pcfg = _with_placement(cfg, p)
            try:
                peak_before = _device_peak_bytes(local_devices)
                t0 = time.perf_counter()
                state = train_lib.init_state(pcfg, mesh)
                jax.block_until_ready(state)
                init_s = time.perf_counter() - t0
                if p not in compiled:
                    res["init_s"] = init_s
                    res["parameters"] = int(sum(x.size for x in jax.tree.leaves(state.params)))
                    log(f"[{p}] initialized in {init_s:.1f}s; compiling the train step...")
                    step = train_lib.compile_train_step(pcfg, mesh)
                    t0 = time.perf_counter()
                    with jax.set_mesh(mesh):
                        lowered = step.lower(state, batch)
                    t1 = time.perf_counter()
                    compiled[p] = lowered.compile()
                    res["lower_s"], res["compile_s"] = t1 - t0, time.perf_counter() - t1
                    res.update(_analyses(compiled[p]))
                    log(
                        f"[{p}] lowered in {res['lower_s']:.1f}s, compiled in "
                        f"{res['compile_s']:.1f}s"
                    )
                with jax.set_mesh(mesh):
                    times, state, loss = _time_steps(compiled[p], state, batch, warmup, steps)
                del state
                res["per_repeat"].append(times)
                res["loss"] = loss
                peak_after = _device_peak_bytes(local_devices)
                if r == 0 and peak_after is not None:
                    res["device_peak_bytes"] = peak_after
                    # The counter is a process-lifetime high-water mark: it describes this
                    # placement exactly only if this placement raised it.
                    res["device_peak_is_exact"] = peak_before is None or peak_after > peak_before
                med = statistics.median(times)
                log(
                    f"[{p}] repeat {r + 1}/{repeats}: median {med * 1e3:.1f} ms/step, "
                    f"{tokens_per_step / med:,.0f} tokens/s, loss {loss:.3f}"
                )
            except jax.errors.JaxRuntimeError as e:  # e.g. out of memory: keep the others going
                res["error"] = str(e).strip().splitlines()[0][:500]
                log(f"[{p}] failed: {res['error']}")
                state = None  # noqa: F841  (drops the buffers before the next placement)
            if on_update is not None:
                on_update(report(complete=False))
    return report(complete=True)


def _random_batch(cfg: Config, mesh: Any) -> tuple[Any, tuple[int, int, int], int]:
    """(a batch of random tokens laid out as the train step takes it, placed on the mesh; its
    global shape [B/A, A, T + 1]; the rows this process holds)."""
    import jax
    import numpy as np

    from perijax import sharding as sharding_lib

    t, seq_len = cfg.train, cfg.data.seq_len
    accum = t.grad_accum_steps
    global_shape = (t.global_batch_size // accum, accum, seq_len + 1)
    rows = global_shape[0] // jax.process_count()  # each process puts its own block of rows
    tokens = np.random.default_rng(t.seed).integers(
        0, cfg.model.vocab_size, size=global_shape, dtype=np.int32
    )[jax.process_index() * rows : (jax.process_index() + 1) * rows]
    with jax.set_mesh(mesh):
        batch = sharding_lib.global_batch(
            tokens, sharding_lib.batch_sharding(mesh, 3), global_shape
        )
    return batch, global_shape, rows


def _header(
    cfg: Config, mesh: Any, peak: dict[str, Any], settings: dict[str, Any], global_shape: tuple
) -> dict[str, Any]:
    """What the report says about the run besides the measurements: versions, device, mesh,
    peak, the resolved config, the batch and the model FLOPs per token."""
    import flax
    import jax
    import jax.numpy as jnp
    import jaxlib

    from perijax import attention as attention_lib
    from perijax import tuning
    from perijax.flops import flops_per_token
    from perijax.model import compute_dtype

    device = next(iter(mesh.devices.flat))
    resolved = to_dict(cfg)
    resolved["model"]["dtype"] = jnp.dtype(compute_dtype(cfg.model)).name
    resolved["model"]["attention"] = attention_lib.resolve(cfg.model.attention)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "complete": False,
        "versions": {
            "perijax": __version__,
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "flax": flax.__version__,
            "python": platform.python_version(),
        },
        "device": {
            "platform": device.platform,
            "device_kind": device.device_kind,
            "count": mesh.devices.size,
            "processes": jax.process_count(),
            "host_cpu": _cpu_model(),
            "host_cpu_count": os.cpu_count(),
            "host_malloc_tuned": tuning.host_tuned(),
            "step_compiler_options": tuning.compiler_options() or {},
        },
        "mesh": dict(mesh.shape),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
        "peak": peak,
        "settings": settings,
        "config": resolved,
        "batch_shape": list(global_shape),
        "tokens_per_step": cfg.train.global_batch_size * cfg.data.seq_len,
        "model_flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len),  # any placement
        "order": [],  # the placements of each round, in the order they ran
    }


def _placement_report(
    cfg: Config, placement: str, res: dict[str, Any], header: dict[str, Any]
) -> dict[str, Any]:
    """One placement's numbers, derived from its raw measurements (`res` is not changed)."""
    from perijax.flops import norm_flops_per_token

    out = {k: v for k, v in res.items() if k not in ("per_repeat", "xla_flops_per_device")}
    out.pop("device_peak_bytes", None)
    out.pop("device_peak_is_exact", None)
    if not res["per_repeat"]:
        return out
    n_devices, peak_total = header["device"]["count"], header["peak"]["tflops_total"]
    fpt = header["model_flops_per_token"]
    flops_per_step = fpt * header["tokens_per_step"]
    medians = [statistics.median(t) for t in res["per_repeat"]]
    step_time = _summary([t for ts in res["per_repeat"] for t in ts])
    step_time["median"] = statistics.median(medians)  # = the plain median when repeats=1
    step_time["per_repeat_median"] = medians
    step_time["per_repeat"] = [list(t) for t in res["per_repeat"]]
    achieved = flops_per_step / step_time["median"]
    device_peak = res.get("device_peak_bytes")
    memory = {
        **res["memory"],
        "device_peak_bytes": device_peak,
        "device_peak_is_exact": res.get("device_peak_is_exact"),
        "peak_bytes": device_peak if device_peak is not None else res["memory"]["compiled_peak"],
        "peak_source": "device" if device_peak is not None else "compiled",
    }
    xla = res["xla_flops_per_device"]
    return {
        **out,
        "step_time_s": step_time,
        "tokens_per_s": header["tokens_per_step"] / step_time["median"],
        "model_flops_per_token": fpt,
        "norm_flops_per_token": norm_flops_per_token(_with_placement(cfg, placement).model),
        "model_flops_per_step": flops_per_step,
        "model_tflops_per_s": achieved / 1e12,
        "model_tflops_per_s_per_device": achieved / n_devices / 1e12,
        "mfu": achieved / (peak_total * 1e12) if peak_total else None,
        "xla_flops_per_step_per_device": xla,
        "xla_to_model_flops": xla / (flops_per_step / n_devices) if xla else None,
        "memory": memory,
    }


def _analyses(compiled: Any) -> dict[str, Any]:
    """XLA's FLOP count (per device; a scanned layer stack is counted once) and memory plan."""
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, (list, tuple)) else (cost or {})
    mem = compiled.memory_analysis()
    memory: dict[str, Any] = {"compiled_peak": None}
    if mem is not None:
        memory.update(
            arguments=mem.argument_size_in_bytes,
            outputs=mem.output_size_in_bytes,
            aliased=mem.alias_size_in_bytes,
            temporaries=mem.temp_size_in_bytes,
        )
        memory["compiled_peak"] = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes
        )
    flops = cost.get("flops")
    return {"xla_flops_per_device": float(flops) if flops else None, "memory": memory}


def _add_overheads(placements: dict[str, dict[str, Any]]) -> None:
    """Step-time overhead of each placement over `pre`, in %: the median over repeats of the
    paired per-repeat ratios (pairs ran back to back, so slow drifts cancel)."""
    pre = placements.get("pre", {}).get("step_time_s")
    for res in placements.values():
        mine = res.get("step_time_s")
        if pre is None or mine is None:
            res["overhead_vs_pre_pct"] = None
            continue
        pairs = zip(mine["per_repeat_median"], pre["per_repeat_median"], strict=False)
        ratios = [100 * (a / b - 1) for a, b in pairs]
        res["overhead_vs_pre_pct"] = statistics.median(ratios)
        res["overhead_vs_pre_pct_per_repeat"] = ratios


# ------------------------------------------------------------------------------------- output
def _malloc_note(dev: dict[str, Any]) -> str:
    if dev["platform"] != "cpu" or "host_malloc_tuned" not in dev:
        return ""
    fusions = dev.get("step_compiler_options", {}).get("xla_cpu_experimental_ynn_fusion_type")
    fusion_note = (
        "; library fusions: matmuls only (perijax/tuning/cpu_compiler.py)" if fusions else ""
    )
    if dev["host_malloc_tuned"]:
        return "; host malloc tuned (perijax/tuning/cpu_malloc.py)" + fusion_note
    return (
        "; host malloc NOT tuned: each step faults its temporaries in (docs/performance.md)"
        + fusion_note
    )


def format_report(r: dict[str, Any]) -> str:
    dev, peak, cfg = r["device"], r["peak"], r["config"]
    m = cfg["model"]
    first = next((p for p in r["placements"].values() if "parameters" in p), {})
    if peak["tflops"]:
        peak_text = (
            f"peak {peak['tflops']:.3g} TFLOP/s per {peak['unit']} ({peak['source']}"
            + (f", {peak['precision']}" if peak["precision"] else "")
            + ")"
        )
    else:
        peak_text = "no peak: MFU not computed"
    lines = [
        f"device: {dev['count']} x {dev['device_kind']} ({dev['platform']}), mesh "
        + " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
        + f"; jax {r['versions']['jax']}; {peak_text}"
        + _malloc_note(dev),
        f"model: {m['num_layers']} layers, d_model {m['d_model']}, "
        f"{first.get('parameters', 0):,} parameters, {m['dtype']} compute; batch "
        + " x ".join(map(str, r["batch_shape"]))
        + f" ({r['tokens_per_step']:,} tokens/step); "
        f"{r['model_flops_per_token']:.3e} model FLOPs/token (perijax/flops.py)",
        f"steps: {r['settings']['warmup']} warmup + {r['settings']['steps']} timed, "
        f"{r['settings']['repeats']} repeat(s), interleaved (every second round reversed)",
        "",
    ]
    header = (
        f"{'placement':<10}{'compile':>9}{'step ms':>10}{'min-max ms':>17}{'tokens/s':>11}"
        f"{'TFLOP/s':>9}{'MFU':>8}{'XLA/model':>10}{'peak mem':>12}{'vs pre':>9}"
    )
    lines += [header, "-" * len(header)]
    for name, p in r["placements"].items():
        if "step_time_s" not in p:
            lines.append(f"{name:<10}  failed: {p.get('error', 'no measurement')}")
            continue
        st, mem = p["step_time_s"], p["memory"]
        spread = f"{st['min'] * 1e3:.1f}-{st['max'] * 1e3:.1f}"
        mfu = f"{100 * p['mfu']:.1f}%" if p["mfu"] is not None else "-"
        ratio = f"{p['xla_to_model_flops']:.2f}" if p["xla_to_model_flops"] else "-"
        peak_mem = "-"
        if mem["peak_bytes"] is not None:
            exact = mem["peak_source"] == "compiled" or mem["device_peak_is_exact"]
            peak_mem = ("" if exact else "<=") + f"{mem['peak_bytes'] / GIB:.2f} GiB"
            peak_mem += "*" if mem["peak_source"] == "compiled" else ""
        over = p["overhead_vs_pre_pct"]
        lines.append(
            f"{name:<10}{p['compile_s']:>8.1f}s{st['median'] * 1e3:>10.1f}{spread:>17}"
            f"{p['tokens_per_s']:>11,.0f}{p['model_tflops_per_s']:>9.3g}{mfu:>8}{ratio:>10}"
            f"{peak_mem:>12}{'' if over is None else f'{over:+.1f}%':>9}"
        )
    compiled = any(
        p.get("memory", {}).get("peak_source") == "compiled" for p in r["placements"].values()
    )
    lines += [
        "",
        "step ms: median over repeats of each repeat's median step; TFLOP/s: model FLOPs "
        "(perijax/flops.py) per second, all devices together",
        "XLA/model: XLA's FLOPs per device over the formula's (a scanned layer stack and the "
        "output head's loss chunks count once; remat adds recomputation)",
        "peak mem: per device; "
        + (
            "* = compiled estimate (no device memory statistics)"
            if compiled
            else "<= : an earlier placement set the process's high-water mark"
        ),
    ]
    return "\n".join(lines)


def _command(args: argparse.Namespace, placements: Sequence[str], overrides) -> str:
    argv = ["perijax", "bench", "--config", args.config, "--placements", ",".join(placements)]
    argv += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    argv += ["--repeats", str(args.repeats)]
    if args.no_peak:
        argv.append("--no-peak")
    if args.peak_tflops is not None:
        argv += ["--peak-tflops", str(args.peak_tflops)]
    if args.peak_sizes != ",".join(map(str, PEAK_SIZES)):
        argv += ["--peak-sizes", args.peak_sizes]
    if args.json_path:
        argv += ["--json", args.json_path]
    argv += [f"--config.{k}={v}" for k, v in overrides]
    return shlex.join(argv)


def run(args: argparse.Namespace, overrides: Sequence[tuple[str, str]] = ()) -> int:
    overrides = list(overrides)
    for flag, value, low in (("--steps", args.steps, 1), ("--warmup", args.warmup, 0)):
        if value < low:
            return fail(f"{flag} must be >= {low}, got {value}")
    if args.repeats < 1:
        return fail(f"--repeats must be >= 1, got {args.repeats}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        return fail(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if args.no_peak and args.peak_tflops is not None:
        return fail("--no-peak and --peak-tflops exclude each other")
    try:
        sizes = [int(s) for s in args.peak_sizes.split(",")]
        if not sizes or min(sizes) < 1:
            raise ValueError
    except ValueError:
        return fail(f"--peak-sizes {args.peak_sizes!r}: expected positive integers, e.g. 2048")
    if args.json_path and not Path(args.json_path).absolute().parent.is_dir():
        return fail(f"--json {args.json_path}: the folder does not exist")
    log = lambda s: print(f"bench: {s}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        cfg = config_lib.load(args.config, overrides)
        placements = parse_placements(args.placements, cfg.model.ln_placement)
    except ConfigError as e:
        return fail(str(e))
    command = _command(args, placements, overrides)

    def write(report: dict[str, Any]) -> None:  # rewritten as results come in
        tmp = Path(f"{args.json_path}.tmp")
        tmp.write_text(json.dumps({"command": command, **report}, indent=2) + "\n")
        tmp.replace(args.json_path)

    try:
        report = bench(
            cfg,
            placements,
            steps=args.steps,
            warmup=args.warmup,
            repeats=args.repeats,
            no_peak=args.no_peak,
            peak_tflops=args.peak_tflops,
            peak_sizes=sizes,
            log=log,
            on_update=write if args.json_path else None,
        )
    except ConfigError as e:
        return fail(str(e))
    print(format_report(report), flush=True)
    if args.json_path:
        write(report)
        log(f"wrote {args.json_path}")
    failed = [p for p, res in report["placements"].items() if "error" in res]
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m perijax.cli.bench ...`: the same as `perijax bench ...`."""
    try:
        rest, overrides = split_overrides(list(sys.argv[1:] if argv is None else argv))
    except ValueError as e:
        return fail(str(e))
    parser = argparse.ArgumentParser(prog="perijax")
    add_parser(parser.add_subparsers(dest="command"))
    return run(parser.parse_args(["bench", *rest]), overrides)


if __name__ == "__main__":
    from perijax.tuning import tune_host

    tune_host()  # as the `perijax` command does (perijax/tuning)
    sys.exit(main())
