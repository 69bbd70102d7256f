"""`perijax launch-tpu`: gcloud commands for TPU VMs and queued resources (checked in dry-run
mode), the chips and hosts of each slice type, one-line errors for bad input, the commands run
being the ones printed (a stand-in gcloud records them), restart after preemption, and the
per-worker run and stop scripts executed on this machine."""

import json
import os
import shlex
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from perijax.launchers import tpu, tpu_steps

WHERE = ["--zone", "us-west4-a", "--project", "my-proj"]
V5E_TRAIN = [
    "train", "--config", "configs/paper.py:size=400m", "--workdir", "/mnt/shared/runs/peri-400m",
    "--config.mesh.data=1", "--config.mesh.fsdp=16", "--config.data.seq_len=4096",
    "--config.train.global_batch_size=512", "--config.train.grad_accum_steps=32",
]  # fmt: skip

# A stand-in for gcloud: records each call as a JSON line; `describe` prints $FAKE_TPU_STATE; the
# first run of a train command fails (with $FAKE_RUN_STATUS, default 255 as a preempted TPU's ssh
# connection would) when $FAKE_FAIL_ONCE names a marker file that does not exist yet.
FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_GCLOUD_RECORD"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "describe" in sys.argv:
    print(os.environ.get("FAKE_TPU_STATE", "READY"))
marker = os.environ.get("FAKE_FAIL_ONCE")
if marker and any("exec " in a for a in sys.argv) and not os.path.exists(marker):
    open(marker, "w").close()
    sys.exit(int(os.environ.get("FAKE_RUN_STATUS", "255")))
"""


def launch(args, capsys):
    code = tpu.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def commands(dry_run_output: str) -> list[list[str]]:
    """The commands of a dry run (comment lines skipped; quoted arguments may span lines)."""
    result, pending = [], ""
    for line in dry_run_output.splitlines():
        if not pending and line.startswith("#"):
            continue
        pending = f"{pending}\n{line}" if pending else line
        try:
            result.append(shlex.split(pending))
            pending = ""
        except ValueError:  # an open quote: the command continues on the next line
            continue
    return result


def flag(argv: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in argv if a.startswith(f"{name}="))


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(gcloud.stat().st_mode | stat.S_IXUSR)
    record = tmp_path / "gcloud.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_RECORD", str(record))
    return lambda: [["gcloud", *json.loads(x)] for x in record.read_text().splitlines()]


@pytest.mark.parametrize(
    "text, name, chips, hosts",
    [("v5e-16", "v5litepod-16", 16, 4), ("v5litepod-8", "v5litepod-8", 8, 1),
     ("v5p-64", "v5p-64", 32, 8), ("v5p-8", "v5p-8", 4, 1), ("v4-32", "v4-32", 16, 4),
     ("v6e-16", "v6e-16", 16, 4), ("v6e-8", "v6e-8", 8, 1), ("v6e-256", "v6e-256", 256, 64)],
)  # fmt: skip
def test_slice_types_have_their_chips_and_hosts(text, name, chips, hosts):
    t = tpu_steps.tpu_type(text)
    assert (t.name, t.chips, t.hosts) == (name, chips, hosts)
    for bad in ("v5p-12", "v5e-12", "v3-8", "v6e"):
        with pytest.raises(tpu_steps.LaunchError, match="accelerator-type"):
            tpu_steps.tpu_type(bad)


def test_run_starts_the_command_on_all_workers(capsys):
    code, out, err = launch(["run", "peri-v5e", *WHERE, "--accelerator-type", "v5litepod-16",
                             "--dry-run", "--", *V5E_TRAIN], capsys)  # fmt: skip
    assert code == 0, err
    mkdir, ssh = commands(out)
    assert mkdir == ["mkdir", "-p", "tpu-logs/peri-v5e/peri-400m"]
    assert ssh[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "peri-v5e",
                       "--zone=us-west4-a", "--project=my-proj"]  # fmt: skip
    assert "--worker=all" in ssh  # every host of the slice runs the same command
    assert flag(ssh, "--output-directory") == "tpu-logs/peri-v5e/peri-400m"  # a log per worker
    remote = flag(ssh, "--command")
    assert f"exec {shlex.join(['perijax', *V5E_TRAIN])} )" in remote
    assert 'log="$logs/peri-400m.log"' in remote and '>> "$log"' in remote
    assert 'tail -c "+$offset" --pid="$pid" -f "$log"' in remote  # streamed while it runs
    assert '"$logs/current.pid"' in remote  # for `stop`


def test_multislice_runs_on_every_slice_and_maps_dcn_data_to_slices(capsys):
    train = ["train", "--workdir", "gs://bucket/runs/ms", "--config.mesh.data=2",
             "--config.mesh.fsdp=32", "--config.train.global_batch_size=64",
             "--config.mesh.dcn_data=2"]  # fmt: skip
    args = ["run", "peri-ms", *WHERE, "--accelerator-type", "v5p-64", "--num-slices", "2"]
    code, out, err = launch([*args, "--dry-run", "--", *train], capsys)
    assert code == 0, err
    (ssh,) = commands(out)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "peri-ms"]
    assert "--node=all" in ssh and "--worker=all" in ssh
    bad = [*train[:-1], "--config.mesh.dcn_data=8"]  # 8 hosts, but data crosses 2 slices
    code, _, err = launch([*args, "--dry-run", "--", *bad], capsys)
    assert code == 2 and "mesh.dcn_data=8 must be 1 or the number of slices (2)" in err


@pytest.mark.parametrize(
    "action, expected",
    [
        (["create", "peri", *WHERE, "--accelerator-type", "v5e-16", "--spot"],
         [["gcloud", "compute", "tpus", "tpu-vm", "create", "peri", "--zone=us-west4-a",
           "--project=my-proj", "--accelerator-type=v5litepod-16",
           "--version=v2-alpha-tpuv5-lite", "--spot"]]),
        (["create", "peri", *WHERE, "--accelerator-type", "v5p-64", "--num-slices", "2"],
         [["gcloud", "compute", "tpus", "queued-resources", "create", "peri", "--zone=us-west4-a",
           "--project=my-proj", "--accelerator-type=v5p-64", "--runtime-version=v2-alpha-tpuv5",
           "--node-count=2", "--node-prefix=peri"],
          ["gcloud", "compute", "tpus", "queued-resources", "describe", "peri",
           "--zone=us-west4-a", "--project=my-proj", "--format=value(state.state)"]]),
        (["list", *WHERE],
         [["gcloud", "compute", "tpus", "tpu-vm", "list", "--zone=us-west4-a",
           "--project=my-proj"],
          ["gcloud", "compute", "tpus", "queued-resources", "list", "--zone=us-west4-a",
           "--project=my-proj"]]),
        (["delete", "peri", *WHERE],
         [["gcloud", "compute", "tpus", "tpu-vm", "delete", "peri", "--zone=us-west4-a",
           "--project=my-proj", "--quiet"]]),
        (["delete", "peri", *WHERE, "--queued"],
         [["gcloud", "compute", "tpus", "queued-resources", "delete", "peri",
           "--zone=us-west4-a", "--project=my-proj", "--force", "--quiet"]]),
    ],
)  # fmt: skip
def test_create_list_delete_commands(capsys, action, expected):
    code, out, err = launch([*action, "--dry-run"], capsys)
    assert code == 0, err
    assert commands(out) == expected


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "t", "--project", "p", "--accelerator-type", "v5e-16"], "--zone is required"),
        (["create", "t", "--zone", "z", "--accelerator-type", "v5e-16"], "--project is required"),
        (["run", "t", *WHERE, "--accelerator-type", "v5e-16", "--", *V5E_TRAIN[:5],
          "--config.mesh.data=1", "--config.mesh.fsdp=8"],
         "v5litepod-16 (16 chips on 4 host(s) per slice) = 16 devices: mesh data=1 x fsdp=8"),
        (["run", "t", *WHERE, "--accelerator-type", "v5p-64", "--", "train", "--workdir",
          "runs/x"], "--workdir runs/x is relative"),
        (["run", "t", *WHERE, "--accelerator-type", "v5p-64", "--", "train", "--workdir",
          "/home/me/runs/x"], "under /home, which is local to each machine"),
        (["run", "t", *WHERE, "--accelerator-type", "v5p-64", "--", "train", "--workdir",
          "/tmp/x"], "under /tmp"),
        (["run", "t", *WHERE, "--", *V5E_TRAIN], "run needs --accelerator-type"),
        (["run", "t", *WHERE, "--accelerator-type", "v5e-16", "--detach",
          "--restart-on-preemption", "--", *V5E_TRAIN], "drop --detach"),
        (["create", "Bad_Name", *WHERE, "--accelerator-type", "v5e-16"], "TPU name 'Bad_Name'"),
        (["create", "t", *WHERE, "--accelerator-type", "v5e-12"], "v5e slices have"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line(capsys, monkeypatch, args, message):
    monkeypatch.delenv("CLOUDSDK_COMPUTE_ZONE", raising=False)
    monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
    i = args.index("--") if "--" in args else len(args)
    code, out, err = launch([*args[:i], "--dry-run", *args[i:]], capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("perijax: error: "), err
    assert message in err


def test_missing_gcloud_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, out, err = launch(["list", *WHERE], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "gcloud is not installed" in err


def test_what_runs_is_what_the_dry_run_printed(tmp_path, capsys, fake_gcloud):
    args = ["stop", "peri", *WHERE]
    _, dry, _ = launch([*args, "--dry-run"], capsys)
    assert launch(args, capsys)[0] == 0
    assert fake_gcloud() == commands(dry)
    assert "--worker=all" in commands(dry)[0]


def test_restart_on_preemption_recreates_reinstalls_and_resumes(tmp_path, capsys, fake_gcloud,
                                                                monkeypatch):  # fmt: skip
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where `install` puts its tarball
    source = tmp_path / "src"
    source.mkdir()
    (source / "pyproject.toml").write_text("[project]\nname = 'perijax'\n")
    args = ["run", "peri", *WHERE, "--accelerator-type", "v5litepod-16", "--spot",
            "--restart-on-preemption", "--source", str(source),
            "--log-dir", str(tmp_path / "l")]  # fmt: skip
    _, dry, _ = launch([*args, "--dry-run", "--", *V5E_TRAIN], capsys)
    monkeypatch.setenv("FAKE_FAIL_ONCE", str(tmp_path / "failed"))
    monkeypatch.setenv("FAKE_TPU_STATE", "PREEMPTED")
    code, out, err = launch([*args, "--", *V5E_TRAIN], capsys)
    assert code == 0, out + err
    printed = [c for c in commands(dry) if c[0] == "gcloud"]
    called = fake_gcloud()
    # run (preempted) -> describe -> delete -> create -> copy -> install -> run (resumes)
    assert called == printed
    assert [c[4] for c in called] == ["ssh", "describe", "delete", "create", "scp", "ssh", "ssh"]
    assert called[0] == called[-1]  # the same command: the trainer resumes from the workdir
    assert "restart 1/10" in out and (tmp_path / "l").is_dir()

    # A run that fails on a healthy TPU is the run's own failure: no restart. A lost ssh
    # connection (status 255) to a healthy TPU is not a failure of the run either.
    monkeypatch.setenv("FAKE_TPU_STATE", "READY")
    for status, message in [("3", "failed with status 3 on a healthy TPU (READY); not restarting"),
                            ("255", "the ssh session ended but TPU peri is READY")]:  # fmt: skip
        (tmp_path / "gcloud.jsonl").unlink()
        (tmp_path / "failed").unlink()
        monkeypatch.setenv("FAKE_RUN_STATUS", status)
        code, _, err = launch([*args, "--", *V5E_TRAIN], capsys)
        assert code == int(status) and message in err
        assert [c[4] for c in fake_gcloud()] == ["ssh", "describe"]


def test_per_run_commands_one_line_per_run():
    runs = [f"perijax train --workdir gs://b/sweep/lr{lr} --config.optim.lr={lr} "
            "--config.mesh.data=1 --config.mesh.fsdp=-1" for lr in ("1e-3", "3e-3")]  # fmt: skip
    lines = tpu_steps.per_run_commands(runs, name="peri", zone="us-west4-a", project="p",
                                 accelerator_type="v5e-16", names=["peri-a", "peri-b"])  # fmt: skip
    assert len(lines) == 2
    for line, run, name in zip(lines, runs, ["peri-a", "peri-b"], strict=True):
        mkdir, ssh = line.split(" && ")
        assert mkdir == f"mkdir -p tpu-logs/{name}/{run.split()[3].rsplit('/', 1)[1]}"
        argv = shlex.split(ssh)
        assert argv[5] == name and "--worker=all" in argv
        assert f"exec {run} )" in flag(argv, "--command")
    with pytest.raises(tpu_steps.LaunchError, match="share a --workdir"):
        tpu_steps.per_run_commands([runs[0], runs[0]], name="peri", zone="z", project="p",
                             accelerator_type="v5e-16")  # fmt: skip


def test_worker_scripts_log_record_the_pid_and_stop_with_a_checkpoint(tmp_path):
    """The run and stop scripts gcloud sends to each worker, executed here with HOME=tmp: the pid
    file holds the trainer's own pid (exec), output goes to the run's log, and stop's SIGTERM
    reaches the trainer, which saves and exits 0."""
    trainer = textwrap.dedent(f"""
        import os, signal, sys, time
        open("{tmp_path}/pid", "w").write(str(os.getpid()))
        def save(*_):
            print("checkpoint saved", flush=True); sys.exit(0)
        signal.signal(signal.SIGTERM, save)
        print("training", flush=True)
        time.sleep(60)
    """)  # fmt: skip
    env = {**os.environ, "HOME": str(tmp_path)}
    script = tpu_steps.run_script(
        [sys.executable, "-c", trainer], run_name="r1", setup=(), detach=True
    )
    started = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert started.returncode == 0 and "started, log" in started.stdout, started.stderr
    logs = tmp_path / "perijax-logs"
    deadline = time.time() + 20
    while "training" not in (logs / "r1.log").read_text() and time.time() < deadline:
        time.sleep(0.05)
    assert (logs / "current.pid").read_text().strip() == (tmp_path / "pid").read_text()
    assert (logs / "current.log").resolve() == (logs / "r1.log").resolve()
    stopped = subprocess.run(
        ["bash", "-c", tpu_steps.STOP_SCRIPT], env=env, capture_output=True, text=True
    )
    assert "sent SIGTERM" in stopped.stdout
    pid = int((tmp_path / "pid").read_text())
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    assert (logs / "r1.log").read_text() == "training\ncheckpoint saved\n"
    assert "no perijax run" not in stopped.stdout

    # Foreground: output streamed to stdout and kept in the log; the trainer's exit status is
    # the script's.
    fg = tpu_steps.run_script([sys.executable, "-c", "print('hi'); raise SystemExit(3)"],
                        run_name="r2", setup=())  # fmt: skip
    done = subprocess.run(["bash", "-c", fg], env=env, capture_output=True, text=True)
    assert done.returncode == 3 and done.stdout == "hi\n"
    assert (logs / "r2.log").read_text() == "hi\n"
