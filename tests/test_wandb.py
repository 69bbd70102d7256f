"""Weights & Biases logging, offline (WANDB_MODE=offline: no network, no account): what the
offline run files hold is read back with wandb's own record schema and compared with the run's
metrics.jsonl and config.json; a resumed run continues the same W&B run id."""

import json
import math
import struct
import zlib
from pathlib import Path

import pytest

from perijax import cli
from perijax.config import Config, ConfigError, to_dict
from perijax.experiments.runlog import read_metrics
from perijax.metrics import WANDB_RUN_ID_FILE, MetricWriter

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The .wandb file: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log records
# in 32 KiB blocks, each with a 7-byte header (crc32 seeded by the record type, length, type:
# 1 full, 2 first, 3 middle, 4 last); each full record is one serialized wandb `Record`.
BLOCK, HEADER = 32768, 7


def read_records(path: Path) -> list:
    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:HEADER]) == (b":W&B", 0xBEE1, 0), "not a .wandb file"
    records, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0:  # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, "corrupt record"
        pos += HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def offline_run(path: Path) -> dict:
    """run id, group, tags, config {key: value} and history {step: {key: value}} of one file."""
    out = {"history": {}, "config": {}}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(id=record.run.run_id, group=record.run.run_group, tags=record.run.tags)
            items = record.run.config.update
        elif kind == "config":
            items = record.config.update
        elif kind == "history":
            # A key with "/" is stored split into `nested_key`.
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                   for i in record.history.item}  # fmt: skip
            out["history"].setdefault(record.history.step.num, {}).update(row)
            continue
        else:
            continue
        for item in items:
            if not item.key.startswith("_"):  # "_wandb": wandb's own bookkeeping
                out["config"][item.key] = json.loads(item.value_json)
    return out


def same(a, b) -> bool:
    a, b = float(a), float(b)
    return (math.isnan(a) and math.isnan(b)) or a == b


def train(workdir: Path, total_steps: int) -> None:
    overrides = {
        "data.source": "synthetic", "model.vocab_size": "64", "data.seq_len": "16",
        "model.num_layers": "1", "model.d_model": "32", "model.d_ff": "64",
        "train.global_batch_size": "8", "train.total_steps": str(total_steps),
        "train.log_every_steps": "2", "train.eval_every_steps": "3", "train.eval_batches": "1",
        "optim.warmup_steps": "2", "checkpoint.every_steps": "4",
        "train.wandb_project": "perijax-test",
    }  # fmt: skip
    argv = ["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir)]
    assert cli.main(argv + [f"--config.{k}={v}" for k, v in overrides.items()]) == 0


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    for name in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_RUN_GROUP", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    # wandb reads the environment once per process, into a singleton that teardown drops: each
    # test starts from its own environment.
    wandb.teardown()
    yield
    wandb.teardown()


def test_offline_run_holds_metrics_and_config_and_resume_keeps_the_run_id(tmp_path, offline):
    workdir = tmp_path / "sweep" / "ln_placement=peri"
    train(workdir, total_steps=4)
    first_config = json.loads((workdir / "config.json").read_text())
    train(workdir, total_steps=8)  # resumes from checkpoint 4 and continues to step 8
    # config.json stays the first launch's; the resumed launch's config is the history's last.
    history = (workdir / "config_history.jsonl").read_text().splitlines()
    config = json.loads(history[-1])["config"]
    assert config["train"]["total_steps"] == 8 and first_config["train"]["total_steps"] == 4

    files = sorted(workdir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one per invocation
    runs = [offline_run(f) for f in files]
    run_id = (workdir / WANDB_RUN_ID_FILE).read_text().strip()
    assert [r["id"] for r in runs] == [run_id, run_id]
    assert runs[0]["config"] == first_config and runs[1]["config"] == config
    assert runs[0]["group"] == "sweep"  # the workdir's parent: a sweep's runs share a group
    lr = config["optim"]["lr"]
    assert sorted(runs[1]["tags"]) == ["ln_placement=peri", f"lr={lr:g}", "seed=0"]
    # The resumed invocation appends: its steps come after the first one's.
    assert max(runs[0]["history"]) == 4 and min(runs[1]["history"]) > 4

    # Every scalar of metrics.jsonl, at its step, and nothing else.
    expected = {row.pop("step"): row for row in read_metrics(workdir / "metrics.jsonl")}
    logged = {**runs[0]["history"], **runs[1]["history"]}
    assert sorted(logged) == sorted(expected) == [0, 2, 3, 4, 6, 8]
    for step, row in expected.items():
        got = {k: v for k, v in logged[step].items() if not k.startswith("_")}
        assert sorted(got) == sorted(row), step
        assert all(same(got[k], row[k]) for k in row), (step, got, row)
    assert {"train/loss", "eval/loss", "stability/max_abs"} <= set(expected[4])


def test_without_a_project_nothing_goes_to_wandb(tmp_path, offline):
    writer = MetricWriter(tmp_path, config=to_dict(Config()))  # train.wandb_project = ""
    writer.write(1, {"train/loss": 2.0})
    writer.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "train/loss": 2.0}
    assert not (tmp_path / "wandb").exists() and not (tmp_path / WANDB_RUN_ID_FILE).exists()


def test_a_wandb_that_refuses_to_start_is_one_line_and_writes_nothing(
    tmp_path, offline, monkeypatch
):
    monkeypatch.setenv("WANDB_MODE", "not-a-mode")  # as a missing login would: init raises
    config = to_dict(Config())
    config["train"]["wandb_project"] = "p"
    with pytest.raises(ConfigError) as e:
        MetricWriter(tmp_path, config=config)
    assert "\n" not in str(e.value) and "wandb login" in str(e.value)
    assert list(tmp_path.iterdir()) == []
