"""The decay-branch table of docs/results.md from a finished `ln_placement_wsd.py` sweep: per
placement, the eval loss of the stable (undecayed) run and of its decay branch at the step the
branch ends, mean and sample std over seeds, and each placement's gap to Peri-LN.

    perijax sweep --sweep configs/sweeps/ln_placement_wsd.py --root runs/ln-wsd
    python scripts/wsd_table.py runs/ln-wsd
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from perijax.experiments.runlog import find_runs

PLACEMENTS = ("pre", "post", "peri")
BRANCHES = ((120, 150), (180, 225))  # (branched at, ends at): ln_placement_wsd.py's


def _fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    root = parser.parse_args().root
    by_seed = {"stable": {}, "branch": {}}  # (placement, end) -> {seed: eval loss}
    for run in find_runs(root):
        evals = {r["step"]: float(r["eval/loss"]) for r in run.rows if "eval/loss" in r}
        if not run.config.get("checkpoint.branch_from"):
            for _, end in BRANCHES:
                by_seed["stable"].setdefault((run.placement, end), {})[run.seed] = evals[end]
        else:
            end = int(run.config["train.total_steps"])
            by_seed["branch"].setdefault((run.placement, end), {})[run.seed] = evals[end]
    # Lists over seeds in seed order, so a branch lines up with its own stable run.
    stable, branch = (
        {key: [losses[seed] for seed in sorted(losses)] for key, losses in table.items()}
        for table in (by_seed["stable"], by_seed["branch"])
    )
    if not stable or not branch:
        print(f"no finished ln_placement_wsd runs in {root}", file=sys.stderr)
        return 2
    head = ["placement", "seeds"]
    for start, end in BRANCHES:
        head += [f"stable @{end}", f"branch {start}→{end}", f"branch − stable @{end}"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for p in PLACEMENTS:
        cells = [p, str(len(stable[(p, BRANCHES[0][1])]))]
        for _, end in BRANCHES:
            s, b = stable[(p, end)], branch[(p, end)]
            cells += [_fmt(s), _fmt(b), _fmt([x - y for x, y in zip(b, s, strict=True)])]
        print("| " + " | ".join(cells) + " |")
    print()
    print("| gap to Peri-LN (mean over seeds) | " + " | ".join(
        f"stable @{end} | branch @{end}" for _, end in BRANCHES) + " |")  # fmt: skip
    print("|" + "---|" * (1 + 2 * len(BRANCHES)))
    for p in ("pre", "post"):
        cells = [f"{p} − peri"]
        for _, end in BRANCHES:
            for table in (stable, branch):
                gap = statistics.mean(table[(p, end)]) - statistics.mean(table[("peri", end)])
                cells.append(f"{gap:+.4f}")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
