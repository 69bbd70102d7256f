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
    p.add_argument("--devices", type=int, default=8, help="number of chips to plan for")
    p.add_argument(
        "--accelerator",
        default="h100",
        choices=sorted(ACCELERATORS),
        help="chip whose memory the plan is checked against (default: h100)",
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
    """Lowers and compiles the train step for `cfg` on the current (fake) devices."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from perijax import sharding as sharding_lib
    from perijax import step as step_lib
    from perijax import train as train_lib
    from perijax import tuning
    from perijax.attention import resolve
    from perijax.flops import flops_per_token
    from perijax.loss import chunk_len_for

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
    t_cfg = cfg.train
    accum = t_cfg.grad_accum_steps
    batch_shape = (t_cfg.global_batch_size // accum, accum, cfg.data.seq_len + 1)
    if cfg.model.loss_chunk_len == 0:  # the accelerator's automatic loss chunk, not the CPU's
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
    with tuning.planning_for(backend), jax.set_mesh(mesh):  # the target's choices, not the CPU's
        step = train_lib.compile_train_step(cfg, mesh, shardings, eod_id=eod_id)
        lowered = step.lower(abstract, jax.ShapeDtypeStruct(batch_shape, jnp.int32))
    t_lower = time.perf_counter() - t0
    compiled = lowered.compile()
    t_compile = time.perf_counter() - t0 - t_lower

    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    params_b = _bytes(abstract.params, jax.tree.leaves(shardings.params, is_leaf=is_var))
    opt_b = _bytes(abstract.opt_state, jax.tree.leaves(shardings.opt_state, is_leaf=is_var))
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    hbm, peak_tflops = ACCELERATORS[accelerator]
    tokens = t_cfg.global_batch_size * cfg.data.seq_len
    model_flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens / mesh.size
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    return {
        "config": {
            "model": dataclasses.asdict(cfg.model),
            "data": dataclasses.asdict(cfg.data),
            "train": dataclasses.asdict(t_cfg),
        },
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "accelerator": accelerator,
        "attention": {"target": target_attention, "planned": cfg.model.attention},
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
            # XLA counts a scanned loop body once, so this is per-layer-short with scan_layers.
            "xla_flops_per_step": float(cost.get("flops", 0.0)),
        },
        "hbm_bytes": hbm * GIB,
        "fits": peak <= hbm * GIB,
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
    lines = [
        f"plan: {r['parameters']:,} parameters on {r['devices']} x {r['accelerator']} "
        f"(mesh {r['sharding']}), {r['tokens_per_step']:,} tokens/step",
        f"  compile: lower {r['lower_s']:.1f}s, compile {r['compile_s']:.1f}s",
        f"  attention: {_attention_line(r['attention'])}",
        "  per device:",
        f"    parameters        {g(d['params_bytes'])}",
        f"    optimizer state   {g(d['opt_state_bytes'])}",
        f"    all arguments     {g(d['arguments_bytes'])}  (state + batch)",
        f"    temporaries       {g(d['temp_bytes'])}  (activations, grads; CPU estimate; "
        f"loss in chunks of {m['loss_chunk_len']} positions)",
        f"    peak (estimate)   {g(d['peak_bytes'])}  of {r['hbm_bytes'] / GIB:.0f} GiB HBM: "
        + ("fits" if r["fits"] else "DOES NOT FIT"),
        f"    model FLOPs/step  {d['model_flops_per_step']:.3e}  (perijax/flops.py; "
        f">= {r['ideal_step_time_s'] * 1e3:.1f} ms/step at peak)",
        f"    XLA FLOPs/step    {d['xla_flops_per_step']:.3e}"
        + (f"  ({' and '.join(loops)} counted once)" if loops else ""),
    ]
    return "\n".join(lines)


def _attention_line(a: dict) -> str:
    if a["target"] == a["planned"]:
        return a["planned"]
    return f"{a['target']} on the target, planned as {a['planned']} (same O(T) memory)"


def run(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    import jax

    from perijax import config as config_lib
    from perijax.config import ConfigError

    if args.devices < 1:
        return fail("--devices must be >= 1")
    # Simulate the target's chips as CPU devices; must happen before the backend starts.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    try:
        cfg = config_lib.load(args.config, overrides)
        print(
            f"planning {args.config} on {args.devices} simulated {args.accelerator} chips...",
            flush=True,
        )
        report = plan(cfg, args.accelerator)
    except ConfigError as e:
        return fail(str(e))
    print(format_report(report))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(report, f, indent=2)
    return 0
