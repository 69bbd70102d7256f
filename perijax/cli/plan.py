"""`perijax plan`: compile the train step ahead of time for a target topology, allocate nothing,
and report per-device memory and FLOPs.

Runs anywhere: the target's devices are simulated as fake CPU devices, parameters and batches are
abstract (`jax.eval_shape`, ShapeDtypeStructs) and the step is lowered and compiled with the same
shardings `perijax train` uses. Memory numbers come from XLA's CPU compiler: parameter and
optimizer-state bytes are exact; activation/temporary bytes are indicative (the CPU compiler
schedules differently from the GPU/TPU ones). The fused attention kernels the target would run
(cuDNN, splash) do not compile on CPU: the plan compiles `blockwise` attention in their place,
FlashAttention-2's algorithm in plain JAX, whose memory is linear in T as theirs is.

    perijax plan --config configs/paper.py:size=3.2b --accelerator tpu-v5p --devices 64 \\
        --config.mesh.fsdp=-1 --config.mesh.data=1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

from perijax.cli.common import DEFAULT_CONFIG, fail
from perijax.peaks import ACCELERATORS, GIB


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "plan",
        help="compile the train step for a target topology and report per-device memory",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--config", default=DEFAULT_CONFIG, metavar="FILE[:ARG]")
    p.add_argument(
        "--target",
        metavar="NAME",
        help="compile with the target's own compiler: a TPU slice (v5e-16, v5p-128, v4-32, "
        "v6e-8, 2xv5p-128) or NVIDIA GPUs (h100x8, h100x64 = 8 nodes x 8, h200x8, a100x8)",
    )
    p.add_argument(
        "--devices", type=int, help="without --target: chips to simulate on CPU (default: 8)"
    )
    p.add_argument(
        "--accelerator",
        choices=sorted(ACCELERATORS),
        help="without --target: the chip whose memory the CPU estimate is checked against "
        "(default: h100)",
    )
    p.add_argument("--json", dest="json_path", help="also write the report as JSON here")
    return p


def _bytes(tree, shardings) -> int:
    """Per-device bytes of an abstract pytree under its shardings (exact)."""
    import jax

    total = 0
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        shard = sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * leaf.dtype.itemsize
    return total


def plan(cfg, accelerator: str) -> dict:
    """The CPU compiler's estimate: the train step for `cfg` compiled on the current (fake CPU)
    devices as the accelerator would run it (bfloat16; fused attention as `blockwise`)."""
    from perijax import train as train_lib
    from perijax.attention import resolve

    backend = "tpu" if accelerator.startswith("tpu") else "gpu"
    target_attention = resolve(cfg.model.attention, backend)
    model = dataclasses.replace(
        cfg.model,
        # The target is an accelerator: bfloat16 compute; fused kernels planned as blockwise.
        dtype="bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype,
        attention="blockwise" if target_attention in ("cudnn", "splash") else target_attention,
    )
    cfg = dataclasses.replace(cfg, model=model)
    mesh, cfg = train_lib.setup(cfg)
    hbm, peak_tflops = ACCELERATORS[accelerator]
    r = _compile(cfg, mesh, backend, hbm_bytes=int(hbm * GIB), peak_tflops=peak_tflops)
    return {
        **r,
        "accelerator": accelerator,
        "attention": {"target": target_attention, "planned": cfg.model.attention},
        "compiler": "XLA:CPU",
        "estimate": True,
        "target": None,
    }


def plan_target(cfg, target) -> dict:
    """The train step for `cfg` compiled by `target`'s own compiler (`perijax.targets`) for its
    compile-only devices: the target's kernels, memory analysis and collectives."""
    from perijax import targets
    from perijax import train as train_lib
    from perijax.attention import resolve
    from perijax.peaks import ACCELERATORS

    devices = targets.devices(target)
    mesh, cfg = train_lib.setup(cfg, devices)
    r = _compile(
        cfg,
        mesh,
        target.platform,
        hbm_bytes=targets.hbm_bytes(target),
        peak_tflops=ACCELERATORS[target.accelerator][1],
        granule=lambda i: targets.granule_of(mesh.devices.flat[i], target),
    )
    attention = resolve(cfg.model.attention, target.platform)
    # A fused kernel that cannot take the call (document masking on cuDNN, ...) falls back to
    # blockwise attention (perijax.attention): the compiled program tells which one runs.
    runs = attention
    if attention in ("cudnn", "splash") and not r["fused_attention"]:
        runs = "blockwise"
    return {
        **r,
        "accelerator": target.accelerator,
        "attention": {"target": attention, "planned": runs},
        "compiler": targets.compiler_version(target),
        "estimate": False,
        "target": {**dataclasses.asdict(target), "granule": target.granule},
    }


def _compile(cfg, mesh, backend: str, *, hbm_bytes: int, peak_tflops: float, granule=None):
    """Lowers and compiles the train step `perijax train` jits (shardings, donation,
    accumulation, remat, scan, document masking) for `mesh`, tracing for `backend`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from perijax import sharding as sharding_lib
    from perijax import step as step_lib
    from perijax import train as train_lib
    from perijax import tuning
    from perijax.flops import flops_per_token
    from perijax.loss import chunk_len_for
    from perijax.model import compute_dtype
    from perijax.targets import program

    t_cfg = cfg.train
    accum = t_cfg.grad_accum_steps
    batch_shape = (t_cfg.global_batch_size // accum, accum, cfg.data.seq_len + 1)
    if cfg.model.loss_chunk_len == 0:  # the target's automatic loss chunk, not the host's
        chunk = chunk_len_for(
            0,
            batch_shape[0],
            cfg.data.seq_len,
            cfg.model.vocab_size,
            mesh=mesh,
            backend=backend,
        )
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, loss_chunk_len=chunk))

    t0 = time.perf_counter()
    abstract = jax.eval_shape(lambda: step_lib.create_state(cfg))
    shardings = train_lib.state_shardings(cfg, mesh)
    # Document masking: any id serves, the compiled step's shapes do not depend on it.
    eod_id = 0 if cfg.data.document_masking else None
    with tuning.planning_for(backend), jax.set_mesh(mesh):  # the target's choices, not the host's
        dtype = jnp.dtype(compute_dtype(cfg.model)).name
        step = train_lib.compile_train_step(cfg, mesh, shardings, eod_id=eod_id)
        traced = step.trace(abstract, jax.ShapeDtypeStruct(batch_shape, jnp.int32))
        lowered = traced.lower()
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0 - t_lower

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    calls = program.custom_calls(hlo)
    granule = granule or (lambda i: mesh.devices.flat[i].process_index)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    params_b = _bytes(abstract.params, jax.tree.leaves(shardings.params, is_leaf=is_var))
    opt_b = _bytes(abstract.opt_state, jax.tree.leaves(shardings.opt_state, is_leaf=is_var))
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    tokens = t_cfg.global_batch_size * cfg.data.seq_len
    model_flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens / mesh.size
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    hosts = len({granule(i) for i in range(mesh.size)})
    found = program.collectives(hlo, mesh.devices.shape, tuple(mesh.axis_names), granule)
    return {
        "config": {
            "model": dataclasses.asdict(cfg.model),
            "data": dataclasses.asdict(cfg.data),
            "train": dataclasses.asdict(t_cfg),
        },
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "compute_dtype": dtype,
        "parameters": n_params,
        "tokens_per_step": tokens,
        "per_device": {
            "params_bytes": params_b,
            "opt_state_bytes": opt_b,
            "arguments_bytes": mem.argument_size_in_bytes,
            "temp_bytes": mem.temp_size_in_bytes,
            "output_bytes": mem.output_size_in_bytes,
            "alias_bytes": mem.alias_size_in_bytes,
            "peak_bytes": peak,
            "model_flops_per_step": model_flops,
            # XLA counts a scanned loop body once, so this is per-layer-short with scan_layers;
            # None where the compiler has no cost analysis (XLA GPU without a device).
            "xla_flops_per_step": float(cost["flops"]) if cost and "flops" in cost else None,
        },
        "custom_calls": calls,
        "fused_attention": program.fused_attention_calls(calls),
        "float8_dots": program.float8_dots(hlo),
        "interpreted_pallas": program.interpreted_pallas(traced.jaxpr),
        # Arrays with two dimensions of the sequence length: materialized [T, T] scores.
        "seq_square_buffers": program.square_buffers(hlo, cfg.data.seq_len),
        "collectives": [c.as_dict() for c in found],
        "hosts": hosts,
        "crosses_hosts": sorted(program.crossing_axes(found)),
        "hbm_bytes": hbm_bytes,
        "fits": peak <= hbm_bytes,
        "ideal_step_time_s": model_flops / (peak_tflops * 1e12),
        "lower_s": t_lower,
        "compile_s": t_compile,
        "sharding": sharding_lib.describe(mesh),
    }


def format_report(r: dict) -> str:
    d, m = r["per_device"], r["config"]["model"]
    g = lambda b: f"{b / GIB:8.2f} GiB"  # noqa: E731
    loops = [name for name, counted_once in (
        ("scanned layers", m["scan_layers"]),
        ("loss chunks", m["loss_chunk_len"] < r["config"]["data"]["seq_len"]),
    ) if counted_once]  # fmt: skip
    t = r["target"]
    where = (
        f"{t['name']} ({r['devices']} x {r['accelerator']}, {t['hosts']} host"
        f"{'s' if t['hosts'] > 1 else ''}, topology {t['topology']})"
        if t
        else f"{r['devices']} x {r['accelerator']}"
    )
    est = " (estimate)" if r["estimate"] else ""
    lines = [
        f"plan: {r['parameters']:,} parameters on {where} (mesh {r['sharding']}), "
        f"{r['tokens_per_step']:,} tokens/step, {r['compute_dtype']} compute",
        f"  compiler: {r['compiler']}"
        + (" -- an estimate: the target's compiler was not used" if r["estimate"] else ""),
        f"  compile: lower {r['lower_s']:.1f}s, compile {r['compile_s']:.1f}s",
        f"  attention: {_attention_line(r['attention'], r['estimate'])}",
        f"  fused attention calls: {_calls(r['fused_attention'])}",
    ]
    if r["config"]["model"]["matmul_dtype"] == "float8":
        lines.append(f"  float8 dots (operand types): {_calls(r['float8_dots'])}")
    if r["interpreted_pallas"] and not r["estimate"]:
        lines.append(f"  INTERPRETED Pallas kernels: {r['interpreted_pallas']}")
    lines += [
        "  per device:",
        f"    parameters        {g(d['params_bytes'])}",
        f"    optimizer state   {g(d['opt_state_bytes'])}",
        f"    all arguments     {g(d['arguments_bytes'])}  (state + batch)",
        f"    temporaries       {g(d['temp_bytes'])}  (activations, grads"
        + ("; CPU estimate" if r["estimate"] else "")
        + f"; loss in chunks of {m['loss_chunk_len']} positions)",
        f"    peak{est:11} {g(d['peak_bytes'])}  of {r['hbm_bytes'] / GIB:.0f} GiB HBM: "
        + ("fits" if r["fits"] else "DOES NOT FIT"),
        f"    model FLOPs/step  {d['model_flops_per_step']:.3e}  (perijax/flops.py; "
        f">= {r['ideal_step_time_s'] * 1e3:.1f} ms/step at peak)",
    ]
    if d["xla_flops_per_step"] is not None:
        lines.append(
            f"    XLA FLOPs/step    {d['xla_flops_per_step']:.3e}"
            + (f"  ({' and '.join(loops)} counted once)" if loops else "")
        )
    lines.append("  collectives (per device; a loop body's counted once):")
    for c in r["collectives"]:
        axes = " x ".join(c["axes"]) or "-"
        cross = "  crosses hosts" if c["crosses_granules"] else ""
        lines.append(
            f"    {c['kind']:<19} over {axes:<16} {c['count']:4d} x, "
            f"{c['bytes'] / 2**20:10.1f} MiB{cross}"
        )
    if not r["collectives"]:
        lines.append("    none")
    if r["hosts"] > 1:
        axes, granule = r["crosses_hosts"], (t or {}).get("granule", "hosts")
        line = f"  across {r['hosts']} {granule}: " + (
            f"collectives cross along {', '.join(axes)}" if axes else "no collective crosses"
        )
        if not set(axes) <= {"data"}:
            ici = t and t["platform"] == "tpu" and t["slices"] == 1
            line += (
                f" (ICI links a slice's hosts; mesh.dcn_data={r['hosts']} keeps fsdp and tensor "
                "inside each host)"
                if ici
                else f" (over the network between {granule}: set mesh.dcn_data={r['hosts']})"
            )
        lines.append(line)
    return "\n".join(lines)


def _calls(calls: dict) -> str:
    return ", ".join(f"{name} x{n}" for name, n in calls.items()) or "none"


def _attention_line(a: dict, estimate: bool) -> str:
    if a["target"] == a["planned"]:
        return a["planned"]
    if not estimate:
        return f"{a['target']} falls back to {a['planned']} for this call (perijax.attention)"
    return f"{a['target']} on the target, planned as {a['planned']} (same O(T) memory)"


def run(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    import jax

    from perijax import config as config_lib
    from perijax import targets
    from perijax.config import ConfigError

    target = None
    if args.target:
        if args.devices is not None or args.accelerator is not None:
            return fail("--target names the chips and their number: drop --devices/--accelerator")
        try:
            target = targets.parse(args.target)
        except ConfigError as e:
            return fail(str(e))
        missing = targets.missing_compiler(target)
        if missing:
            print(
                f"perijax: note: {missing}; what follows is XLA:CPU's estimate for "
                f"{target.chips} simulated {target.accelerator} chips",
                file=sys.stderr,
                flush=True,
            )
    devices = target.chips if target else (args.devices if args.devices is not None else 8)
    accelerator = target.accelerator if target else (args.accelerator or "h100")
    if devices < 1:
        return fail("--devices must be >= 1")
    # Compile on the CPU: the target's compile-only devices, or its chips simulated as CPU
    # devices (the estimate). Must happen before the backend starts.
    jax.config.update("jax_platforms", "cpu")
    if target is None or missing:
        jax.config.update("jax_num_cpu_devices", devices)
    try:
        cfg = config_lib.load(args.config, overrides)
        if target and not missing:
            print(f"compiling {args.config} for {target.describe()} with {target.compiler}...",
                  flush=True)  # fmt: skip
            report = plan_target(cfg, target)
        else:
            print(f"planning {args.config} on {devices} simulated {accelerator} chips...",
                  flush=True)  # fmt: skip
            report = plan(cfg, accelerator)
            if target:
                report["target"] = dataclasses.asdict(target)
    except ConfigError as e:
        return fail(str(e))
    print(format_report(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return 0
