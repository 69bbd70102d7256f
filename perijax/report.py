"""`perijax report`: summarize a run or a sweep from its files: a table of final losses (mean ± std
over seeds), diverged and spike counts per placement x learning rate, written as Markdown and CSV,
and the paper's figures as PNGs.

    perijax report runs/ln-small                 # a sweep root (one folder per run)
    perijax report runs/small-peri --out /tmp/r  # one run

Reads only WORKDIR/{config.json, metrics.jsonl, status.json}; needs no JAX. A figure whose metrics
no run has is skipped with a note. docs/experiments.md lists which metrics each figure reads.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from perijax.config import TRACKING_KEYS, flat_dict

PLACEMENTS = ("pre", "post", "peri", "output")
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


# ------------------------------------------------------------------------------ metric files
def _number(value: Any) -> Any:
    """metrics.jsonl writes non-finite floats as the strings "nan", "inf", "-inf"."""
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "+inf", "infinity"):
        return float(value)
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl as one merged row per step, in step order.

    A resumed or rolled-back run continues from an earlier step, so its file goes back in time:
    the later rows win. When a row's step is below one already seen, the rows after that step
    are dropped (that stretch of training was redone); rows of the same step (train and eval)
    are merged, later values winning. A missing file gives [] and a torn last line is ignored.
    """
    merged: dict[int, dict[str, Any]] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
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


def _finite(value: Any) -> bool:
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

    def final(self, key: str) -> float | None:
        value = final_metrics(self.rows).get(key)
        return float(value) if isinstance(value, (int, float)) else None


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
    order = {name: i for i, name in enumerate(_sweep_run_names(directory))}
    found.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    return [load_run(p) for p in found]


def _sweep_run_names(directory: Path) -> list[str]:
    try:
        record = json.loads((directory / "sweep.json").read_text())
        return [r["name"] for r in record.get("runs", [])]
    except (OSError, ValueError, KeyError, TypeError):
        return []


# ---------------------------------------------------------------------------------- the table
@dataclasses.dataclass
class Stat:
    """Mean ± sample standard deviation (n - 1) of the finite values; std is None for n < 2."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        values = [v for v in values if _finite(v)]
        if not values:
            return cls(None, None, 0)
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, len(values))

    def text(self, digits: int = 4) -> str:
        if self.mean is None:
            return "–"
        if self.std is None:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


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


def _sort_value(key: str, value: Any) -> tuple:
    if key == "model.ln_placement" and value in PLACEMENTS:
        return (0, PLACEMENTS.index(value), "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def summarize(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per group (placement x lr x other varying keys), seeds aggregated.

    Losses average the finished, non-diverged runs (train loss: last logged; eval loss: last
    evaluation); diverged runs are counted, never averaged in and never dropped. Spike counts
    (the trainer's running counts, last value) average over every run that logged them.
    """
    keys = group_keys(runs)
    groups: dict[tuple, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(tuple(run.config.get(k) for k in keys), []).append(run)
    out = []
    for values in sorted(
        groups, key=lambda v: [_sort_value(k, x) for k, x in zip(keys, v, strict=True)]
    ):
        members = groups[values]
        done = [r for r in members if r.state == "done"]
        finished = [r for r in members if r.state in ("done", "diverged")]
        max_abs = [_max_abs(r) for r in members]
        out.append(
            {
                "keys": dict(zip(keys, values, strict=True)),
                "runs": len(finished),
                "diverged": sum(r.state == "diverged" for r in members),
                "failed": sum(r.state == "failed" for r in members),
                "unfinished": sum(r.state not in ("done", "diverged", "failed") for r in members),
                "train_loss": Stat.of([r.final("train/loss") for r in done]),
                "eval_loss": Stat.of([r.final("eval/loss") for r in done]),
                "grad_norm_spikes": Stat.of([r.final("spikes/grad_norm") for r in members]),
                "loss_spikes": Stat.of([r.final("spikes/loss") for r in members]),
                "max_abs": max((v for v in max_abs if v is not None), default=None),
                "grad_spread": _median([_last_step_layers(r, GRAD_NORM_LAYER) for r in done]),
                "final_var": _median([_last_step_layers(r, RESID_VAR_LAYER) for r in done]),
                "members": [r.name for r in members],
            }
        )
    return out


GRAD_NORM_LAYER = re.compile(r"^stability/grad_norm/(\d+)$")
RESID_VAR_LAYER = re.compile(r"^stability/resid_var/(\d+)/mlp$")


def _last_step_layers(run: RunResult, pattern: re.Pattern) -> float | None:
    """At the last step that logged `pattern`'s per-layer values: for gradient norms the largest
    over the smallest layer value (1 = perfectly uniform), for residual variance the value
    after the last block. None without those metrics."""
    rows = _rows_with(run, pattern)
    if not rows:
        return None
    values = _layer_values(rows[-1], pattern)
    if len(values) < 2:
        return None
    if pattern is RESID_VAR_LAYER:
        return values[max(values)]
    low, high = min(values.values()), max(values.values())
    return high / low if low > 0 else math.inf


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.median(present)) if present else None


def _max_abs(run: RunResult) -> float | None:
    """The largest |h| the run ever logged (stability/max_abs, else the per-layer maxima)."""
    steps, values = _max_abs_series(run)
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else None


def _max_abs_series(run: RunResult) -> tuple[list[int], list[float]]:
    steps, values = series(run.rows, "stability/max_abs")
    if steps:
        return steps, values
    pattern = re.compile(r"^stability/max_abs/\d+/(attn|mlp)$")
    steps, values = [], []
    for row in run.rows:
        layer_values = [float(v) for k, v in row.items() if pattern.match(k) and _finite(v)]
        if layer_values:
            steps.append(row["step"])
            values.append(max(layer_values))
    return steps, values


def _key_label(key: str) -> str:
    return {"model.ln_placement": "placement", "optim.lr": "lr"}.get(key, key)


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "?" if value is None else str(value)


def markdown_table(groups: Sequence[dict[str, Any]]) -> str:
    keys = list(groups[0]["keys"]) if groups else list(GROUP_KEYS)
    header = [_key_label(k) for k in keys] + [
        "runs",
        "diverged",
        "final train loss",
        "final eval loss",
        "grad-norm spikes",
        "loss spikes",
        "max abs(h)",
        "layer grad-norm max/min",
        "resid var after last block",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        cells = [_fmt_value(v) for v in g["keys"].values()]
        total = g["runs"]
        cells += [
            str(total),
            f"{g['diverged']}/{total}",
            g["train_loss"].text(),
            g["eval_loss"].text(),
            g["grad_norm_spikes"].text(1),
            g["loss_spikes"].text(1),
            "–" if g["max_abs"] is None else f"{g['max_abs']:.3g}",
            "–" if g["grad_spread"] is None else f"{g['grad_spread']:.3g}",
            "–" if g["final_var"] is None else f"{g['final_var']:.3g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(groups: Sequence[dict[str, Any]], path: Path) -> None:
    keys = list(groups[0]["keys"]) if groups else list(GROUP_KEYS)
    stats = ("train_loss", "eval_loss", "grad_norm_spikes", "loss_spikes")
    header = [_key_label(k) for k in keys] + ["runs", "diverged", "failed", "unfinished"]
    header += [f"{s}_{part}" for s in stats for part in ("mean", "std", "n")]
    header += ["max_abs", "grad_spread_median", "final_resid_var_median"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for g in groups:
            row = list(g["keys"].values()) + [g["runs"], g["diverged"], g["failed"]]
            row.append(g["unfinished"])
            for s in stats:
                row += [_csv(g[s].mean), _csv(g[s].std), g[s].n]
            row += [_csv(g["max_abs"]), _csv(g["grad_spread"]), _csv(g["final_var"])]
            writer.writerow(row)


def _csv(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def write_runs_csv(runs: Sequence[RunResult], path: Path) -> None:
    """One line per run: where every number in the table comes from."""
    header = ["run", "placement", "lr", "seed", "state", "diverged_at_step", "last_step"]
    keys = ["train/loss", "eval/loss", "spikes/grad_norm", "spikes/loss", "guard/skipped_steps"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header + keys + ["seconds"])
        for r in runs:
            last = r.rows[-1]["step"] if r.rows else ""
            at = r.status.get("diverged_at_step")
            row = [r.name, r.placement, r.lr, r.seed, r.state, "" if at is None else at, last]
            row += [_csv(r.final(k)) for k in keys] + [r.status.get("seconds", "")]
            writer.writerow(row)


# ------------------------------------------------------------------------------------ figures
def representatives(runs: Sequence[RunResult], lr: float | None = None) -> dict[str, RunResult]:
    """One run per placement for the per-run figures: at `lr` if given, else at the largest lr
    where every placement has a run that did not diverge (the setting that stresses them most
    while all still train), else at the smallest lr; the lowest seed that did not diverge."""
    placements = sorted(
        {r.placement for r in runs}, key=lambda p: _sort_value("model.ln_placement", p)
    )
    lrs = sorted({r.lr for r in runs if r.lr is not None})
    if lr is None and lrs:

        def all_train(x: float) -> bool:
            return all(
                any(r.lr == x and r.placement == p and r.state != "diverged" for r in runs)
                for p in placements
            )

        common = [x for x in lrs if all_train(x)]
        lr = common[-1] if common else lrs[0]
    chosen = {}
    for p in placements:
        candidates = [r for r in runs if r.placement == p and (lr is None or r.lr == lr)]
        candidates = [r for r in candidates if r.rows]
        if candidates:
            candidates.sort(key=lambda r: (r.state == "diverged", r.seed, r.name))
            chosen[p] = candidates[0]
    return chosen


def _plot_layers(ax, by_layer: dict[int, float], *, color, label: str) -> None:
    """One line of a per-layer quantity against the layer index."""
    layers = sorted(by_layer)
    ax.plot(layers, [by_layer[x] for x in layers], marker="o", ms=3, color=color, label=label)


def _layer_values(row: dict[str, Any], pattern: re.Pattern) -> dict[int, float]:
    out = {}
    for key, value in row.items():
        m = pattern.match(key)
        if m and isinstance(value, (int, float)):
            out[int(m.group(1))] = float(value)
    return out


def _rows_with(run: RunResult, pattern: re.Pattern) -> list[dict[str, Any]]:
    return [r for r in run.rows if any(pattern.match(k) for k in r)]


def _colors(placements: Sequence[str]) -> dict[str, Any]:
    palette = {"pre": "tab:blue", "post": "tab:red", "peri": "tab:green", "output": "tab:orange"}
    return {p: palette.get(p, "tab:gray") for p in placements}


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_resid_var(reps: dict[str, RunResult], path: Path) -> str | None:
    """Residual-stream variance after each block (stability/resid_var/LL/mlp; LL/attn where a
    block has no mlp entry) vs layer, at up to 4 points in training, one panel per placement."""
    import matplotlib.pyplot as plt

    pattern = re.compile(r"^stability/resid_var/(\d+)/(mlp|attn)$")
    panels = {p: _rows_with(r, pattern) for p, r in reps.items()}
    panels = {p: rows for p, rows in panels.items() if rows}
    if not panels:
        return "no run has stability/resid_var/* metrics"
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, (placement, rows) in zip(axes[0], panels.items(), strict=True):
        picks = sorted({round(i * (len(rows) - 1) / 3) for i in range(4)})
        for j, idx in enumerate(picks):
            row = rows[idx]
            by_layer = _block_output(row, "resid_var")
            _plot_layers(
                ax, by_layer, color=cmap(j / max(len(picks) - 1, 1)), label=f"step {row['step']}"
            )
        ax.set_yscale("log")
        ax.set_title(f"{placement} ({reps[placement].name})", fontsize=8)
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("Var(residual stream) after block")
    _save(fig, path)
    return None


def _block_output(row: dict[str, Any], metric: str) -> dict[int, float]:
    """Per layer, the value after the block (after its mlp sublayer; after attn if only that
    is logged)."""
    attn = _layer_values(row, re.compile(rf"^stability/{metric}/(\d+)/attn$"))
    mlp = _layer_values(row, re.compile(rf"^stability/{metric}/(\d+)/mlp$"))
    return {**attn, **mlp}


def fig_layer_grad_norm(reps: dict[str, RunResult], path: Path) -> str | None:
    """Per-layer gradient norm (stability/grad_norm/LL) at the first logged step (the nearest to
    initialization: step 0 has no train metrics) and the last."""
    import matplotlib.pyplot as plt

    pattern = GRAD_NORM_LAYER
    data = {p: _rows_with(r, pattern) for p, r in reps.items()}
    data = {p: rows for p, rows in data.items() if rows}
    if not data:
        return "no run has stability/grad_norm/LL metrics"
    colors = _colors(list(data))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    panels = ((axes[0], 0, "first logged step"), (axes[1], -1, "last logged step"))
    for ax, which, title in panels:
        for placement, rows in data.items():
            values = _layer_values(rows[which], pattern)
            label = f"{placement} (step {rows[which]['step']})"
            _plot_layers(ax, values, color=colors[placement], label=label)
        ax.set_yscale("log")
        ax.set_title(f"per-layer gradient norm, {title}", fontsize=9)
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("‖∇ layer‖")
    _save(fig, path)
    return None


def fig_grad_norm_steps(reps: dict[str, RunResult], path: Path) -> str | None:
    """Global gradient norm (train/grad_norm) vs step; x marks steps where the trainer's running
    spike count (spikes/grad_norm) went up."""
    import matplotlib.pyplot as plt

    data = {p: r for p, r in reps.items() if series(r.rows, "train/grad_norm")[0]}
    if not data:
        return "no run has train/grad_norm"
    colors = _colors(list(data))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for placement, run in data.items():
        steps, values = series(run.rows, "train/grad_norm")
        ax.plot(steps, values, lw=1, color=colors[placement], label=f"{placement} ({run.name})")
        s_steps, counts = series(run.rows, "spikes/grad_norm")
        norm_at = dict(zip(steps, values, strict=True))
        previous = 0.0
        for s, c in zip(s_steps, counts, strict=True):
            if c > previous and s in norm_at and math.isfinite(norm_at[s]):
                ax.plot([s], [norm_at[s]], "x", color=colors[placement], ms=7)
            previous = c
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("global gradient norm")
    ax.legend(fontsize=7)
    _save(fig, path)
    return None


def fig_loss_vs_lr(runs: Sequence[RunResult], path: Path) -> str | None:
    """Final loss (eval/loss, else train/loss) of every run vs lr per placement; the line joins
    the means over seeds of the runs that did not diverge; diverged runs are x marks at the top."""
    import matplotlib.pyplot as plt

    key = "eval/loss" if any(r.final("eval/loss") is not None for r in runs) else "train/loss"
    usable = [r for r in runs if r.lr is not None and r.state in ("done", "diverged")]
    if not usable:
        return "no finished run with optim.lr in its config"
    placements = sorted(
        {r.placement for r in usable}, key=lambda p: _sort_value("model.ln_placement", p)
    )
    colors = _colors(placements)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    finite = [r.final(key) for r in usable if r.state == "done" and _finite(r.final(key))]
    top = max(finite) if finite else 1.0
    bottom = min(finite) if finite else 0.0
    mark_at = top + 0.08 * max(top - bottom, 0.1)
    for placement in placements:
        mine = [r for r in usable if r.placement == placement]
        ok = [r for r in mine if r.state == "done" and _finite(r.final(key))]
        ax.scatter(
            [r.lr for r in ok], [r.final(key) for r in ok], s=12, alpha=0.5, color=colors[placement]
        )
        lrs = sorted({r.lr for r in ok})
        means = [statistics.fmean(r.final(key) for r in ok if r.lr == x) for x in lrs]
        ax.plot(lrs, means, marker="o", color=colors[placement], label=placement)
        # One x per lr with "k/n" beside it; placements are nudged apart so none hides another.
        nudge = 1.06 ** (placements.index(placement) - (len(placements) - 1) / 2)
        for x in sorted({r.lr for r in mine if r.state == "diverged"}):
            at_x = [r for r in mine if r.lr == x]
            k = sum(r.state == "diverged" for r in at_x)
            ax.scatter([x * nudge], [mark_at], marker="x", s=50, color=colors[placement])
            ax.annotate(
                f"{k}/{len(at_x)}",
                (x * nudge, mark_at),
                xytext=(4, 3),
                textcoords="offset points",
                fontsize=7,
                color=colors[placement],
            )
    ax.axhline(mark_at, color="0.8", lw=0.5)
    ax.text(0.01, mark_at, " diverged", transform=ax.get_yaxis_transform(), va="bottom", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel(f"final {key}")
    ax.legend(fontsize=8)
    _save(fig, path)
    return None


def fig_max_abs(reps: dict[str, RunResult], path: Path) -> str | None:
    """Largest |hidden state| (stability/max_abs, else the max of stability/max_abs/LL/SUB) vs
    step, against the float16 limit 65,504."""
    import matplotlib.pyplot as plt

    data = {p: _max_abs_series(r) for p, r in reps.items()}
    data = {p: s for p, s in data.items() if s[0]}
    if not data:
        return "no run has stability/max_abs metrics"
    colors = _colors(list(data))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for placement, (steps, values) in data.items():
        ax.plot(steps, values, lw=1, color=colors[placement], label=placement)
    ax.axhline(FP16_MAX, color="k", ls="--", lw=1, label="float16 max (65,504)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max |h|")
    ax.legend(fontsize=7)
    _save(fig, path)
    return None


def fig_gamma(reps: dict[str, RunResult], path: Path) -> str | None:
    """Mean learned norm scale γ per layer at the last logged step (stability/gamma/LL/NAME),
    one panel per norm the placements have."""
    import matplotlib.pyplot as plt

    pattern = re.compile(r"^stability/gamma/(\d+)/(\w+)$")
    last = {}
    for placement, run in reps.items():
        rows = _rows_with(run, pattern)
        if rows:
            last[placement] = rows[-1]
    names = [n for n in GAMMA_NAMES if any(f"stability/gamma/00/{n}" in r for r in last.values())]
    names += sorted(
        {m.group(2) for r in last.values() for k in r if (m := pattern.match(k))} - set(names)
    )
    if not names:
        return "no run has stability/gamma/* metrics"
    colors = _colors(list(last))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for placement, row in last.items():
            values = _layer_values(row, re.compile(rf"^stability/gamma/(\d+)/{name}$"))
            if values:
                _plot_layers(ax, values, color=colors[placement], label=placement)
        ax.set_title(f"γ of {name}_norm", fontsize=9)
        ax.set_xlabel("layer")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean γ (last step)")
    _save(fig, path)
    return None


FIGURES: dict[str, Callable[..., str | None]] = {
    "resid_var_per_layer.png": fig_resid_var,
    "grad_norm_per_layer.png": fig_layer_grad_norm,
    "grad_norm_vs_step.png": fig_grad_norm_steps,
    "loss_vs_lr.png": fig_loss_vs_lr,
    "max_abs_vs_step.png": fig_max_abs,
    "gamma_per_layer.png": fig_gamma,
}


def _require_matplotlib():
    from perijax.packages import require

    return require(
        "matplotlib", feature="report figures", extra="report", alternative="pass --no-figures"
    )


def make_figures(runs: Sequence[RunResult], out: Path, lr: float | None = None) -> list[str]:
    """Writes every figure it has the metrics for; returns one note per figure (written or
    skipped and why)."""
    matplotlib = _require_matplotlib()
    matplotlib.use("Agg")  # files only: no display needed, works on any server
    reps = representatives(runs, lr)
    notes = []
    for name, make in FIGURES.items():
        target = runs if make is fig_loss_vs_lr else reps
        why = make(target, out / name)
        notes.append(f"{name}: skipped ({why})" if why else f"{name}: written")
    return notes


# ------------------------------------------------------------------------------------- report
def report(
    directory: str | Path,
    out: str | Path | None = None,
    *,
    lr: float | None = None,
    figures: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Reads the runs under `directory`, prints the table, writes OUT/{summary.md, summary.csv,
    runs.csv, *.png} (OUT defaults to DIRECTORY/report); returns the table's groups."""
    directory = Path(directory)
    runs = find_runs(directory)
    if not runs:
        raise ValueError(
            f"no runs in {directory}: expected {directory}/metrics.jsonl or run folders "
            f"{directory}/*/metrics.jsonl"
        )
    lrs = sorted({r.lr for r in runs if r.lr is not None})
    if lr is not None and lr not in lrs:
        have = ", ".join(f"{x:g}" for x in lrs) or "none"
        raise ValueError(f"--lr {lr:g}: no run has that learning rate (runs have: {have})")
    if figures:
        _require_matplotlib()  # before anything is written
    out = Path(out) if out is not None else directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    groups = summarize(runs)
    table = markdown_table(groups)
    notes = _run_notes(runs, directory)
    reps = representatives(runs, lr)
    if figures:
        notes += make_figures(runs, out, lr)
        if reps:
            chosen = ", ".join(f"{p}: {r.name}" for p, r in reps.items())
            notes.append(f"per-run figures show {chosen}")
    body = io.StringIO()
    body.write(f"# Report: {directory}\n\n{table}\n\n")
    body.write(
        "Losses: mean ± sample std over the seeds that finished without diverging (n of them); "
        "diverged runs are counted in `diverged`, not averaged. Spikes: the trainer's running "
        "counts at the last step, averaged over runs. Max abs(h): the largest |hidden state| any "
        "run logged. Layer grad-norm max/min (1 = uniform across layers; inf: a layer's gradient "
        "underflowed to 0) and resid var after the last block: at the last logged step, median "
        "over the finished runs.\n"
    )
    if notes:
        body.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    (out / "summary.md").write_text(body.getvalue(), encoding="utf-8")
    write_csv(groups, out / "summary.csv")
    write_runs_csv(runs, out / "runs.csv")
    log(table)
    for note in notes:
        log(f"- {note}")
    log(f"written: {out}/summary.md, summary.csv, runs.csv" + (", *.png" if figures else ""))
    return groups


def _run_notes(runs: Sequence[RunResult], directory: Path) -> list[str]:
    notes = []
    for r in runs:
        if r.state == "diverged":
            notes.append(f"diverged: {r.name} at step {r.status.get('diverged_at_step')}")
        elif r.state == "failed":
            notes.append(f"failed: {r.name}: {r.status.get('error', '')}")
        elif r.state != "done":
            notes.append(f"not finished: {r.name} ({r.state})")
    present = {r.name for r in runs}
    missing = [n for n in _sweep_run_names(directory) if n not in present]
    if missing:
        notes.append(
            f"{len(missing)} run(s) of the sweep not started: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
        )
    return notes


# ---------------------------------------------------------------------------------- the command
def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "report",
        help="summary table and figures of a run or a sweep",
        description="Summarize a run folder or a sweep root: final losses (mean ± std over "
        "seeds), diverged and spike counts per placement x lr as Markdown and CSV, and PNG "
        "figures (docs/experiments.md).",
    )
    p.add_argument("directory", metavar="RUN_OR_SWEEP_DIR")
    p.add_argument("--out", help="output folder (default: DIR/report)")
    p.add_argument(
        "--lr",
        type=float,
        help="learning rate of the runs shown in the per-run figures (default: the largest at "
        "which no placement diverged on every seed)",
    )
    p.add_argument("--no-figures", action="store_true", help="tables only")
    return p


def run(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    """Entry point of `perijax report`: bad input is one line on stderr and exit status 2."""
    if overrides:
        return _fail("report takes no --config.* overrides")
    if not Path(args.directory).is_dir():
        return _fail(f"{args.directory} is not a directory")
    try:
        report(args.directory, args.out, lr=args.lr, figures=not args.no_figures)
    except (ValueError, OSError) as e:
        return _fail(str(e))
    return 0


def _fail(message: str) -> int:
    print(f"perijax: error: {message}", file=sys.stderr)
    return 2
