"""The figures of `perijax report`, as PNGs: per-layer residual variance, gradient norms and
norm scales, max |h| and gradient norm vs step, and final loss vs learning rate. Placements that
a figure compares share one axis, as the paper's figures do.

Per-run figures show one run per placement (`representatives`); the loss-vs-lr figure shows
every run. docs/experiments.md lists which metrics each figure reads.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from perijax.experiments.runlog import (
    FP16_MAX,
    GAMMA_NAMES,
    GRAD_NORM_LAYER,
    RunResult,
    group_keys,
    is_finite,
    is_stable,
    layer_values,
    max_abs_series,
    rows_with,
    series,
    sort_value,
)


def require_matplotlib():
    from perijax.packages import require

    return require(
        "matplotlib", feature="report figures", extra="report", alternative="pass --no-figures"
    )


def make_figures(runs: Sequence[RunResult], out: Path, lr: float | None = None) -> list[str]:
    """Writes every figure it has the metrics for; returns one note per figure (written or
    skipped and why) and one naming the runs the per-run figures show."""
    matplotlib = require_matplotlib()
    matplotlib.use("Agg")  # files only: no display needed, works on any server
    reps = representatives(runs, lr)
    notes = []
    for name, make in FIGURES.items():
        target = runs if make is fig_loss_vs_lr else reps
        why = make(target, out / name)
        notes.append(f"{name}: skipped ({why})" if why else f"{name}: written")
    if reps:
        setting = _setting_text(runs)
        chosen = ", ".join(f"{p}: {r.name}" for p, r in reps.items())
        notes.append(f"per-run figures show {setting}{chosen}")
    return notes


def _extra_keys(runs: Sequence[RunResult]) -> list[str]:
    """The varying config keys besides placement and lr (e.g. model.dtype)."""
    return [k for k in group_keys(runs) if k not in ("model.ln_placement", "optim.lr")]


def _setting_text(runs: Sequence[RunResult]) -> str:
    keys = _extra_keys(runs)
    if not keys:
        return ""
    first = runs[0].config
    return ",".join(f"{k.rpartition('.')[2]}={first.get(k)}" for k in keys) + ": "


def representatives(runs: Sequence[RunResult], lr: float | None = None) -> dict[str, RunResult]:
    """One run per placement for the per-run figures.

    Where runs differ in more than placement, lr and seed (e.g. a float32 and a float16 grid),
    only the setting of the first run (in sweep order) is shown, so placements are compared like
    with like. At `lr` if given, else at the largest lr where every placement has a stable run
    (the setting that stresses them most while all still train), else at the smallest lr; the
    lowest-seed stable run, else the lowest seed.
    """
    extra = _extra_keys(runs)
    if runs and extra:
        runs = [r for r in runs if all(r.config.get(k) == runs[0].config.get(k) for k in extra)]
    placements = sorted(
        {r.placement for r in runs}, key=lambda p: sort_value("model.ln_placement", p)
    )
    lrs = sorted({r.lr for r in runs if r.lr is not None})
    if lr is None and lrs:

        def all_train(x: float) -> bool:
            return all(
                any(r.lr == x and r.placement == p and is_stable(r) for r in runs)
                for p in placements
            )

        common = [x for x in lrs if all_train(x)]
        lr = common[-1] if common else lrs[0]
    chosen = {}
    for p in placements:
        candidates = [r for r in runs if r.placement == p and (lr is None or r.lr == lr)]
        candidates = [r for r in candidates if r.rows]
        if candidates:
            candidates.sort(key=lambda r: (not is_stable(r), r.seed, r.name))
            chosen[p] = candidates[0]
    return chosen


def fig_resid_var(reps: dict[str, RunResult], path: Path) -> str | None:
    """Residual-stream variance after each block (stability/resid_var/LL/mlp; LL/attn where a
    block has no mlp entry) vs layer, every placement on one axis: the last logged step solid,
    the first dashed."""
    import matplotlib.pyplot as plt

    pattern = re.compile(r"^stability/resid_var/(\d+)/(mlp|attn)$")
    data = {p: rows_with(r, pattern) for p, r in reps.items()}
    data = {p: rows for p, rows in data.items() if rows}
    if not data:
        return "no run has stability/resid_var/* metrics"
    colors = _colors(list(data))
    fig, ax = plt.subplots(figsize=(8, 4))
    for placement, rows in data.items():
        for row, style in (
            ((rows[0], "--"), (rows[-1], "-")) if len(rows) > 1 else ((rows[0], "-"),)
        ):
            by_layer = _block_output(row, "resid_var")
            layers = sorted(by_layer)
            ax.plot(
                layers,
                [by_layer[x] for x in layers],
                style,
                marker="o",
                ms=3,
                color=colors[placement],
                alpha=1.0 if style == "-" else 0.55,
                label=f"{placement}, step {row['step']}",
            )
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("Var(residual stream) after block")
    ax.set_title("residual variance per layer (dashed: first logged step)", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside: no overlap
    _save(fig, path)
    return None


def fig_loss_vs_lr(runs: Sequence[RunResult], path: Path) -> str | None:
    """Final loss (eval/loss, else train/loss) of every run vs lr, placements as colors, one
    panel per setting of the other varying keys (e.g. float32, float16; in the order the runs
    come) on a shared y axis. The
    line joins the means over seeds of the stable runs; unstable runs are marks on the top row
    (x: diverged, ^: blew up) with "k/n" unstable of the runs at that lr."""
    import matplotlib.pyplot as plt

    key = "eval/loss" if any(r.final("eval/loss") is not None for r in runs) else "train/loss"
    usable = [r for r in runs if r.lr is not None and is_stable(r) is not None]
    if not usable:
        return "no finished run with optim.lr in its config"
    extra = _extra_keys(usable)
    panels: dict[tuple, list[RunResult]] = {}
    for run in usable:
        panels.setdefault(tuple(run.config.get(k) for k in extra), []).append(run)
    order = list(panels)  # in sweep order (find_runs): the first run's setting first
    placements = sorted(
        {r.placement for r in usable}, key=lambda p: sort_value("model.ln_placement", p)
    )
    colors = _colors(placements)
    finite = [r.final(key) for r in usable if is_stable(r) and is_finite(r.final(key))]
    top = max(finite) if finite else 1.0
    bottom = min(finite) if finite else 0.0
    mark_at = top + 0.08 * max(top - bottom, 0.1)
    fig, axes = plt.subplots(
        1, len(order), figsize=(5.5 * len(order), 4), sharey=True, squeeze=False
    )
    for ax, values in zip(axes[0], order, strict=True):
        mine = panels[values]
        for placement in placements:
            _plot_placement(
                ax,
                [r for r in mine if r.placement == placement],
                key,
                mark_at,
                color=colors[placement],
                label=placement,
                nudge=1.06 ** (placements.index(placement) - (len(placements) - 1) / 2),
            )
        ax.axhline(mark_at, color="0.8", lw=0.5)
        ax.text(
            0.01, mark_at, " unstable", transform=ax.get_yaxis_transform(), va="bottom", fontsize=7
        )
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        if extra:
            ax.set_title(
                ", ".join(
                    f"{k.rpartition('.')[2]}={v}" for k, v in zip(extra, values, strict=True)
                ),
                fontsize=9,
            )
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(f"final {key}")
    _save(fig, path)
    return None


def _plot_placement(
    ax, runs: Sequence[RunResult], key: str, mark_at: float, *, color, label: str, nudge: float
) -> None:
    """One placement's runs in one loss-vs-lr panel."""
    ok = [r for r in runs if is_stable(r) and is_finite(r.final(key))]
    ax.scatter([r.lr for r in ok], [r.final(key) for r in ok], s=12, alpha=0.5, color=color)
    lrs = sorted({r.lr for r in ok})
    means = [statistics.fmean(r.final(key) for r in ok if r.lr == x) for x in lrs]
    if lrs:
        ax.plot(lrs, means, marker="o", color=color, label=label)
    # One mark per lr with "k/n" beside it; placements are nudged apart so none hides another.
    for x in sorted({r.lr for r in runs if not is_stable(r)}):
        at_x = [r for r in runs if r.lr == x]
        bad = [r for r in at_x if not is_stable(r)]
        marker = "x" if any(r.state == "diverged" for r in bad) else "^"
        ax.scatter([x * nudge], [mark_at], marker=marker, s=50, color=color)
        ax.annotate(
            f"{len(bad)}/{len(at_x)}",
            (x * nudge, mark_at),
            xytext=(4, 3),
            textcoords="offset points",
            fontsize=7,
            color=color,
        )


def _plot_layers(ax, by_layer: dict[int, float], *, color, label: str) -> None:
    """One line of a per-layer quantity against the layer index."""
    layers = sorted(by_layer)
    ax.plot(layers, [by_layer[x] for x in layers], marker="o", ms=3, color=color, label=label)


def _colors(placements: Sequence[str]) -> dict[str, Any]:
    palette = {"pre": "tab:blue", "post": "tab:red", "peri": "tab:green", "output": "tab:orange"}
    return {p: palette.get(p, "tab:gray") for p in placements}


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _save_vs_step(fig: Any, ax: Any, path: Path, ylabel: str) -> None:
    """Labels a quantity-vs-step axis (log scale) and writes the figure."""
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    _save(fig, path)


def _block_output(row: dict[str, Any], metric: str) -> dict[int, float]:
    """Per layer, the value after the block (after its mlp sublayer; after attn if only that
    is logged)."""
    attn = layer_values(row, re.compile(rf"^stability/{metric}/(\d+)/attn$"))
    mlp = layer_values(row, re.compile(rf"^stability/{metric}/(\d+)/mlp$"))
    return {**attn, **mlp}


def fig_layer_grad_norm(reps: dict[str, RunResult], path: Path) -> str | None:
    """Per-layer gradient norm (stability/grad_norm/LL) at the first logged step (the nearest to
    initialization: step 0 has no train metrics) and the last."""
    import matplotlib.pyplot as plt

    pattern = GRAD_NORM_LAYER
    data = {p: rows_with(r, pattern) for p, r in reps.items()}
    data = {p: rows for p, rows in data.items() if rows}
    if not data:
        return "no run has stability/grad_norm/LL metrics"
    colors = _colors(list(data))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    panels = ((axes[0], 0, "first logged step"), (axes[1], -1, "last logged step"))
    for ax, which, title in panels:
        for placement, rows in data.items():
            values = layer_values(rows[which], pattern)
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
    _save_vs_step(fig, ax, path, "global gradient norm")
    return None


def fig_max_abs(reps: dict[str, RunResult], path: Path) -> str | None:
    """Largest |hidden state| (stability/max_abs, else the max of stability/max_abs/LL/SUB) vs
    step, against the float16 limit 65,504."""
    import matplotlib.pyplot as plt

    data = {p: max_abs_series(r) for p, r in reps.items()}
    data = {p: s for p, s in data.items() if s[0]}
    if not data:
        return "no run has stability/max_abs metrics"
    colors = _colors(list(data))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    for placement, (steps, values) in data.items():
        ax.plot(steps, values, lw=1, color=colors[placement], label=placement)
    ax.axhline(FP16_MAX, color="k", ls="--", lw=1, label="float16 max (65,504)")
    _save_vs_step(fig, ax, path, "max |h|")
    return None


def fig_gamma(reps: dict[str, RunResult], path: Path) -> str | None:
    """Mean learned norm scale γ per layer at the last logged step (stability/gamma/LL/NAME),
    one panel per norm the placements have."""
    import matplotlib.pyplot as plt

    pattern = re.compile(r"^stability/gamma/(\d+)/(\w+)$")
    last = {}
    for placement, run in reps.items():
        rows = rows_with(run, pattern)
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
            values = layer_values(row, re.compile(rf"^stability/gamma/(\d+)/{name}$"))
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
