"""Regenerates docs/scaling.md's table of paper-model plans: each row compiled by the target's
own compiler (`perijax plan --target`) and, beside it, XLA:CPU's estimate for the same chips
(`perijax plan --devices N --accelerator A`), with the estimate's error. Run it where the target
compilers are installed (README.md, "targets"):

    .venv-targets/bin/python scripts/plan_table.py

Prints progress to stderr and the Markdown table to stdout; takes ~20 minutes on 2 cores.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

# size, target, (data, fsdp, tensor), seq, global batch, accumulation, extra overrides
ROWS = [
    ("400m", "h100x1", (1, 1, 1), 8192, 256, 128, {}),
    ("400m", "h100x8", (1, 8, 1), 8192, 256, 16, {}),
    ("400m", "v5e-16", (1, 16, 1), 8192, 256, 16, {}),
    ("400m", "v5e-16", (1, 16, 1), 4096, 512, 32, {}),
    ("400m", "v5p-128", (1, 64, 1), 8192, 256, 4, {}),
    ("1.5b", "h100x1", (1, 1, 1), 8192, 256, 256, {}),
    ("1.5b", "h100x8", (1, 8, 1), 8192, 256, 32, {}),
    ("1.5b", "v5e-16", (1, 16, 1), 4096, 512, 32, {}),
    ("1.5b", "v5p-128", (1, 64, 1), 8192, 256, 4, {}),
    ("3.2b", "h100x8", (1, 8, 1), 8192, 256, 32, {}),
    ("3.2b", "h100x32", (4, 8, 1), 8192, 256, 8, {"mesh.dcn_data": "4"}),
    ("3.2b", "v5e-16", (1, 16, 1), 2048, 1024, 64, {}),
    ("3.2b", "v5p-128", (1, 64, 1), 8192, 256, 4, {}),
]
GIB = 2**30


def plan(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
        proc = subprocess.run([sys.executable, "-m", "perijax.cli", "plan", *args, "--json", out],
                              capture_output=True, text=True, env=env)  # fmt: skip
        if proc.returncode:
            sys.exit(f"perijax plan {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def main() -> None:
    from perijax import targets

    if len(sys.argv) <= 1:
        print("| size | target | mesh (data × fsdp × tensor) | seq × batch, accum | state / device "
          "| peak / device (target compiler) | fits | CPU estimate (error) | fused attention "
          "calls | compile |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
    compilers = set()
    first = int(sys.argv[1]) if len(sys.argv) > 1 else 0  # resume at a row (no header)
    for size, name, mesh, seq, batch, accum, extra in ROWS[first:]:
        target = targets.parse(name)
        overrides = {"model.ln_placement": "peri", "model.scan_layers": "true",
                     "model.remat": "full", "mesh.data": mesh[0], "mesh.fsdp": mesh[1],
                     "mesh.tensor": mesh[2], "data.seq_len": seq,
                     "train.global_batch_size": batch, "train.grad_accum_steps": accum,
                     **extra}  # fmt: skip
        args = ["--config", f"configs/paper.py:size={size}",
                *(f"--config.{k}={v}" for k, v in overrides.items())]  # fmt: skip
        t0 = time.time()
        print(f"{size} on {name}...", file=sys.stderr, flush=True)
        real = plan([*args, "--target", name])
        if real["estimate"]:
            sys.exit(f"{target.compiler} is not installed here: {targets.INSTALL}")
        compilers.add(real["compiler"])
        # The estimate runs in one process: its simulated chips have no hosts to split data over.
        est_args = [a for a in args if not a.startswith("--config.mesh.dcn_data=")]
        est = plan([*est_args, "--devices", str(target.chips), "--accelerator", target.accelerator])
        d, e = real["per_device"], est["per_device"]
        peak, est_peak = d["peak_bytes"] / GIB, e["peak_bytes"] / GIB
        calls = sum(real["fused_attention"].values())
        kernel = "splash" if target.platform == "tpu" else "cuDNN"
        print(f"  {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
        print(
            f"| {size.upper()} | {target.name} | {' × '.join(map(str, mesh))} "
            f"| {seq} × {batch}, accum {accum} "
            f"| {(d['params_bytes'] + d['opt_state_bytes']) / GIB:.2f} GiB "
            f"| {peak:.1f} GiB of {real['hbm_bytes'] / GIB:.0f} "
            f"| {'yes' if real['fits'] else 'NO'} "
            f"| {est_peak:.1f} GiB ({est_peak - peak:+.1f}, {100 * (est_peak / peak - 1):+.0f}%) "
            f"| {kernel} × {calls} | {real['compile_s']:.0f} s |",
            flush=True,
        )
    print(f"\nCompilers: {'; '.join(sorted(compilers))}. CPU estimate: XLA:CPU, simulated chips.")


if __name__ == "__main__":
    main()
