"""Agreement of the attention kernels on the machine it runs on: loss and every gradient of a
small model in the given compute dtype, each kernel against the XLA path. Exits 1 (and says
which kernel and by how much) when one disagrees beyond the tolerance, 2 when a kernel that
should run here cannot.

    python scripts/attention_check.py                       # GPU: cudnn and blockwise vs xla
    python scripts/attention_check.py --kernels blockwise --seq-len 256 --dtype float32  # CPU

The model has the 400M paper model's attention shape (16 heads of 64, d_model 1024) with two
layers and a small vocabulary; documents are packed into each row when --documents is given
(cuDNN then falls back to blockwise, which the check reports).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from perijax import attention
from perijax.config import ModelConfig
from perijax.model import Transformer


def loss_and_grads(cfg: ModelConfig, tokens: jax.Array, seg) -> tuple[float, list[np.ndarray]]:
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))

    def loss(params):
        model = nnx.merge(graphdef, params)
        total, count, _ = model.loss(tokens[:, :-1], tokens[:, 1:], segment_ids=seg)
        return total / count

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    return float(value), [np.asarray(g, np.float32) for g in jax.tree.leaves(grads)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernels", default="cudnn,blockwise", help="compared with xla")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--documents", action="store_true", help="pack documents (masking on)")
    p.add_argument("--loss-tol", type=float, default=1e-2, help="relative")
    p.add_argument("--grad-tol", type=float, default=5e-2, help="relative, per parameter")
    p.add_argument("--json", help="write the measured errors here")
    args = p.parse_args()

    base = ModelConfig(vocab_size=512, num_layers=2, d_model=1024, num_heads=16, d_ff=2688,
                       ln_placement="peri", dtype=args.dtype, attention="xla")  # fmt: skip
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 512, (args.batch, args.seq_len + 1)), jnp.int32)
    seg = None
    if args.documents:
        tokens = jnp.where(jnp.asarray(rng.random(tokens.shape) < 1 / 300), 0, tokens)
        seg = attention.document_ids(tokens[:, :-1], 0)
    print(f"backend {jax.default_backend()}, jax {jax.__version__}, {jax.devices()[0].device_kind}")
    ref_loss, ref_grads = loss_and_grads(base, tokens, seg)
    print(f"xla: loss {ref_loss:.6f}")
    results, failures = {"xla": {"loss": ref_loss}}, []
    for kernel in args.kernels.split(","):
        try:
            attention.check(kernel, jnp.dtype(args.dtype))
        except ValueError as e:
            print(f"error: {kernel} cannot run here: {e}", file=sys.stderr)
            return 2
        cfg = dataclasses.replace(base, attention=kernel)
        value, grads = loss_and_grads(cfg, tokens, seg)
        loss_err = abs(value - ref_loss) / abs(ref_loss)
        grad_errs = [
            float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))
            for g, r in zip(grads, ref_grads, strict=True)
        ]
        worst = max(grad_errs)
        ok = np.isfinite(value) and loss_err <= args.loss_tol and worst <= args.grad_tol
        results[kernel] = {"loss": value, "loss_rel_err": loss_err, "grad_rel_err_max": worst}
        verdict = "ok" if ok else "MISMATCH"
        print(f"{kernel}: loss {value:.6f} (rel err {loss_err:.2e}), worst gradient rel err "
              f"{worst:.2e} over {len(grads)} parameters: {verdict}")  # fmt: skip
        if not ok:
            failures.append(kernel)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=2)
    if failures:
        print(f"error: {', '.join(failures)} disagree with the xla path", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
