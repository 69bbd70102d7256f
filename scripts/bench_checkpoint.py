"""Step-time cost of asynchronous checkpointing: trains a config twice, without periodic saves
and with a save every N steps, alternating short runs so machine noise hits both equally, and
reports the mean step time of each (compile and the final save excluded).

    python scripts/bench_checkpoint.py --config configs/small.py --every 10 --steps 40
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from perijax import config as config_lib
from perijax import train as train_lib


def step_times(config: str, every: int, steps: int, workdir: Path) -> list[float]:
    overrides = [
        ("train.total_steps", str(steps)), ("train.log_every_steps", "1"),
        ("train.eval_every_steps", "0"), ("train.eval_batches", "1"),
        ("checkpoint.every_steps", str(every)), ("checkpoint.keep", "2"),
    ]  # fmt: skip
    cfg = config_lib.load(config, overrides)
    train_lib.train(cfg, workdir, log=lambda s: None)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    # Step 1 includes compilation and has no timing; the last step pays the final save.
    return [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r][:-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/small.py")
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    times = {"no periodic saves": [], f"save every {args.every} steps": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for i, (name, every) in enumerate(zip(times, (0, args.every), strict=True)):
                workdir = Path(tmp) / f"{r}-{i}"
                times[name] += step_times(args.config, every, args.steps, workdir)
    base = statistics.mean(times["no periodic saves"])
    for name, values in times.items():
        mean = statistics.mean(values)
        print(f"{name:>24}: mean step {mean:.3f}s over {len(values)} steps "
              f"({(mean / base - 1) * 100:+.1f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
