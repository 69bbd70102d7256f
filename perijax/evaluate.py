"""Evaluating a checkpoint: the loss and perplexity of a checkpoint on its run's data, or
lm-evaluation-harness tasks on it (docs/eval_export.md). `perijax eval` is its command line
(perijax.cli.eval).

    perijax eval runs/tiny                                   # every token of the val split
    perijax eval runs/tiny/checkpoints/500 --max-batches 8   # = the trainer's eval at step 500
    perijax eval runs/tiny --tasks hellaswag --limit 200     # lm-eval (perijax.lm_eval_adapter)

By default every token of the split is scored once, in a fixed order: each dataset's split is
cut into the trainer's eval windows (``seq_len + 1`` tokens starting every ``seq_len``), the last
window shorter, in batches of the run's micro-batch. Positions past a short window and rows past
a short batch are masked, so batching never changes what is scored. ``max_batches`` instead takes
the first batches exactly as the trainer's eval builds them (`Datasets.eval_batches`), so with the
run's settings it reports the loss the trainer logged at that step.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from perijax.config import Config, ConfigError
from perijax.metrics import perplexity

__all__ = ["evaluate_checkpoint", "run_tasks"]

SPLITS = ("val", "train")
PROGRESS_SECONDS = 10.0  # a progress line at most this often on long evals


def _split_streams(data, split: str) -> list[tuple[str, Any]]:
    """[(member name, TokenStream)] of `split` for every dataset of `data`, in mixture order."""
    return data.streams(split)


def _windows(stream, seq_len: int) -> Iterator[np.ndarray]:
    """Consecutive windows of `stream` as the trainer's eval cuts them (stream[i*T : i*T + T + 1])
    followed by the shorter last window, so every token after the first is a target once."""
    n = len(stream)
    for start in range(0, n - 1, seq_len):
        yield stream.read(start, min(start + seq_len + 1, n))


def _padded_batches(
    rows: Iterator[np.ndarray], batch_size: int, rows_per_batch: int, seq_len: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Groups rows of at most seq_len + 1 tokens into (tokens [R, T + 1], mask [R, T]) with
    R = rows_per_batch >= batch_size; short rows, the rows past `batch_size` and the rows
    missing from the last batch are padding (id 0, mask False)."""

    def empty():
        return (
            np.zeros((rows_per_batch, seq_len + 1), np.int32),
            np.zeros((rows_per_batch, seq_len), bool),
        )

    tokens, mask = empty()
    filled = 0
    for row in rows:
        tokens[filled, : len(row)] = row
        mask[filled, : len(row) - 1] = True
        filled += 1
        if filled == batch_size:
            yield tokens, mask
            tokens, mask = empty()
            filled = 0
    if filled:
        yield tokens, mask


def _open_data(cfg: Config, data_path: str | None, log: Callable[[str], None]):
    """The run's data (prepared on first use, as the trainer does), or a prepared dataset."""
    from perijax.data import open_datasets
    from perijax.train import load_data

    if not data_path:
        return load_data(cfg, log)
    try:
        return open_datasets("prepared", path=data_path, vocab_size=cfg.model.vocab_size, log=log)
    except ValueError as e:
        raise ConfigError(f"--data {data_path}: {e}") from e


def evaluate_checkpoint(
    path: str | Path,
    *,
    split: str = "val",
    batch_size: int | None = None,
    seq_len: int | None = None,
    max_batches: int | None = None,
    data_path: str | None = None,
    data=None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Mean next-token loss of the checkpoint at `path` on a split of its run's data.

    Args:
      path: a checkpoint step folder, a checkpoints folder or a workdir (its latest checkpoint).
      split: "val" (held out) or "train".
      batch_size: windows per batch (default: the run's micro-batch, global_batch_size /
        grad_accum_steps, as the trainer's eval uses). Rows are padded up to a multiple of the
        mesh's batch shards; padding is masked.
      seq_len: tokens per window (default: the run's data.seq_len).
      max_batches: None scores every token of the split; N scores the first N batches of the
        trainer's eval order (with N = train.eval_batches and the run's batch settings: exactly
        the trainer's eval at that step). For the train split, the first N batches of
        consecutive windows.
      data_path: a prepared dataset folder (or mixture "A=0.7,B=0.3") instead of the run's data.
      data: an already opened `perijax.data.Datasets` (overrides data_path).
      log: receives one-line progress messages.

    Returns:
      {"loss": nats per token, "perplexity", "bits_per_token", "tokens": targets scored,
       "batches", "split", "seq_len", "batch_size", "data", "step", "checkpoint"}.

    Raises:
      ConfigError: no checkpoint there, a bad split or size, data that does not fit the model.
    """
    # JAX is imported on use, so that `perijax --help` and the other subcommands stay quick.
    import jax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from perijax import sharding as sharding_lib
    from perijax.step import eval_sums
    from perijax.trained import load_model
    from perijax.tuning import compiler_options

    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")
    for name, value in (
        ("batch_size", batch_size),
        ("seq_len", seq_len),
        ("max_batches", max_batches),
    ):
        if value is not None and value < 1:
            raise ConfigError(f"{name}={value} must be >= 1")
    if jax.process_index() != 0:
        log = lambda _: None  # noqa: E731

    loaded = load_model(path)
    cfg, mesh = loaded.cfg, loaded.mesh
    seq_len = seq_len or cfg.data.seq_len
    batch_size = batch_size or cfg.train.global_batch_size // cfg.train.grad_accum_steps
    if data is None:
        data = _open_data(cfg, data_path, log)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"data '{data.name}' has {data.vocab_size} token ids but the model has "
            f"vocab_size={cfg.model.vocab_size}"
        )
    from perijax.train import document_eod

    eod_id = document_eod(cfg, data)
    if seq_len > cfg.data.seq_len:
        log(
            f"note: seq_len={seq_len} is longer than the run's data.seq_len={cfg.data.seq_len}; "
            "the model never saw positions past that"
        )
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows_per_batch = -(-batch_size // shards) * shards

    # --- batches: the trainer's own eval batches, or every window of the split.
    rows, num_batches = _rows(data, split, seq_len, batch_size, max_batches)
    batches = _padded_batches(rows, batch_size, rows_per_batch, seq_len)

    # --- compile once: batches sharded over the mesh's batch axes like training.
    graphdef, params = nnx.split(loaded.model)
    batch_sharding = sharding_lib.batch_sharding(mesh, 2)
    eval_fn = jax.jit(
        functools.partial(eval_sums, graphdef, eod_id=eod_id),
        in_shardings=(None, batch_sharding, batch_sharding),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
        compiler_options=compiler_options(),
    )
    log(
        f"eval: step {loaded.step} of {loaded.path} on {data.name} ({split}): {num_batches:,} "
        f"batches of {batch_size} x {seq_len} tokens on {sharding_lib.describe(mesh)}"
    )

    # --- loop: the host reads batch i's sums after dispatching batch i + 1.
    t0 = time.perf_counter()
    loss_sum, tokens, done = _sum_batches(
        lambda batch, mask: eval_fn(
            params,
            sharding_lib.replicated_batch(batch, batch_sharding),
            sharding_lib.replicated_batch(mask, batch_sharding),
        ),
        batches,
        num_batches,
        mesh,
        log,
    )
    loss = loss_sum / tokens
    log(f"eval: {int(tokens):,} tokens in {time.perf_counter() - t0:.1f}s")
    return {
        "loss": loss,
        "perplexity": perplexity(loss),
        "bits_per_token": loss / math.log(2),
        "tokens": int(tokens),
        "batches": done,
        "split": split,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "data": data.name,
        "step": loaded.step,
        "checkpoint": str(loaded.path),
    }


def _rows(
    data, split: str, seq_len: int, batch_size: int, max_batches: int | None
) -> tuple[Iterator[np.ndarray], int]:
    """(rows to score, number of batches): the trainer's own eval batches (val split with
    `max_batches`), else every window of the split, the first `max_batches` batches of them."""
    if split == "val" and max_batches is not None:
        try:
            fixed = data.eval_batches(
                seq_len=seq_len, batch_size=batch_size, num_batches=max_batches
            )
        except ValueError as e:
            raise ConfigError(f"data '{data.name}': {e}") from e
        return (row for batch in fixed for row in np.asarray(batch)), len(fixed)
    streams = _split_streams(data, split)
    windows = sum(max(0, -(-(len(s) - 1) // seq_len)) for _, s in streams)
    if windows == 0:
        raise ConfigError(f"the {split} split of data '{data.name}' has fewer than 2 tokens")
    num_batches = -(-windows // batch_size)
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    return (w for _, s in streams for w in _windows(s, seq_len)), num_batches


def _sum_batches(
    score: Callable, batches: Iterator, num_batches: int, mesh, log: Callable[[str], None]
) -> tuple[float, float, int]:
    """(summed loss, scored tokens, batches) of the first `num_batches` (tokens, mask) batches;
    batch i's sums are read after batch i + 1 is dispatched, with a progress line at most every
    PROGRESS_SECONDS."""
    import jax

    loss_sum, tokens, done = 0.0, 0.0, 0
    t0 = last_report = time.perf_counter()
    pending = None

    def collect(out) -> None:
        nonlocal loss_sum, tokens, done, last_report
        out = jax.device_get(out)
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
        done += 1
        now = time.perf_counter()
        if now - last_report >= PROGRESS_SECONDS and done < num_batches:
            log(
                f"eval: {done:,}/{num_batches:,} batches, {int(tokens):,} tokens, "
                f"loss {loss_sum / tokens:.4f}, {now - t0:.0f}s"
            )
            last_report = now

    with jax.set_mesh(mesh):
        for i, (batch, mask) in enumerate(batches):
            if i == num_batches:
                break
            out = score(batch, mask)
            if pending is not None:
                collect(pending)
            pending = out
        if pending is not None:
            collect(pending)
    return loss_sum, tokens, done


# ------------------------------------------------------------------------- lm-evaluation-harness
def _import_lm_eval():
    try:
        import lm_eval
    except ImportError as e:
        raise ConfigError(
            "--tasks needs lm-evaluation-harness: pip install lm_eval (or perijax[eval])"
        ) from e
    return lm_eval


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """lm-eval's task index (built-in tasks plus `include_path`); indexing takes seconds, so it
    is kept for the process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def run_tasks(
    checkpoint: str | Path,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int | None = None,
    tokenizer: str | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Runs lm-evaluation-harness `tasks` (names, globs or task YAML files) on a checkpoint
    through `perijax.lm_eval_adapter.PerijaxLM`; returns `lm_eval.simple_evaluate`'s results.

    Raises:
      ConfigError: lm_eval is not installed, an include path is missing, a task is unknown.
    """
    lm_eval = _import_lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--include-path {include_path}: no such folder")
    manager = _task_manager(str(Path(include_path).resolve()) if include_path else None)
    for task in tasks:
        if not (task.endswith((".yaml", ".yml")) and Path(task).is_file()):
            if not manager.match_tasks([task]):
                raise ConfigError(
                    f"unknown lm-eval task {task!r} (list them with `lm-eval ls tasks`"
                    + (f" --include_path {include_path})" if include_path else ")")
                )
    from perijax.lm_eval_adapter import PerijaxLM

    lm = PerijaxLM(
        checkpoint=str(checkpoint),
        batch_size=batch_size,
        tokenizer=tokenizer,
        max_length=max_length,
    )
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
    )


# ------------------------------------------------------------------------------------- command
