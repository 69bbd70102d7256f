"""Step-time cost of the per-layer stability telemetry: trains a config with
`telemetry.enabled` true and false, logging every N steps, and compares the mean step time
(log steps included; compilation excluded).

    python scripts/bench_telemetry.py --config configs/small.py --log-every 10 --steps 31
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from perijax import config as config_lib
from perijax import train as train_lib


def mean_step_time(config: str, enabled: bool, log_every: int, steps: int, workdir: Path) -> float:
    overrides = [
        ("train.total_steps", str(steps)), ("train.log_every_steps", str(log_every)),
        ("train.eval_every_steps", "0"), ("train.eval_batches", "1"),
        ("checkpoint.every_steps", "0"), ("telemetry.enabled", str(enabled).lower()),
    ]  # fmt: skip
    train_lib.train(config_lib.load(config, overrides), workdir, log=lambda s: None)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    # Each logged window averages its steps. The first window pays the log-step variant's
    # compilation (telemetry on) and the last one the final checkpoint: both are left out.
    times = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r][1:-1]
    return statistics.mean(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/small.py")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--steps", type=int, default=31)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        off = mean_step_time(args.config, False, args.log_every, args.steps, Path(tmp) / "off")
        on = mean_step_time(args.config, True, args.log_every, args.steps, Path(tmp) / "on")
    print(f"telemetry off: mean step {off:.3f}s")
    print(f"telemetry on:  mean step {on:.3f}s ({(on / off - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
