"""Metric writers: `WORKDIR/metrics.jsonl` (one JSON object per logged step), TensorBoard event
files and, optionally, Weights & Biases, plus the one-line console progress. What the metrics
mean is perijax.telemetry's."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from perijax import storage
from perijax.config import ConfigError

WANDB_RUN_ID_FILE = "wandb_run_id"  # in the workdir: a resumed run continues the same W&B run
SEGMENTS = "metrics.d"  # a gs:// workdir's metrics: numbered segments, appended to by uploads


def _segment_numbers(folder: Any) -> list[int]:
    try:
        return sorted(int(p.name.split(".")[0]) for p in folder.iterdir()
                      if p.name.endswith(".jsonl") and p.name.split(".")[0].isdigit())  # fmt: skip
    except NotADirectoryError:
        return []
    except OSError as e:  # no folder (locally), no prefix (object storage)
        if storage.is_missing(e):
            return []
        raise


def metric_lines(workdir: Any) -> list[str]:
    """The lines of a run's metrics in the order they were written: WORKDIR/metrics.jsonl, then
    the segments of `metrics.d/` (a `gs://` workdir's uploads), local or a URL."""
    workdir = storage.as_path(workdir)
    lines: list[str] = []
    try:
        lines += (workdir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError as e:
        if not storage.is_missing(e):
            raise
    for n in _segment_numbers(workdir / SEGMENTS):
        lines += (workdir / SEGMENTS / f"{n:09d}.jsonl").read_text(encoding="utf-8").splitlines()
    return lines


def check_trackers(t_cfg: Any) -> None:
    """Fails (MissingExtra, one line) if `train.wandb_project` is set and wandb is missing; called
    before the trainer writes anything."""
    if t_cfg.wandb_project:
        _import_wandb()


def _import_wandb():
    from perijax.packages import require

    return require("wandb", feature="train.wandb_project", extra="wandb")


class WandbWriter:
    """Weights & Biases logging of a run: the resolved config, the same scalars as metrics.jsonl
    at the same steps, tags `ln_placement=...`, `lr=...`, `seed=...` and a group (train.wandb_group,
    else the workdir's parent folder, so the runs of one sweep land in one group). The run id is
    kept in WORKDIR/wandb_run_id, so rerunning the command (resume) continues the same W&B run;
    W&B's own files go to WORKDIR/wandb for a local workdir (W&B's default folder for a `gs://`
    one). WANDB_MODE=offline works with no network."""

    def __init__(self, workdir, config: dict[str, Any]):
        wandb = _import_wandb()
        t = config["train"]
        workdir = storage.as_path(workdir)
        workdir = workdir if storage.is_url(workdir) else workdir.resolve()
        id_file = workdir / WANDB_RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.exists() else None  # None: a new one
        tags = [
            f"ln_placement={config['model']['ln_placement']}",
            f"lr={config['optim']['lr']:g}",
            f"seed={t['seed']}",
        ]
        try:
            self._run = wandb.init(
                project=t["wandb_project"],
                entity=t["wandb_entity"] or None,
                group=t["wandb_group"] or workdir.parent.name,
                name=workdir.name,
                tags=tags,
                config=config,
                id=run_id,
                resume="allow",
                dir=None if storage.is_url(workdir) else str(workdir),
                job_type="train",
            )
        except Exception as e:  # no login, no network, a bad entity: wandb's own message
            first = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
            raise ConfigError(
                f"W&B (train.wandb_project={t['wandb_project']}): {first}; run `wandb login`, "
                "set WANDB_MODE=offline, or leave train.wandb_project empty"
            ) from e
        id_file.write_text(self._run.id + "\n")

    def write(self, step: int, row: dict[str, float]) -> None:
        # W&B keeps one row per step, so a train and an eval write at one step merge, as
        # `perijax report` merges metrics.jsonl's rows.
        self._run.log(row, step=step)

    def close(self) -> None:
        self._run.finish()


class MetricWriter:
    """Appends metrics to metrics.jsonl and TensorBoard, and to Weights & Biases when `config`
    (the resolved config, as written to config.json) sets train.wandb_project. Only the writing
    process creates files (process 0 in a multi-host run).

    A local metrics.jsonl gets each row as it is written. Object storage (a `gs://` workdir)
    cannot append, so there each upload writes only the rows since the previous one, as the
    next numbered segment `metrics.d/000000001.jsonl`, ...: at most every `upload_secs`, at
    every `flush()` (the trainer flushes with each checkpoint, so a killed run loses no row up
    to its last checkpoint) and at `close()`. An upload's cost is that of its own rows, however
    long the run. `metric_lines` reads metrics.jsonl and then every segment, in order. The
    TensorBoard scalars of each upload go to a new event file beside them, likewise.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool = True,
        config: dict[str, Any] | None = None,
        upload_secs: float = 30.0,
    ):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._wandb = None
        self._remote = None  # the segments folder of a gs:// workdir
        self._workdir = workdir
        self._pending: list[str] = []  # rows not yet uploaded
        self._tb_pending: list[tuple[int, dict[str, float]]] | None = None  # the same, for TB
        self._segment = 0  # the last segment number written
        self._upload_secs, self._last_upload = upload_secs, time.monotonic()
        if not enabled:
            return
        if config and config["train"].get("wandb_project"):
            self._wandb = WandbWriter(workdir, config)  # first: it may refuse
        path = storage.as_path(workdir) / "metrics.jsonl"
        if storage.is_url(path):
            self._remote = storage.as_path(workdir) / SEGMENTS
            self._segment = max(_segment_numbers(self._remote), default=0)
        else:
            self._jsonl = open(path, "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter

            # A diverged run logs NaN on purpose (metrics.jsonl keeps it as "nan");
            # tensorboardX would warn once per scalar per step.
            logging.getLogger("tensorboardX.x2num").setLevel(logging.ERROR)
            if self._remote is None:
                self._tb = SummaryWriter(str(workdir), flush_secs=10)
            else:  # one new event file per upload (tensorboardX would re-upload one whole)
                self._tb_pending = []
        except ImportError:  # TensorBoard output is optional; metrics.jsonl is not
            self._tb = None

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        values = {key: float(value) for key, value in metrics.items()}
        for key, value in values.items():
            row[key] = value if math.isfinite(value) else str(value)
            if self._tb is not None:
                self._tb.add_scalar(key, value, int(step))
        if self._tb_pending is not None:
            self._tb_pending.append((int(step), values))
        if self._wandb is not None:
            self._wandb.write(int(step), values)
        line = json.dumps(row) + "\n"
        if self._remote is None:
            self._jsonl.write(line)
            self._jsonl.flush()
            return
        self._pending.append(line)
        if time.monotonic() - self._last_upload >= self._upload_secs:
            self.flush()

    def flush(self) -> None:
        """Makes every row written so far durable: a new segment with the rows since the last
        one (a no-op for a local file, written as it goes)."""
        if self._remote is not None and self._pending:
            self._segment += 1
            target = self._remote / f"{self._segment:09d}.jsonl"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(self._pending))
            self._pending, self._last_upload = [], time.monotonic()
            if self._tb_pending:
                self._upload_tensorboard()
        if self._tb is not None:
            self._tb.flush()

    def _upload_tensorboard(self) -> None:
        """The scalars since the last upload as a new TensorBoard event file in the workdir
        (TensorBoard reads every event file of a run folder, in name order: time, host and
        segment number)."""
        from tensorboardX import SummaryWriter

        with tempfile.TemporaryDirectory() as tmp:
            tb = SummaryWriter(tmp, filename_suffix=f".{self._segment:09d}")
            for step, values in self._tb_pending:
                for key, value in values.items():
                    tb.add_scalar(key, value, step)
            tb.close()
            for f in Path(tmp).iterdir():
                (storage.as_path(self._workdir) / f.name).write_bytes(f.read_bytes())
        self._tb_pending = []

    def close(self) -> None:
        if not self.enabled:
            return
        self.flush()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None


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


PERPLEXITY_MAX_LOSS = 80.0


def perplexity(loss: float) -> float:
    """exp(loss), the loss clamped at PERPLEXITY_MAX_LOSS = 80 first (the trainer's eval and
    `perijax eval` both report it). A diverged loss then still gives a finite number, exp(80) ~
    5.5e34, below float32's overflow at exp(88.7), so TensorBoard's float32 scalars plot it,
    rather than inf, which metrics.jsonl would record as the string "inf". Real losses stay far
    below 80 (uniform guessing over a 10^6-token vocabulary is ln(10^6) ~ 13.8), so the clamp
    changes nothing else; a NaN loss stays NaN."""
    return float(np.exp(min(loss, PERPLEXITY_MAX_LOSS)))


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
