"""Losses and metric writers: `WORKDIR/metrics.jsonl` (one JSON object per logged step) and
TensorBoard event files, plus the one-line console progress."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

from perijax import storage


def cross_entropy(
    logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy and token count. logits: [B, T, V]; targets: [B, T];
    mask: [B, T] bool, the positions that count (others are selected away, not multiplied, so
    padding cannot leak into the sum)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return losses.sum(), jnp.asarray(losses.size, jnp.float32)
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(mask, dtype=jnp.float32)


def global_norm(tree) -> jax.Array:
    """L2 norm over every leaf of a pytree, accumulated in float32."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


class MetricWriter:
    """Appends metrics to metrics.jsonl and TensorBoard. Only the writing process creates files
    (process 0 in a multi-host run).

    A local metrics.jsonl gets each row as it is written. Object storage (a `gs://` workdir)
    cannot append, so there the file is rewritten whole: at most every `upload_secs`, at every
    `flush()` (the trainer flushes with each checkpoint, so a killed run loses no row up to
    its last checkpoint) and at `close()`.
    """

    def __init__(
        self, workdir: str | os.PathLike, *, enabled: bool = True, upload_secs: float = 30.0
    ):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._remote = None
        self._text: list[str] = []  # the whole remote file
        self._uploaded = 0  # rows of _text already uploaded
        self._upload_secs, self._last_upload = upload_secs, time.monotonic()
        if not enabled:
            return
        path = storage.as_path(workdir) / "metrics.jsonl"
        if storage.is_url(path):
            self._remote = path
            if path.exists():
                self._text = [path.read_text()]
                self._uploaded = 1
        else:
            self._jsonl = open(path, "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir), flush_secs=10)
        except ImportError:  # TensorBoard output is optional; metrics.jsonl is not
            self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for key, value in metrics.items():
            value = float(value)
            row[key] = value if math.isfinite(value) else str(value)
            if self._tb is not None:
                self._tb.add_scalar(key, value, int(step))
        line = json.dumps(row) + "\n"
        if self._remote is None:
            self._jsonl.write(line)
            self._jsonl.flush()
            return
        self._text.append(line)
        if time.monotonic() - self._last_upload >= self._upload_secs:
            self.flush()

    def flush(self) -> None:
        """Makes every row written so far durable (a no-op for a local file)."""
        if self._remote is not None and self._uploaded < len(self._text):
            self._text = ["".join(self._text)]
            self._remote.write_text(self._text[0])
            self._uploaded, self._last_upload = 1, time.monotonic()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def expand_layers(metrics: dict[str, Any]) -> dict[str, float]:
    """Host-side: scalars stay; a key with "{}" holding an [L] array becomes L metrics with the
    two-digit layer index substituted (`stability/resid_var/{}/attn` -> `.../07/attn`)."""
    out = {}
    for key, value in metrics.items():
        if "{}" in key:
            for layer, v in enumerate(value.reshape(-1).tolist()):
                out[key.format(f"{layer:02d}")] = float(v)
        else:
            out[key] = float(value)
    return out


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def progress_line(step: int, total: int, m: dict[str, float], eta_s: float | None) -> str:
    """`step  120/500  loss 4.3210  lr 1.20e-03  gnorm 0.81  5,210 tok/s  eta 1m12s`."""
    width = len(str(total))
    parts = [
        f"step {step:>{width}}/{total}",
        f"loss {m['train/loss']:.4f}",
        f"lr {m['train/lr']:.2e}",
        f"gnorm {m['train/grad_norm']:.3f}",
    ]
    if "perf/tokens_per_sec" in m:
        parts.append(f"{m['perf/tokens_per_sec']:,.0f} tok/s")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return "  ".join(parts)
