"""`perijax report`: summarize a run or a sweep from its files: a table of final losses (mean ± std
over seeds), diverged and spike counts per placement x learning rate, written as Markdown and CSV,
and the paper's figures as PNGs.

    perijax report runs/ln-small                 # a sweep root (one folder per run)
    perijax report runs/small-peri --out /tmp/r  # one run

Reads only WORKDIR/{config.json, metrics.jsonl, status.json}; needs no JAX. A figure whose metrics
no run has is skipped with a note. docs/experiments.md lists which metrics each figure reads.

The figures are perijax.experiments.figures and reading runs back is perijax.experiments.runlog.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from perijax.cli.common import fail
from perijax.experiments.runlog import (
    BLOWUP_FACTOR,
    GRAD_NORM_LAYER,
    GROUP_KEYS,
    RunResult,
    best_of,
    blew_up_at,
    find_runs,
    group_keys,
    initial_loss,
    is_finite,
    is_stable,
    layer_values,
    max_abs_series,
    rows_with,
    sort_value,
    sweep_run_names,
)


# ---------------------------------------------------------------------------------- the table
@dataclasses.dataclass
class Stat:
    """Mean ± sample standard deviation (n - 1) of the finite values; std is None for n < 2."""

    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        values = [v for v in values if is_finite(v)]
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


EVAL_SET_LOSS = re.compile(r"^eval/(.+)/loss$")


def eval_set_names(runs: Sequence[RunResult]) -> list[str]:
    """The eval.sets names logged by any run (`eval/NAME/loss`), sorted."""
    return sorted({m.group(1) for r in runs for k in r.finals if (m := EVAL_SET_LOSS.match(k))})


def summarize(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """One row per group (placement x lr x other varying keys), seeds aggregated.

    Losses average the finished, non-diverged runs (train loss: last logged; eval loss: last
    evaluation); diverged runs are counted, never averaged in and never dropped. Spike counts
    (the trainer's running counts, last value) average over every run that logged them.
    """
    keys, set_names = group_keys(runs), eval_set_names(runs)
    groups: dict[tuple, list[RunResult]] = {}
    for run in runs:
        groups.setdefault(tuple(run.config.get(k) for k in keys), []).append(run)
    out = []
    for values in sorted(
        groups, key=lambda v: [sort_value(k, x) for k, x in zip(keys, v, strict=True)]
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
                "eval_sets": {
                    name: Stat.of([r.final(f"eval/{name}/loss") for r in done])
                    for name in set_names
                },
                "grad_norm_spikes": Stat.of([r.final("spikes/grad_norm") for r in members]),
                "loss_spikes": Stat.of([r.final("spikes/loss") for r in members]),
                "max_abs": max((v for v in max_abs if v is not None), default=None),
                "grad_spread": _median([_last_step_layers(r, GRAD_NORM_LAYER) for r in done]),
                "final_var": _median([_last_step_layers(r, RESID_VAR_LAYER) for r in done]),
                "var_growth": _median([_resid_var_growth(r) for r in done]),
                "members": [r.name for r in members],
            }
        )
    return out


def stability_table(runs: Sequence[RunResult]) -> list[dict[str, Any]]:
    """Per placement (x every other varying key but lr): the learning rates tried, the largest
    at which every finished run was stable, the smallest at which one was not, and the best
    (lowest mean final eval loss, else train loss, among lrs where every finished run was
    stable) with the mean and sample std over all its seeds. `interior`: the best lr has a
    tried lr on each side, so the optimum is bracketed.

    The best lr is chosen on the seeds that every stable lr has (`chosen_on`; all seeds if none
    is common): a sweep that added seeds at one rate (`refine`) would otherwise compare a
    5-seed mean with single runs, and the luckiest single run would win."""
    keys, settings = _settings_by_lr(runs)
    key = _loss_metric(runs)
    table = []
    for values, by_lr in settings.items():
        lrs = sorted(by_lr)
        verdicts = {x: [is_stable(r) for r in by_lr[x] if is_stable(r) is not None] for x in lrs}
        stable = [x for x in lrs if verdicts[x] and all(verdicts[x])]
        unstable = [x for x in lrs if not all(verdicts[x])]
        best, _, common = best_of({x: by_lr[x] for x in lrs}, key)
        done_at_best = [r for r in by_lr[best] if r.state == "done"] if best is not None else []
        at_best = Stat.of([r.final(key) for r in done_at_best])
        table.append(
            {
                "keys": dict(zip(keys, values, strict=True)),
                "lrs": lrs,
                "largest_stable": stable[-1] if stable else None,
                "smallest_unstable": unstable[0] if unstable else None,
                "unstable_runs": sum(v is False for x in lrs for v in verdicts[x]),
                "finished_runs": sum(len(verdicts[x]) for x in lrs),
                "best_lr": best,
                "interior": best is not None and lrs[0] < best < lrs[-1],
                "chosen_on": common,
                "at_best": at_best,
                "metric": key,
            }
        )
    return table


def _loss_metric(runs: Sequence[RunResult]) -> str:
    return "eval/loss" if any(r.final("eval/loss") is not None for r in runs) else "train/loss"


def _settings_by_lr(
    runs: Sequence[RunResult],
) -> tuple[list[str], dict[tuple, dict[float, list[RunResult]]]]:
    """(the varying keys but lr, {their values: {lr: runs}}), the settings in sort order."""
    keys = [k for k in group_keys(runs) if k != "optim.lr"]
    settings: dict[tuple, dict[float, list[RunResult]]] = {}
    for run in runs:
        if run.lr is not None:
            values = tuple(run.config.get(k) for k in keys)
            settings.setdefault(values, {}).setdefault(run.lr, []).append(run)
    order = sorted(settings, key=lambda v: [sort_value(k, x) for k, x in zip(keys, v, strict=True)])
    return keys, {values: settings[values] for values in order}


def lr_grid_markdown(runs: Sequence[RunResult]) -> str:
    """The final loss of every setting (row) at every learning rate (column): the mean over its
    finished runs, with n when several seeds ran; "*" marks a rate at which a run was unstable
    (blew up or diverged), "diverged" one with no finished run to average. "" when no setting
    tried two rates."""
    keys, settings = _settings_by_lr(runs)
    lrs = sorted({lr for by_lr in settings.values() for lr in by_lr})
    if len(lrs) < 2:
        return ""
    metric = _loss_metric(runs)
    header = [_key_label(k) for k in keys] + [f"lr {lr:g}" for lr in lrs]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for values, by_lr in settings.items():
        cells = [_fmt_value(v) for v in values]
        for lr in lrs:
            members = by_lr.get(lr, [])
            stat = Stat.of([r.final(metric) for r in members if r.state == "done"])
            mark = "*" if any(is_stable(r) is False for r in members) else ""
            if not members:
                cells.append("")
            elif stat.mean is None:
                cells.append("diverged" if mark else "–")
            else:
                cells.append(f"{stat.mean:.3f}{mark}" + (f" (n={stat.n})" if stat.n > 1 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stability_markdown(rows: Sequence[dict[str, Any]]) -> str:
    keys = list(rows[0]["keys"]) if rows else ["model.ln_placement"]
    metric = rows[0]["metric"] if rows else "eval/loss"
    header = [_key_label(k) for k in keys] + [
        "lrs tried",
        "unstable runs",
        "largest stable lr",
        "smallest unstable lr",
        "best lr",
        "chosen on seeds",
        "best lr interior",
        f"final {metric} at best lr",
        "seed std at best lr",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lrs, at = row["lrs"], row["at_best"]
        cells = [_fmt_value(v) for v in row["keys"].values()] + [
            f"{len(lrs)}: {lrs[0]:g} … {lrs[-1]:g}" if len(lrs) > 1 else f"{lrs[0]:g}",
            f"{row['unstable_runs']}/{row['finished_runs']}",
            _fmt_value(row["largest_stable"]) if row["largest_stable"] else "none",
            _fmt_value(row["smallest_unstable"]) if row["smallest_unstable"] else "none tried",
            _fmt_value(row["best_lr"]) if row["best_lr"] else "–",
            ",".join(map(str, row["chosen_on"])) or "all",
            ("yes" if row["interior"] else "no (at the grid's edge)") if row["best_lr"] else "–",
            "–" if at.mean is None else f"{at.mean:.4f} (n={at.n})",
            "–" if at.std is None else f"{at.std:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_stability_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    keys = list(rows[0]["keys"]) if rows else ["model.ln_placement"]
    header = [_key_label(k) for k in keys] + [
        "lrs",
        "unstable_runs",
        "finished_runs",
        "largest_stable_lr",
        "smallest_unstable_lr",
        "best_lr",
        "chosen_on_seeds",
        "best_lr_interior",
        "metric",
        "at_best_mean",
        "at_best_std",
        "at_best_n",
    ]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            at = row["at_best"]
            writer.writerow(
                list(row["keys"].values())
                + [" ".join(f"{x:g}" for x in row["lrs"]), row["unstable_runs"]]
                + [row["finished_runs"], _csv(row["largest_stable"])]
                + [_csv(row["smallest_unstable"]), _csv(row["best_lr"])]
                + [" ".join(map(str, row["chosen_on"])), row["interior"]]
                + [row["metric"], _csv(at.mean), _csv(at.std), at.n]
            )


RESID_VAR_LAYER = re.compile(r"^stability/resid_var/(\d+)/mlp$")


def _last_step_layers(run: RunResult, pattern: re.Pattern) -> float | None:
    """At the last step that logged `pattern`'s per-layer values: for gradient norms the largest
    over the smallest layer value (1 = perfectly uniform), for residual variance the value
    after the last block. None without those metrics."""
    rows = rows_with(run, pattern)
    if not rows:
        return None
    values = layer_values(rows[-1], pattern)
    if len(values) < 2:
        return None
    if pattern is RESID_VAR_LAYER:
        return values[max(values)]
    low, high = min(values.values()), max(values.values())
    return high / low if low > 0 else math.inf


def _resid_var_growth(run: RunResult) -> float | None:
    """Residual variance after the last block over that after the first, at the last step that
    logged them: how much the residual stream's variance grows with depth."""
    rows = rows_with(run, RESID_VAR_LAYER)
    values = layer_values(rows[-1], RESID_VAR_LAYER) if rows else {}
    if len(values) < 2:
        return None
    first = values[min(values)]
    return values[max(values)] / first if first > 0 else math.inf


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return float(statistics.median(present)) if present else None


def _max_abs(run: RunResult) -> float | None:
    """The largest |h| the run ever logged (stability/max_abs, else the per-layer maxima)."""
    steps, values = max_abs_series(run)
    finite = [v for v in values if math.isfinite(v)]
    return max(finite) if finite else None


def _key_label(key: str) -> str:
    return {"model.ln_placement": "placement", "optim.lr": "lr"}.get(key, key)


def _fmt_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return "?" if value is None else str(value)


def markdown_table(groups: Sequence[dict[str, Any]]) -> str:
    keys = list(groups[0]["keys"]) if groups else list(GROUP_KEYS)
    sets = list(groups[0]["eval_sets"]) if groups else []
    header = [_key_label(k) for k in keys] + [
        "runs",
        "diverged",
        "final train loss",
        "final eval loss",
        *[f"final eval loss ({name})" for name in sets],
        "grad-norm spikes",
        "loss spikes",
        "max abs(h)",
        "layer grad-norm max/min",
        "resid var after last block",
        "resid var last/first block",
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
            *[g["eval_sets"][name].text() for name in sets],
            g["grad_norm_spikes"].text(1),
            g["loss_spikes"].text(1),
            "–" if g["max_abs"] is None else f"{g['max_abs']:.3g}",
            "–" if g["grad_spread"] is None else f"{g['grad_spread']:.3g}",
            "–" if g["final_var"] is None else f"{g['final_var']:.3g}",
            "–" if g["var_growth"] is None else f"{g['var_growth']:.3g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(groups: Sequence[dict[str, Any]], path: Path) -> None:
    keys = list(groups[0]["keys"]) if groups else list(GROUP_KEYS)
    stats = ("train_loss", "eval_loss", "grad_norm_spikes", "loss_spikes")
    sets = list(groups[0]["eval_sets"]) if groups else []
    header = [_key_label(k) for k in keys] + ["runs", "diverged", "failed", "unfinished"]
    header += [f"{s}_{part}" for s in stats for part in ("mean", "std", "n")]
    header += [f"eval_loss_{name}_{part}" for name in sets for part in ("mean", "std", "n")]
    header += ["max_abs", "grad_spread_median", "final_resid_var_median", "resid_var_growth_median"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for g in groups:
            row = list(g["keys"].values()) + [g["runs"], g["diverged"], g["failed"]]
            row.append(g["unfinished"])
            for s in stats:
                row += [_csv(g[s].mean), _csv(g[s].std), g[s].n]
            for name in sets:
                stat = g["eval_sets"][name]
                row += [_csv(stat.mean), _csv(stat.std), stat.n]
            row += [_csv(g["max_abs"]), _csv(g["grad_spread"]), _csv(g["final_var"])]
            row.append(_csv(g["var_growth"]))
            writer.writerow(row)


def _csv(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def write_runs_csv(runs: Sequence[RunResult], path: Path) -> None:
    """One line per run: where every number in the table comes from."""
    header = ["run", "placement", "lr", "seed", "state", "diverged_at_step", "blew_up_at_step"]
    header.append("last_step")
    keys = ["train/loss", "eval/loss", "spikes/grad_norm", "spikes/loss", "guard/skipped_steps"]
    keys += [f"eval/{name}/loss" for name in eval_set_names(runs)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header + keys + ["seconds"])
        for r in runs:
            last = r.rows[-1]["step"] if r.rows else ""
            at = r.status.get("diverged_at_step")
            blew = blew_up_at(r)
            row = [r.name, r.placement, r.lr, r.seed, r.state, "" if at is None else at]
            row += ["" if blew is None else blew, last]
            row += [_csv(r.final(k)) for k in keys] + [r.status.get("seconds", "")]
            writer.writerow(row)


# ------------------------------------------------------------------------------------- report
def report(
    directory: str | Path,
    out: str | Path | None = None,
    *,
    lr: float | None = None,
    figures: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Reads the runs under `directory`, prints the tables, writes OUT/{summary.md, summary.csv,
    stability.csv, runs.csv, *.png} (OUT defaults to DIRECTORY/report); returns the table's
    groups."""
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
        from perijax.experiments import figures as figures_lib

        figures_lib.require_matplotlib()  # before anything is written
    out = Path(out) if out is not None else directory / "report"
    out.mkdir(parents=True, exist_ok=True)
    groups = summarize(runs)
    table = markdown_table(groups)
    stability = stability_table(runs)
    edge = stability_markdown(stability)
    notes = _run_notes(runs, directory)
    if figures:
        notes += figures_lib.make_figures(runs, out, lr)
    body = io.StringIO()
    body.write(f"# Report: {directory}\n\n{table}\n\n")
    body.write(
        "Losses: mean ± sample std over the seeds that finished without diverging (n of them); "
        "diverged runs are counted in `diverged`, not averaged. Spikes: the trainer's running "
        "counts at the last step, averaged over runs. Max abs(h): the largest |hidden state| any "
        "run logged. Layer grad-norm max/min (1 = uniform across layers; inf: a layer's gradient "
        "underflowed to 0), resid var after the last block and its ratio to that after the "
        "first block: at the last logged step, median over the finished runs.\n"
    )
    body.write(f"\n## Stability per learning rate\n\n{edge}\n\n")
    body.write(
        f"Unstable: diverged (a non-finite loss) or blew up (a train loss after step 0 above "
        f"{BLOWUP_FACTOR:g} x the loss at initialization: the step-0 eval loss, else ln(vocab)). "
        "Largest stable lr: the largest at which every finished run was stable; best lr: the "
        "lowest mean final loss among those, compared on the seeds every such lr has (chosen on "
        "seeds); interior: a tried lr lies on each side of it. Final loss and seed std at the "
        "best lr: mean and sample std over all its seeds.\n"
    )
    grid = lr_grid_markdown(runs)
    if grid:
        body.write(f"\n## Final {_loss_metric(runs)} per learning rate\n\n{grid}\n\n")
        body.write(
            "Mean over the finished runs at each rate (n: seeds when more than one); *: a run "
            "at that rate was unstable (its loss is still averaged when it finished).\n"
        )
    if notes:
        body.write("\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    (out / "summary.md").write_text(body.getvalue(), encoding="utf-8")
    write_csv(groups, out / "summary.csv")
    write_stability_csv(stability, out / "stability.csv")
    write_runs_csv(runs, out / "runs.csv")
    log(table)
    log("")
    log(edge)
    if grid:
        log("")
        log(grid)
    for note in notes:
        log(f"- {note}")
    written = "summary.md, summary.csv, stability.csv, runs.csv"
    log(f"written: {out}/{written}" + (", *.png" if figures else ""))
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
        elif (step := blew_up_at(r)) is not None:
            start = initial_loss(r)
            notes.append(
                f"blew up: {r.name} at step {step} (train loss above {BLOWUP_FACTOR:g} x "
                f"{start:.4f} at initialization)"
            )
    present = {r.name for r in runs}
    missing = [n for n in sweep_run_names(directory) if n not in present]
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
        return fail("report takes no --config.* overrides")
    if not Path(args.directory).is_dir():
        return fail(f"{args.directory} is not a directory")
    try:
        report(args.directory, args.out, lr=args.lr, figures=not args.no_figures)
    except (ValueError, OSError) as e:
        return fail(str(e))
    return 0
