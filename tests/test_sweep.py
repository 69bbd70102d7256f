"""`perijax sweep`: the grid expands in a stable order with readable names, bad values stop the
sweep before anything is written, emitted commands rebuild each run's config, and real tiny
sweeps record every run's outcome (done, diverged with its step, failed) and resume after an
interruption without redoing finished runs."""

import argparse
import json
import math
import os
import re
import shlex
import signal
from pathlib import Path

import pytest

from perijax import cli
from perijax import config as config_lib
from perijax import train as train_lib
from perijax.cli import common as commandline
from perijax.config import to_dict
from perijax.experiments import grid as sweep_grid
from perijax.experiments import sweep

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "sweeps" / "smoke.py")
SMOKE_NAMES = [
    "ln_placement=pre,lr=0.001,seed=0",
    "ln_placement=pre,lr=0.01,seed=0",
    "ln_placement=peri,lr=0.001,seed=0",
    "ln_placement=peri,lr=0.01,seed=0",
]


def sweep_cli(*argv: str, capsys=None) -> tuple[int, str, str]:
    """`perijax sweep ARGV` through the command's own parser and entry point."""
    parser = argparse.ArgumentParser(prog="perijax")
    sweep.add_parser(parser.add_subparsers(dest="command"))
    rest, overrides = commandline.split_overrides(list(argv))
    code = sweep.run(parser.parse_args(["sweep", *rest]), overrides)
    out, err = capsys.readouterr() if capsys else ("", "")
    return code, out, err


def write_sweep(path: Path, grid: dict, **overrides) -> str:
    """A sweep file over the smoke sweep's tiny synthetic base."""
    base = sweep_grid.load_sweep(SMOKE)
    fixed = {k: v for k, v in {**base.overrides, **overrides}.items() if k not in grid}
    path.write_text(
        f"def get_sweep():\n    return {{'base': {base.base!r}, 'overrides': {fixed!r}, "
        f"'grid': {grid!r}}}\n"
    )
    return str(path)


def rows_of(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").open()]


# ------------------------------------------------------------------------- grid, no training
def test_grid_expands_in_order_with_readable_stable_names():
    s = sweep_grid.load_sweep(SMOKE)
    runs = s.runs()
    assert [r.name for r in runs] == SMOKE_NAMES
    assert [r.index for r in runs] == [0, 1, 2, 3]
    assert runs[3].values == {"model.ln_placement": "peri", "optim.lr": 0.01, "train.seed": 0}
    # The grid's overrides come last, after the sweep's fixed ones.
    assert runs[3].overrides[-3:] == (
        ("model.ln_placement", "peri"),
        ("optim.lr", "0.01"),
        ("train.seed", "0"),
    )
    assert sweep_grid.run_name({"optim.lr": 1e-5, "data.cache_dir": "/a b"}) == (
        "lr=1e-05,cache_dir=_a_b"
    )
    # Keys that share a last part keep their section, so names stay distinct.
    assert sweep_grid.run_name({"a.x": 1, "b.x": 2}) == "a.x=1,b.x=2"


@pytest.mark.parametrize(
    "name",
    sorted(p.name for p in (ROOT / "configs" / "sweeps").glob("*.py") if p.stem != "__init__"),
)
def test_every_shipped_sweep_builds_valid_configs(name):
    s = sweep_grid.load_sweep(str(ROOT / "configs" / "sweeps" / name))
    runs = s.runs()
    configs = sweep_grid.build_configs(s, runs)
    assert len(configs) == len(runs) == sum(math.prod(map(len, g.values())) for g in s.grids)
    placements = {c.model.ln_placement for c in configs.values()}
    assert placements <= {"pre", "post", "peri", "output"} and len(placements) >= 2


def test_the_reproduction_sweep_is_the_documented_grid():
    s = sweep_grid.load_sweep(str(ROOT / "configs" / "sweeps" / "ln_placement_small.py"))
    assert s.grid == {
        "model.ln_placement": ["pre", "post", "peri", "output"],
        "optim.lr": [3e-3, 1e-2, 3e-2, 1e-1],
        "train.seed": [0, 1, 2],
    }
    cfg = sweep_grid.build_configs(s, s.runs()[:1])[s.runs()[0].name]
    assert (cfg.model.num_layers, cfg.model.d_model, cfg.data.source) == (12, 128, "stdlib")


def test_nested_grid_and_configdict_sweeps_are_accepted(tmp_path):
    file = tmp_path / "nested.py"
    file.write_text(
        "import ml_collections\n"
        "def get_sweep():\n"
        "    s = ml_collections.ConfigDict()\n"
        "    s.base = 'configs/tiny.py'\n"
        "    s.grid = {'optim': {'lr': [0.1, 0.2]}, 'train': {'seed': [0, 1]}}\n"
        "    return s\n"
    )
    s = sweep_grid.load_sweep(str(file))
    assert s.name == "nested"
    assert [r.name for r in s.runs()] == [
        "lr=0.1,seed=0",
        "lr=0.1,seed=1",
        "lr=0.2,seed=0",
        "lr=0.2,seed=1",
    ]


@pytest.mark.parametrize(
    "grid, message",
    [
        (
            {"model.ln_placement": ["pre", "sandwich"]},
            "run ln_placement=sandwich: model.ln_placement='sandwich' is not valid",
        ),
        ({"optim.learning_rate": [0.1]}, "unknown config key 'optim.learning_rate'"),
        ({"model.num_heads": [4, 3]}, "run num_heads=3: model.num_heads=3 must divide"),
        ({"optim.lr": [0.1, 0.1]}, "sweep grid 'optim.lr' repeats 0.1"),
        ({"optim.lr": []}, "sweep grid 'optim.lr' must be a non-empty list"),
    ],
)
def test_bad_grid_value_is_one_line_error_before_anything_is_written(
    tmp_path, capsys, grid, message
):
    file = write_sweep(tmp_path / "bad.py", grid)
    root = tmp_path / "root"
    for mode in ([], ["--emit", "commands"], ["--dry-run"]):
        code, out, err = sweep_cli("--sweep", file, "--root", str(root), *mode, capsys=capsys)
        assert code == 2
        assert out == ""
        assert err.count("\n") == 1 and err.startswith("perijax: error: ")
        assert message in err
        assert not root.exists()


def test_command_line_override_of_a_swept_key_is_refused(tmp_path, capsys):
    code, _, err = sweep_cli(
        "--sweep", SMOKE, "--root", str(tmp_path / "r"), "--config.optim.lr=0.5", capsys=capsys
    )
    assert code == 2 and "'optim.lr' is swept by the grid" in err


def test_emitted_commands_rebuild_each_runs_config(tmp_path, capsys):
    root = tmp_path / "runs"
    s = sweep_grid.load_sweep(SMOKE, [("train.total_steps", "7")])
    configs = sweep_grid.build_configs(s, s.runs())
    # A finished run is not emitted again.
    (root / SMOKE_NAMES[1]).mkdir(parents=True)
    (root / SMOKE_NAMES[1] / "status.json").write_text('{"state": "diverged"}')

    code, out, _ = sweep_cli(
        "--sweep",
        SMOKE,
        "--root",
        str(root),
        "--emit",
        "commands",
        "--config.train.total_steps=7",
        capsys=capsys,
    )
    assert code == 0
    lines = out.splitlines()
    assert lines == sweep.run_commands(s, root)
    emitted = {}
    for line in lines:
        argv = shlex.split(line)
        assert argv[:2] == ["perijax", "train"]
        rest, overrides = commandline.split_overrides(argv[2:])
        parser = argparse.ArgumentParser()
        parser.add_argument("--config")
        parser.add_argument("--workdir")
        args = parser.parse_args(rest)
        emitted[Path(args.workdir).name] = config_lib.load(args.config, overrides)
        assert Path(args.workdir).parent == root
    assert sorted(emitted) == sorted(n for n in SMOKE_NAMES if n != SMOKE_NAMES[1])
    for name, cfg in emitted.items():
        assert to_dict(cfg) == to_dict(configs[name])
    assert emitted[SMOKE_NAMES[2]].train.total_steps == 7
    assert emitted[SMOKE_NAMES[2]].model.ln_placement == "peri"


def test_outcome_classifies_runs_from_their_metrics():
    nan = float("nan")
    ok = [
        {"step": 0, "eval/loss": 4.0},
        {"step": 1, "train/loss": 3.5},
        {"step": 2, "eval/loss": 3.4},
    ]
    done = sweep.outcome(ok, seconds=1.23)
    assert done["state"] == "done" and done["diverged_at_step"] is None
    assert done["final"] == {"step": 2, "train/loss": 3.5, "eval/loss": 3.4}
    # Finished, but every late step was skipped by the guard: diverged, at the first nan.
    skipped = ok + [{"step": 3, "train/loss": nan}, {"step": 4, "train/loss": nan}]
    assert sweep.outcome(skipped)["state"] == "diverged"
    assert sweep.outcome(skipped)["diverged_at_step"] == 3
    # Stopped by the guard on finite (spiking) losses: the step comes from the message.
    stopped = sweep.outcome(ok, diverged_error="5 consecutive bad steps ... up to step 812; x")
    assert (stopped["state"], stopped["diverged_at_step"]) == ("diverged", 812)
    failed = sweep.outcome(ok, error="OSError: disk full")
    assert failed["state"] == "failed" and failed["error"] == "OSError: disk full"


def test_a_failing_run_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    """Any other exception is `failed` with its one-line error; the next run still runs, the exit
    status is 1, and a rerun retries only the failed run."""
    calls = []

    def fake_train(cfg, workdir, *, data=None, log=print, devices=None):
        calls.append(Path(workdir).name)
        if cfg.optim.lr == 0.001 and cfg.model.ln_placement == "pre" and len(calls) == 1:
            raise RuntimeError("out of memory\nsecond line")
        Path(workdir, "metrics.jsonl").write_text('{"step": 6, "train/loss": 1.5}\n')
        return {"train": {}, "eval": {}, "state": None, "preempted": False}

    monkeypatch.setattr(train_lib, "train", fake_train)
    lines = []
    root = tmp_path / "root"
    assert sweep.run_sweep(sweep_grid.load_sweep(SMOKE), root, out=lines.append) == 1
    first = json.loads((root / SMOKE_NAMES[0] / "status.json").read_text())
    assert first["state"] == "failed" and first["error"] == "RuntimeError: out of memory"
    assert "[1/4] ln_placement=pre,lr=0.001,seed=0  failed: RuntimeError: out of memory" in (
        "\n".join(lines)
    )
    assert calls == SMOKE_NAMES
    assert sweep.run_sweep(sweep_grid.load_sweep(SMOKE), root, out=lines.append) == 0
    assert calls == [*SMOKE_NAMES, SMOKE_NAMES[0]]


def test_runs_finished_from_emitted_commands_are_recognized(tmp_path, monkeypatch, capsys):
    """A run launched from an emitted command writes no status.json: one that reached
    train.total_steps counts as done (not emitted again, recorded by the next sweep, not
    retrained); one with a non-finite final loss as diverged; a partial one is resumed."""
    root = tmp_path / "root"
    s = sweep_grid.load_sweep(SMOKE)
    for name, rows in (
        (SMOKE_NAMES[0], [{"step": 6, "train/loss": 4.0}, {"step": 6, "eval/loss": 4.1}]),
        (SMOKE_NAMES[1], [{"step": 2, "train/loss": 4.0}, {"step": 3, "train/loss": "nan"}]),
        (SMOKE_NAMES[2], [{"step": 3, "train/loss": 4.0}]),
    ):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(
            json.dumps(to_dict(sweep_grid.build_configs(s, s.runs())[name]))
        )
        (root / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = sweep_cli(
        "--sweep", SMOKE, "--root", str(root), "--emit", "commands", capsys=capsys
    )
    assert [shlex.split(line)[5] for line in out.splitlines()] == [
        str(root / n) for n in SMOKE_NAMES[2:]
    ]
    code, out, _ = sweep_cli("--sweep", SMOKE, "--root", str(root), "--dry-run", capsys=capsys)
    assert [line.split()[0] for line in out.splitlines()] == [
        "done",
        "diverged",
        "started",
        "pending",
    ]

    trained = []

    def fake_train(cfg, workdir, *, data=None, log=print, devices=None):
        trained.append(Path(workdir).name)
        with open(Path(workdir, "metrics.jsonl"), "a") as f:
            f.write('{"step": 6, "train/loss": 1.5}\n')
        return {"train": {}, "eval": {}, "state": None, "preempted": False}

    monkeypatch.setattr(train_lib, "train", fake_train)
    assert sweep.run_sweep(s, root, out=lambda line: None) == 0
    assert trained == SMOKE_NAMES[2:]
    done = json.loads((root / SMOKE_NAMES[0] / "status.json").read_text())
    assert (done["state"], done["inferred"], done["final"]["eval/loss"]) == ("done", True, 4.1)
    diverged = json.loads((root / SMOKE_NAMES[1] / "status.json").read_text())
    assert (diverged["state"], diverged["diverged_at_step"]) == ("diverged", 3)


# -------------------------------------------------------------------------- real tiny training
def test_diverging_run_is_recorded_with_its_step(tmp_path, monkeypatch):
    """lr=1e6 without the guard: the step-2 update blows the weights up (parameter norm ~1e8),
    the loss turns nan within a step or two (which one depends on where float32 overflows first)
    and the trainer raises TrainingDiverged; the sweep records that step and exits 0."""
    file = write_sweep(
        tmp_path / "diverge.py", {"optim.lr": [1e6]}, **{"train.skip_bad_steps": False}
    )
    root = tmp_path / "root"
    lines = []
    assert sweep.run_sweep(sweep_grid.load_sweep(file), root, out=lines.append) == 0
    rows = [r for r in rows_of(root / "lr=1000000.0") if "train/loss" in r]
    first_nan = next(r["step"] for r in rows if r["train/loss"] == "nan")
    assert 3 <= first_nan <= 5
    assert all(r["train/loss"] != "nan" for r in rows if r["step"] < first_nan)
    status = json.loads((root / "lr=1000000.0" / "status.json").read_text())
    assert status["state"] == "diverged"
    assert status["diverged_at_step"] == first_nan
    assert status["message"] == f"loss is nan at step {first_nan}"
    assert status["final"]["train/loss"] == "nan"  # strict JSON: the metrics.jsonl convention
    assert f"[1/1] lr=1000000.0  diverged at step {first_nan}" in "\n".join(lines)
    assert rows[-1]["train/loss"] == "nan"
    # Rerun: the diverged run is skipped, its line read back from status.json; with nothing
    # to train no data is loaded.
    from perijax import train as train_lib

    loads = []
    monkeypatch.setattr(train_lib, "load_data", lambda *a, **k: loads.append(a))
    lines = []
    assert sweep.run_sweep(sweep_grid.load_sweep(file), root, out=lines.append) == 0
    assert f"[1/1] lr=1000000.0  skip: diverged at step {first_nan}  loss nan" in "\n".join(lines)
    assert loads == []


def test_a_sweep_branches_decays_from_its_own_stable_run(tmp_path):
    """Grids run in order: a wsd run, then decays branched from its checkpoint at step 2
    through "{root}" (the sweep root) in checkpoint.branch_from. Each branch starts where the
    stable run was at step 2, so its first loss equals the stable run's, and records where it
    branched."""
    base = sweep_grid.load_sweep(SMOKE)
    stable = "total_steps=8,decay_steps=2,branch_from="
    grids = [
        {"train.total_steps": [8], "optim.decay_steps": [2], "checkpoint.branch_from": [""]},
        {"train.total_steps": [4, 6], "optim.decay_steps": [2],
         "checkpoint.branch_from": [f"{{root}}/{stable}@2"]},
    ]  # fmt: skip
    fixed = {k: v for k, v in base.overrides.items() if k not in grids[0]}
    fixed.update({"optim.schedule": "wsd", "optim.warmup_steps": 1,
                  "checkpoint.every_steps": 2, "checkpoint.keep": 0})  # fmt: skip
    file = tmp_path / "branches.py"
    file.write_text(
        f"def get_sweep():\n    return {{'base': {base.base!r}, 'overrides': {fixed!r}, "
        f"'grid': {grids!r}}}\n"
    )
    s, root = sweep_grid.load_sweep(str(file)), tmp_path / "root"
    names = [r.name for r in s.runs()]
    assert names[0] == stable
    assert names[1] == f"total_steps=4,decay_steps=2,branch_from={stable}_2"
    assert sweep.run_sweep(s, root, out=lambda line: None) == 0
    source = {r["step"]: r["train/loss"] for r in rows_of(root / stable) if "train/loss" in r}
    for name in names[1:]:
        record = json.loads((root / name / "branch.json").read_text())
        assert record["checkpoint"] == f"{root.absolute()}/{stable}/checkpoints/2"
        losses = {r["step"]: r["train/loss"] for r in rows_of(root / name) if "train/loss" in r}
        assert min(losses) == 3 and losses[3] == source[3]
    emitted = sweep.run_commands(s, root, include_finished=True)
    assert f"--config.checkpoint.branch_from={root.absolute()}/{stable}@2" in emitted[1]


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    """The smoke sweep run in three invocations: the pre-LN runs alone (--only), then the whole
    sweep stopped by SIGINT in the middle of its first peri run, then the whole sweep again.
    Records which runs each invocation trained and what it printed."""
    root = tmp_path_factory.mktemp("smoke") / "runs"
    calls, printed = [], []
    real_train = train_lib.train
    stop_in = {"name": None}

    def counting_train(cfg, workdir, *, data=None, log=print, devices=None):
        calls[-1].append(Path(workdir).name)

        def log_and_maybe_stop(line: str) -> None:
            log(line)
            if Path(workdir).name == stop_in["name"] and line.startswith("step 2/"):
                os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: save, stop, return

        return real_train(cfg, workdir, data=data, log=log_and_maybe_stop, devices=devices)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_lib, "train", counting_train)
        codes, mtimes = [], []
        for only, stop in (("ln_placement=pre", None), (None, SMOKE_NAMES[2]), (None, None)):
            calls.append([])
            printed.append([])
            stop_in["name"] = stop
            s = sweep_grid.load_sweep(SMOKE)
            only = [only] if only else []
            codes.append(sweep.run_sweep(s, root, only=only, out=printed[-1].append))
            status = {n: root / n / "status.json" for n in SMOKE_NAMES}
            mtimes.append({n: p.stat().st_mtime_ns for n, p in status.items() if p.exists()})
    return {"root": root, "calls": calls, "printed": printed, "codes": codes, "mtimes": mtimes}


def test_smoke_sweep_records_every_run(smoke_root):
    root = smoke_root["root"]
    assert smoke_root["codes"] == [0, 0, 0]
    record = json.loads((root / "sweep.json").read_text())
    assert [r["name"] for r in record["runs"]] == SMOKE_NAMES
    assert record["base"] == "configs/tiny.py"
    for name in SMOKE_NAMES:
        status = json.loads((root / name / "status.json").read_text())
        assert status["state"] == "done", (name, status)
        assert status["diverged_at_step"] is None
        assert status["final"]["step"] == 6
        assert math.isfinite(status["final"]["train/loss"])
        assert math.isfinite(status["final"]["eval/loss"])
        assert status["seconds"] > 0
        config = json.loads((root / name / "config.json").read_text())
        placement, lr = name.split(",")[:2]
        assert config["model"]["ln_placement"] == placement.split("=")[1]
        assert config["optim"]["lr"] == float(lr.split("=")[1])


def test_interrupted_sweep_resumes_without_redoing_finished_runs(smoke_root):
    root, calls, printed = smoke_root["root"], smoke_root["calls"], smoke_root["printed"]
    first, second, third = smoke_root["mtimes"]
    assert calls[0] == SMOKE_NAMES[:2]  # --only
    assert calls[1] == [SMOKE_NAMES[2]]  # stopped by the signal: the sweep stops too
    assert calls[2] == SMOKE_NAMES[2:]  # the interrupted run and the one never started
    # Finished runs were never touched again.
    assert second == first
    assert {n: third[n] for n in first} == first
    assert "[1/4] ln_placement=pre,lr=0.001,seed=0  skip: done" in "\n".join(printed[1])
    assert "stopped by a signal" in "\n".join(printed[1])
    assert "[3/4] ln_placement=peri,lr=0.001,seed=0  start (resuming)" in printed[2]
    # The interrupted run continued from the checkpoint saved at the signal.
    log = (root / SMOKE_NAMES[2] / "train.log").read_text()
    assert "stopped by signal" in log
    # Step 2's line is logged once step 3 runs (metrics are read one step late): stop at 3.
    assert f"resumed from {root / SMOKE_NAMES[2] / 'checkpoints' / '3'}" in log
    steps = [r["step"] for r in rows_of(root / SMOKE_NAMES[2]) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    end = [line for line in printed[2] if line.startswith("[4/4]") and " done " in line]
    assert end and "eta 0s" in end[0]


def test_rerun_of_a_finished_sweep_runs_nothing(smoke_root, capsys, monkeypatch):
    monkeypatch.setattr(train_lib, "train", lambda *a, **k: pytest.fail("trained again"))
    root = str(smoke_root["root"])
    code, out, _ = sweep_cli("--sweep", SMOKE, "--root", root, capsys=capsys)
    assert code == 0 and "(4 done, 0 diverged, 0 to run)" in out
    code, out, _ = sweep_cli("--sweep", SMOKE, "--root", root, "--dry-run", capsys=capsys)
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["done"] * 4
    code, out, _ = sweep_cli("--sweep", SMOKE, "--root", root, "--emit", "commands", capsys=capsys)
    assert code == 0 and out == ""


def test_resuming_with_changed_settings_is_refused(smoke_root, capsys):
    code, _, err = sweep_cli(
        "--sweep",
        SMOKE,
        "--root",
        str(smoke_root["root"]),
        "--config.train.total_steps=7",
        capsys=capsys,
    )
    assert code == 2 and err.count("\n") == 1
    assert "was run with train.total_steps=6, this sweep sets 7" in err


def test_emit_slurm_and_tpu_wrap_one_train_command_per_run(tmp_path, capsys):

    base = ["sweep", "--sweep", "configs/sweeps/smoke.py", "--root", str(tmp_path / "sw")]
    assert cli.main([*base, "--emit", "commands"]) == 0
    commands = capsys.readouterr().out.strip().splitlines()
    assert len(commands) == 4

    assert cli.main([*base, "--emit", "slurm", "--nodes", "1", "--gpus-per-node", "4"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-3" in script and "#SBATCH --gpus-per-node=4" in script
    for command in commands:
        assert command.split("--workdir ")[1].split()[0] in script

    tpu = ["--emit", "tpu", "--tpu", "t1", "--zone", "us-east5-a", "--project", "p"]
    assert cli.main([*base, *tpu, "--accelerator-type", "v5p-8"]) == 0
    out = capsys.readouterr().out  # a shell script: one (multi-line) command per run
    assert out.count("gcloud compute tpus tpu-vm ssh t1") == 4 and out.count("--worker=all") == 4
    for command in commands:
        assert command.split("--workdir ")[1].split()[0] in out

    assert cli.main([*base, "--emit", "tpu", "--tpu", "t1", "--accelerator-type", "v5p-8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["perijax: error: TPU runs need a zone and a project"]


# ------------------------------------------------------------------ grid unions, refine stage
def _sweep_file(path: Path, body: str) -> str:
    path.write_text(f"def get_sweep():\n    return {body}\n")
    return str(path)


def test_a_list_of_grids_is_their_union_in_order(tmp_path):
    file = _sweep_file(
        tmp_path / "union.py",
        "{'base': 'configs/tiny.py', 'grid': ["
        "{'model.dtype': ['float32'], 'optim.lr': [0.1, 0.2]},"
        "{'model.dtype': ['float16'], 'optim.lr': [0.2]}]}",
    )
    s = sweep_grid.load_sweep(file)
    assert [(r.index, r.name) for r in s.runs()] == [
        (0, "dtype=float32,lr=0.1"),
        (1, "dtype=float32,lr=0.2"),
        (2, "dtype=float16,lr=0.2"),
    ]
    assert s.grid == {"model.dtype": ["float32", "float16"], "optim.lr": [0.1, 0.2]}
    configs = sweep_grid.build_configs(s, s.runs())
    assert configs["dtype=float16,lr=0.2"].model.dtype == "float16"


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "[{'optim.lr': [0.1]}, {'train.seed': [0]}]",
            "every grid must list the same keys in the same order (optim.lr), one has train.seed",
        ),
        ("[{'optim.lr': [0.1]}, {'optim.lr': [0.1]}]", "the grids give run lr=0.1 twice"),
        ("[]", "'grid' is empty"),
    ],
)
def test_bad_grid_lists_are_one_line_errors(tmp_path, body, message):
    file = _sweep_file(tmp_path / "bad.py", f"{{'base': 'configs/tiny.py', 'grid': {body}}}")
    with pytest.raises(sweep.ConfigError, match=re.escape(message)):
        sweep_grid.load_sweep(file)


@pytest.mark.parametrize(
    "refine, message",
    [
        ("{'best': 'optim.beta1', 'grid': {'train.seed': [1]}}", "best 'optim.beta1' is not"),
        ("{'best': 'optim.lr', 'grid': {'optim.lr': [1]}}", "other than 'optim.lr'"),
        ("{'best': 'optim.lr', 'grid': {}}", "'grid' is empty"),
        ("{'best': 'optim.lr', 'grid': {'train.seed': [1]}, 'metric': 'x'}", "train/ or eval/"),
        ("{'grid': {'train.seed': [1]}}", "must be a dict with 'best', 'grid'"),
    ],
)
def test_bad_refine_is_a_one_line_error(tmp_path, refine, message):
    file = _sweep_file(
        tmp_path / "bad.py",
        "{'base': 'configs/tiny.py', 'grid': {'optim.lr': [0.1], 'train.seed': [0]}, "
        f"'refine': {refine}}}",
    )
    with pytest.raises(sweep.ConfigError, match=re.escape(message)):
        sweep_grid.load_sweep(file)


def _finish(run_dir: Path, state: str, eval_loss: float) -> None:
    """A finished run's files; "blew up": done, but its train loss rose above 1.1 x the loss at
    initialization on the way."""
    run_dir.mkdir(parents=True)
    blew_up = state == "blew up"
    (run_dir / "status.json").write_text(json.dumps({"state": "done" if blew_up else state}))
    loss = "nan" if state == "diverged" else eval_loss
    rows = [{"step": 0, "eval/loss": 6.0}, {"step": 3, "train/loss": 7.0 if blew_up else 5.0}]
    rows.append({"step": 6, "eval/loss": loss})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_refine_adds_runs_at_each_settings_best_value(tmp_path):
    file = _sweep_file(
        tmp_path / "refine.py",
        "{'base': 'configs/tiny.py', 'grid': {'model.ln_placement': ['pre', 'peri', 'post'], "
        "'optim.lr': [0.001, 0.01, 0.1], 'train.seed': [0]}, "
        "'refine': {'best': 'optim.lr', 'grid': {'train.seed': [0, 1, 2]}}}",
    )
    s = sweep_grid.load_sweep(file)
    root = tmp_path / "root"
    losses = {  # placement -> lr -> (state, eval loss)
        # pre at 0.1 has the lowest loss but blew up on the way: unstable, never the best.
        "pre": {0.001: ("done", 5.0), 0.01: ("done", 4.0), 0.1: ("blew up", 3.5)},
        "peri": {0.001: ("done", 4.2), 0.01: ("diverged", 0.0), 0.1: ("done", 4.3)},
        "post": {0.001: ("diverged", 0), 0.01: ("diverged", 0), 0.1: ("diverged", 0)},
    }
    grid = s.runs()
    for run in grid[:-1]:
        state, loss = losses[run.values["model.ln_placement"]][run.values["optim.lr"]]
        _finish(root / run.name, state, loss)
    assert sweep.refine_runs(s, root) == (None, [])  # one grid run has not finished
    _finish(root / grid[-1].name, "diverged", 0)
    runs, notes = sweep.refine_runs(s, root)
    # Seed 0 at the best rate is a grid run already: only seeds 1 and 2 are added.
    assert [(r.index, r.name) for r in runs] == [
        (9, "ln_placement=pre,lr=0.01,seed=1"),
        (10, "ln_placement=pre,lr=0.01,seed=2"),
        (11, "ln_placement=peri,lr=0.001,seed=1"),
        (12, "ln_placement=peri,lr=0.001,seed=2"),
    ]
    assert notes == [
        "ln_placement=pre: best optim.lr=0.01 (eval/loss 4.0000)",
        "ln_placement=peri: best optim.lr=0.001 (eval/loss 4.2000)",
        "ln_placement=post: no run was stable, nothing to refine",
    ]
    assert dict(runs[0].overrides)["optim.lr"] == "0.01"
    assert dict(runs[0].overrides)["train.seed"] == "1"


def test_refine_skips_a_value_where_any_seed_was_unstable(tmp_path):
    """On a grid with several seeds a value counts only if every finished run at it was stable,
    as in `perijax report`'s stability table: lr 0.1 has the lowest loss on seed 0 but blew up
    on seed 1, so 0.01 is the best."""
    file = _sweep_file(
        tmp_path / "seeds.py",
        "{'base': 'configs/tiny.py', 'grid': {'optim.lr': [0.01, 0.1], 'train.seed': [0, 1]}, "
        "'refine': {'best': 'optim.lr', 'grid': {'train.seed': [2]}}}",
    )
    s = sweep_grid.load_sweep(file)
    root = tmp_path / "root"
    outcomes = {(0.01, 0): ("done", 4.0), (0.01, 1): ("done", 4.2), (0.1, 0): ("done", 3.0)}
    for run in s.runs():
        key = (run.values["optim.lr"], run.values["train.seed"])
        _finish(root / run.name, *outcomes.get(key, ("blew up", 3.1)))
    runs, notes = sweep.refine_runs(s, root)
    assert [r.name for r in runs] == ["lr=0.01,seed=2"]
    assert notes == ["all runs: best optim.lr=0.01 (eval/loss 4.1000)"]


def test_sweep_runs_the_refine_stage_after_the_grid(tmp_path, capsys):
    """A real tiny sweep: two learning rates, then one more seed at the better one; the rerun
    trains nothing and lists the refine run as done."""
    file = write_sweep(tmp_path / "r.py", {"optim.lr": [1e-3, 3e-2], "train.seed": [0]})
    text = Path(file).read_text().rstrip()
    Path(file).write_text(
        text[:-1] + ", 'refine': {'best': 'optim.lr', 'grid': {'train.seed': [1]}}}\n"
    )
    root = tmp_path / "root"
    code, out, _ = sweep_cli("--sweep", file, "--root", str(root), capsys=capsys)
    assert code == 0, out
    grid = {
        lr: json.loads((root / f"lr={lr},seed=0" / "status.json").read_text())
        for lr in ("0.001", "0.03")
    }
    best = min(grid, key=lambda lr: grid[lr]["final"]["eval/loss"])
    assert f"refine: all runs: best optim.lr={best} (eval/loss" in out
    added = root / f"lr={best},seed=1"
    assert json.loads((added / "status.json").read_text())["state"] == "done"
    assert json.loads((added / "config.json").read_text())["train"]["seed"] == 1
    record = json.loads((root / "sweep.json").read_text())
    assert record["runs"][-1] == {
        "index": 2,
        "name": added.name,
        "values": {"optim.lr": float(best), "train.seed": 1},
    }
    assert record["refine"]["best"] == "optim.lr"
    code, out, _ = sweep_cli("--sweep", file, "--root", str(root), "--dry-run", capsys=capsys)
    assert code == 0 and out.split() == [
        "done",
        str(root / "lr=0.001,seed=0"),
        "done",
        str(root / "lr=0.03,seed=0"),
        "done",
        str(added),
    ]
