"""What a run left behind, read back: `metrics.jsonl` (resumed and rolled-back runs included),
`status.json` (or the state inferred without it), `config.json`, and whether the run was stable.
`perijax report`, its figures and `perijax sweep` read runs through this module; it needs no
JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from perijax import storage
from perijax.config import PLACEMENTS, TRACKING_KEYS, flat_dict
from perijax.metrics import metric_lines


# ------------------------------------------------------------------------------ metric files
def _number(value: Any) -> Any:
    """metrics.jsonl writes non-finite floats as the strings "nan", "inf", "-inf"."""
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "+inf", "infinity"):
        return float(value)
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl (and of the `metrics.d/` segments beside it, a `gs://`
    workdir's) as one merged row per step, in step order.

    A resumed or rolled-back run continues from an earlier step, so its file goes back in time:
    the later rows win. When a row's step is below one already seen, the rows after that step
    are dropped (that stretch of training was redone); rows of the same step (train and eval)
    are merged, later values winning. A missing file gives [] and a torn last line is ignored.
    """
    merged: dict[int, dict[str, Any]] = {}
    lines = metric_lines(storage.as_path(path).parent)  # metrics.jsonl, then any segments
    last = -1
    for line in lines:
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
        if step < last:  # rare (a resume or rollback): only then look for rows to drop
            for later in [s for s in merged if s > step]:
                del merged[later]
        last = step
        merged.setdefault(step, {"step": step}).update(
            {k: _number(v) for k, v in row.items() if k != "step"}
        )
    return [merged[s] for s in sorted(merged)]


def series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the rows that have it."""
    pairs = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def final_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The last value of each train/, eval/, guard/ and spikes/ metric and of stability/max_abs,
    with the last step."""
    final: dict[str, Any] = {}
    for row in rows:
        for key, value in row.items():
            if key == "step" or key.startswith(("train/", "eval/", "guard/", "spikes/")):
                final[key] = value
            elif key == "stability/max_abs":
                final[key] = value
    return final


def first_nonfinite_step(rows: Sequence[dict[str, Any]], key: str = "train/loss") -> int | None:
    for row in rows:
        value = row.get(key)
        if isinstance(value, float) and not math.isfinite(value):
            return int(row["step"])
    return None


def jsonable(value: Any) -> Any:
    """Replaces non-finite floats by "nan"/"inf"/"-inf" (the metrics.jsonl convention), so the
    output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# ------------------------------------------------------------------------------------- runs
@dataclasses.dataclass
class RunResult:
    """What a run left behind, read back."""

    path: Path
    name: str
    config: dict[str, Any]  # flattened config.json: {"model.ln_placement": "peri", ...}
    status: dict[str, Any]  # status.json, or inferred from the metrics
    rows: list[dict[str, Any]]

    @property
    def state(self) -> str:
        return str(self.status.get("state", "started"))

    @property
    def placement(self) -> str:
        return str(self.config.get("model.ln_placement", "?"))

    @property
    def lr(self) -> float | None:
        lr = self.config.get("optim.lr")
        return float(lr) if lr is not None else None

    @property
    def seed(self) -> int:
        return int(self.config.get("train.seed", 0))

    @functools.cached_property
    def finals(self) -> dict[str, Any]:
        """`final_metrics` of the rows, computed once: tables and figures ask for them often."""
        return final_metrics(self.rows)

    def final(self, key: str) -> float | None:
        value = self.finals.get(key)
        return float(value) if isinstance(value, (int, float)) else None

    @functools.cached_property
    def blew_up_step(self) -> int | None:
        """`blew_up_at(self)`, computed once (stability is asked per run in every table and
        figure)."""
        start = initial_loss(self)
        if start is None:
            return None
        for step, loss in zip(*series(self.rows, "train/loss"), strict=True):
            if step > 0 and math.isfinite(loss) and loss > BLOWUP_FACTOR * start:
                return step
        return None


def infer_status(config: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The state of a run without status.json (e.g. launched from `perijax sweep --emit`
    commands): diverged if its last train or eval loss is not finite, done if it reached
    train.total_steps, else started (still running, or stopped early)."""
    final = final_metrics(rows)
    status: dict[str, Any] = {"diverged_at_step": None, "final": final}
    losses = [final.get("train/loss"), final.get("eval/loss")]
    total = config.get("train.total_steps")
    if any(isinstance(v, float) and not math.isfinite(v) for v in losses):
        status["state"] = "diverged"
        status["diverged_at_step"] = first_nonfinite_step(rows)
    elif rows and total is not None and rows[-1]["step"] >= total:
        status["state"] = "done"
    else:
        status["state"] = "started" if rows or config else "pending"
    status["inferred"] = True
    return status


def load_run(path: Path) -> RunResult:
    def read(name: str) -> dict[str, Any] | None:
        try:
            return json.loads((path / name).read_text())
        except (OSError, ValueError):
            return None

    config = flat_dict(read("config.json") or {})
    rows = read_metrics(path / "metrics.jsonl")
    status = read("status.json")
    if not config and status and status.get("overrides"):
        # Failed before the trainer wrote config.json: the sweep's record still names its
        # placement, lr and seed (as command-line text).
        given = status["overrides"]
        for key, kind in (("model.ln_placement", str), ("optim.lr", float), ("train.seed", int)):
            if key in given:
                config[key] = kind(given[key])
    if status is None:
        status = infer_status(config, rows)
    return RunResult(path, path.name, config, status, rows)


def find_runs(directory: str | Path) -> list[RunResult]:
    """One run (a folder with metrics.jsonl or status.json) or every run folder in a sweep
    root, in the sweep's order when ROOT/sweep.json lists it."""
    directory = Path(directory)
    marks = ("metrics.jsonl", "status.json", "config.json")
    if any((directory / m).exists() for m in marks):
        return [load_run(directory)]
    found = (
        sorted(
            p for p in directory.iterdir() if p.is_dir() and any((p / m).exists() for m in marks)
        )
        if directory.is_dir()
        else []
    )
    order = {name: i for i, name in enumerate(sweep_run_names(directory))}
    found.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    return [load_run(p) for p in found]


def sweep_run_names(directory: Path) -> list[str]:
    try:
        record = json.loads((directory / "sweep.json").read_text())
        return [r["name"] for r in record.get("runs", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return []


# ---------------------------------------------------------------------------------- stability
# A run is unstable if it diverged (a non-finite loss; the trainer marks it "diverged") or blew
# up: a train loss logged after step 0 rose above BLOWUP_FACTOR x its loss at initialization, so
# training made the model worse than the random one it started from. A blown-up run often
# settles at a finite, poor loss (e.g. the unigram entropy) and would pass a NaN-only test.
BLOWUP_FACTOR = 1.1


def initial_loss(run: RunResult) -> float | None:
    """The run's loss at initialization: its step-0 eval loss, else ln(vocab size) (the loss of
    a uniform prediction), else None."""
    for row in run.rows:
        if row["step"] == 0 and is_finite(row.get("eval/loss")):
            return float(row["eval/loss"])
    vocab = run.config.get("model.vocab_size")
    return math.log(vocab) if isinstance(vocab, int) and vocab > 1 else None


def blew_up_at(run: RunResult) -> int | None:
    """The first step after 0 whose finite train loss exceeds BLOWUP_FACTOR x the loss at
    initialization; None if none does or the initial loss is unknown."""
    return run.blew_up_step


def is_stable(run: RunResult) -> bool | None:
    """True: finished without diverging or blowing up; False: diverged or blew up; None: did
    not finish (still running, stopped early, failed)."""
    if run.state == "diverged":
        return False
    if run.state != "done":
        return None
    return blew_up_at(run) is None


class Best(NamedTuple):
    """`best_of`'s choice: the group's key (None: no group qualified), its mean final metric
    on `seeds`, and the seeds the groups were compared on."""

    key: Any
    mean: float | None
    seeds: list[int]


def best_of(groups: dict[Any, Sequence[RunResult]], metric: str) -> Best:
    """The best of `groups` of runs (a sweep's runs by learning rate, say): among the groups
    whose finished runs were all stable (`is_stable`; at least one finished), the lowest mean
    final `metric`, the first listed on a tie. Groups are compared on the seeds that every such
    group has finished (all seeds when none is common), so seeds added at one value (a sweep's
    refine stage) do not make a many-seed mean compete with single lucky runs. `perijax report`
    and the sweep's refine stage both choose with this rule."""
    done: dict[Any, list[RunResult]] = {}
    for key, runs in groups.items():
        verdicts = [v for v in (is_stable(r) for r in runs) if v is not None]
        if verdicts and all(verdicts):
            done[key] = [r for r in runs if r.state == "done"]
    seeds = [{r.seed for r in runs} for runs in done.values() if runs]
    common = set.intersection(*seeds) if seeds else set()
    means = {}
    for key, runs in done.items():
        values = [r.final(metric) for r in runs if not common or r.seed in common]
        values = [v for v in values if is_finite(v)]
        if values:
            means[key] = statistics.fmean(values)
    if not means:
        return Best(None, None, sorted(common))
    best = min(means, key=means.get)
    return Best(best, means[best], sorted(common))


def max_abs_series(run: RunResult) -> tuple[list[int], list[float]]:
    steps, values = series(run.rows, "stability/max_abs")
    if steps:
        return steps, values
    pattern = re.compile(r"^stability/max_abs/\d+/(attn|mlp)$")
    steps, values = [], []
    for row in run.rows:
        layer_values = [float(v) for k, v in row.items() if pattern.match(k) and is_finite(v)]
        if layer_values:
            steps.append(row["step"])
            values.append(max(layer_values))
    return steps, values


def layer_values(row: dict[str, Any], pattern: re.Pattern) -> dict[int, float]:
    out = {}
    for key, value in row.items():
        m = pattern.match(key)
        if m and isinstance(value, (int, float)):
            out[int(m.group(1))] = float(value)
    return out


def rows_with(run: RunResult, pattern: re.Pattern) -> list[dict[str, Any]]:
    return [r for r in run.rows if any(pattern.match(k) for k in r)]


FP16_MAX = 65504.0  # largest finite float16


GROUP_KEYS = ("model.ln_placement", "optim.lr")


# Keys that may differ between the runs of one experiment without making them different
# experiments (seeds are aggregated; the rest only say how a run was executed).
NOT_GROUPED = ("train.seed", "data.cache_dir", "data.num_threads", "data.prefetch", *TRACKING_KEYS)


NOT_GROUPED_SECTIONS = ("checkpoint", "mesh", "distributed")


GAMMA_NAMES = (
    "attn_input",
    "attn_output",
    "mlp_input",
    "mlp_output",
    "attn_residual",
    "mlp_residual",
)


def group_keys(runs: Sequence[RunResult]) -> list[str]:
    """ln_placement and lr, then every other config key whose value differs between the runs
    (e.g. a swept depth), except the seed and execution settings: runs that differ only in
    those are repeats of one experiment."""
    keys = list(GROUP_KEYS)
    all_keys = sorted({k for r in runs for k in r.config})
    for key in all_keys:
        if key in keys or key in NOT_GROUPED or key.split(".")[0] in NOT_GROUPED_SECTIONS:
            continue
        if len({json.dumps(r.config[key]) for r in runs if key in r.config}) > 1:
            keys.append(key)
    return keys


def sort_value(key: str, value: Any) -> tuple:
    if key == "model.ln_placement" and value in PLACEMENTS:
        return (0, PLACEMENTS.index(value), "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, str(value))


GRAD_NORM_LAYER = re.compile(r"^stability/grad_norm/(\d+)$")
