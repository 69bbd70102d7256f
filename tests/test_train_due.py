"""The trainer's decision function (`train.Schedule`): which steps log, evaluate, save and stop,
and at which steps the processes' agreement collective runs."""

import dataclasses

import pytest

from perijax import distributed
from perijax import train as train_lib
from perijax.checkpoint import Checkpointer
from perijax.config import CheckpointConfig, TrainConfig

TRAIN = dataclasses.replace(TrainConfig(), total_steps=10, log_every_steps=3, eval_every_steps=4)


@pytest.fixture
def ckpt(tmp_path):
    checkpointer = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(every_steps=5))
    yield checkpointer
    checkpointer.close()


def run(schedule: train_lib.Schedule, stop_from: int | None = None) -> list[train_lib.Due]:
    """The decisions for updates 1..total, as the loop takes them (it ends at a stop)."""
    dues = []
    for step in range(1, schedule.total + 1):
        logs = schedule.logs(step)  # asked before the update runs: it picks the compiled step
        due = schedule.after(step, stop_requested=stop_from is not None and step >= stop_from)
        assert due.step == step and due.log == logs
        dues.append(due)
        if due.stop:
            break
    return dues


def steps(dues: list[train_lib.Due], field: str) -> list[int]:
    return [d.step for d in dues if getattr(d, field)]


def test_schedule_logs_evals_and_saves_at_the_configured_steps(ckpt):
    dues = run(train_lib.Schedule(TRAIN, ckpt, n_processes=1))
    assert steps(dues, "log") == [3, 6, 9, 10]
    assert steps(dues, "eval") == [4, 8, 10]
    assert steps(dues, "save") == [5, 10]
    assert steps(dues, "stop") == []
    # A log step's metrics are read one step late unless the loop evals, saves or ends there.
    assert steps(dues, "read_now") == [10]


def test_schedule_reads_log_metrics_at_once_where_the_loop_syncs(ckpt):
    train = dataclasses.replace(TRAIN, log_every_steps=2)
    dues = run(train_lib.Schedule(train, ckpt, n_processes=1))
    assert steps(dues, "log") == [2, 4, 6, 8, 10]
    assert steps(dues, "read_now") == [4, 8, 10]  # evals at 4, 8; 10 is the last


def test_schedule_stops_one_process_at_the_signal(ckpt):
    dues = run(train_lib.Schedule(TRAIN, ckpt, n_processes=1), stop_from=7)
    assert [d.step for d in dues] == list(range(1, 8))
    assert steps(dues, "stop") == [7]
    assert not dues[-1].save and not dues[-1].read_now  # the loop saves before it stops anyway


def test_schedule_agrees_at_sync_steps_and_acts_one_step_later(ckpt, monkeypatch):
    """Several processes gather their flags at the steps that log, evaluate or save by steps
    (the host syncs there anyway) and act on them one step later."""
    started = []

    def start(stop, save):
        started.append(len(started) + 1)
        return stop, save  # the handle `finish_agreement` returns as it is

    monkeypatch.setattr(distributed, "start_agreement", start)
    schedule = train_lib.Schedule(TRAIN, ckpt, n_processes=2)
    started_at = []
    for step in range(1, 11):
        before = len(started)
        schedule.after(step, stop_requested=False)
        if len(started) > before:
            started_at.append(step)
    assert started_at == [3, 4, 5, 6, 8, 9, 10]

    # A signal at step 7 (no sync there) is gathered at step 8 and stops both at step 9.
    schedule = train_lib.Schedule(TRAIN, ckpt, n_processes=2)
    dues = run(schedule, stop_from=7)
    assert steps(dues, "stop") == [9]
    assert dues[-1].read_now  # a log step that stops: its metrics are read before the save
