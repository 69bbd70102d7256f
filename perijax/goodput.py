"""Where a run's wall time went, in the spirit of MaxText's ml-goodput-measurement: the time of
productive training steps against everything else (docs/checkpointing.md, "Goodput").

Buckets, in seconds of this launch's wall clock (from `train()`'s start):

- `compile`: the first step, which includes compilation;
- `restore`: restoring the checkpoint (or initializing);
- `data`: waiting for the next batch;
- `eval`, `checkpoint`: evaluations, checkpoint saves and the waits for them;
- `steps`: the other steps' time, of which
  - `rolled_back`: steps the divergence guard rolled back (done, then thrown away),
  - `redone`: steps a killed earlier launch had already done past its last checkpoint, done
    again by this one (the previous launch's last logged step minus the restored step),
  both at the launch's mean step time, and `productive` the rest;
- `other`: what no bucket holds (loading data, setup, writing metrics).

`goodput/*` metrics carry them (written with every checkpoint and at the end) and `summary()`
is the line the trainer prints last.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Iterator

NESTED = ("data", "eval", "checkpoint")  # timed inside a step's iteration


class Goodput:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.secs: collections.Counter[str] = collections.Counter()
        self.steps_run = 0  # iterations timed into `steps` (not the first)
        self.rolled_back_steps = 0
        self.redone_steps = 0

    @contextlib.contextmanager
    def timed(self, bucket: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.secs[bucket] += time.perf_counter() - t

    def nested(self) -> float:
        return sum(self.secs[b] for b in NESTED)

    def step_done(self, seconds: float, first: bool) -> None:
        """An iteration of the loop took `seconds` besides its nested buckets."""
        if first:
            self.secs["compile"] += seconds
        else:
            self.secs["steps"] += seconds
            self.steps_run += 1

    def metrics(self) -> dict[str, float]:
        total = time.perf_counter() - self.t0
        mean = self.secs["steps"] / self.steps_run if self.steps_run else 0.0
        rolled = min(self.rolled_back_steps * mean, self.secs["steps"])
        redone = min(self.redone_steps * mean, self.secs["steps"] - rolled)
        out = {f"goodput/{b}_s": self.secs[b] for b in
               ("compile", "restore", "data", "eval", "checkpoint")}  # fmt: skip
        out.update({
            "goodput/productive_s": self.secs["steps"] - rolled - redone,
            "goodput/rolled_back_s": rolled,
            "goodput/rolled_back_steps": float(self.rolled_back_steps),
            "goodput/redone_s": redone,
            "goodput/redone_steps": float(self.redone_steps),
            "goodput/total_s": total,
        })  # fmt: skip
        accounted = sum(self.secs[b] for b in ("compile", "restore", *NESTED, "steps"))
        out["goodput/other_s"] = max(0.0, total - accounted)
        out["goodput/fraction"] = out["goodput/productive_s"] / total if total > 0 else 0.0
        return out

    def summary(self) -> str:
        m = self.metrics()
        s = lambda key: f"{m[f'goodput/{key}_s']:.1f} s"  # noqa: E731
        return (
            f"goodput: {100 * m['goodput/fraction']:.0f}% productive ({s('productive')} of "
            f"{s('total')}); compile {s('compile')}, restore or init {s('restore')}, "
            f"waiting for data {s('data')}, eval {s('eval')}, checkpoints {s('checkpoint')}, "
            "rolled back "
            f"{self.rolled_back_steps} steps ({s('rolled_back')}), redone {self.redone_steps} "
            f"steps ({s('redone')}), other {s('other')}"
        )
