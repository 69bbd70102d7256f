"""`perijax launch-slurm`: the sbatch script asks for the right resources and starts jax.distributed
from SLURM's environment; bad input is one error line with nothing written; the time-limit signal
checkpoints and requeues; and the generated script itself, run with a stand-in for srun that
starts two local tasks, trains exactly like one process."""

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from perijax.launchers import slurm

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [
    "train", "--config", "configs/paper.py:size=3.2b", "--workdir", "/shared/runs/peri-3b",
    "--config.mesh.data=4", "--config.mesh.fsdp=8", "--config.mesh.dcn_data=4",
    "--config.train.grad_accum_steps=8",
]  # fmt: skip
H100 = ["--nodes", "4", "--gpus-per-node", "8", "--time", "24:00:00", "--partition", "h100",
        "--setup", "source /shared/venv/bin/activate"]  # fmt: skip
TINY = {
    "data.source": "synthetic", "model.vocab_size": "64", "data.seq_len": "16",
    "model.num_layers": "1", "model.d_model": "32", "model.num_heads": "4", "model.d_ff": "64",
    "train.global_batch_size": "8", "train.total_steps": "4", "train.log_every_steps": "1",
    "train.eval_every_steps": "0", "train.eval_batches": "1", "optim.warmup_steps": "0",
    "mesh.data": "4", "model.dtype": "float32",
}  # fmt: skip

# Stand-ins for SLURM's commands. srun starts $SLURM_NTASKS local copies of its command with
# SLURM_PROCID set and output to its --output pattern, and passes SIGTERM on to them (as slurmd
# delivers `scancel --signal=TERM` to a job's tasks); scancel does that delivery; scancel and
# scontrol record their arguments.
FAKE_SRUN = r"""#!/usr/bin/env bash
echo $$ > "$FAKE_SLURM_DIR/srun.pid"
pattern=""
while [[ $# -gt 0 && $1 == --* ]]; do
  [[ $1 == --output=* ]] && pattern="${1#--output=}"
  shift
done
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM
for ((i = 0; i < SLURM_NTASKS; i++)); do
  out="${pattern//%n/$i}"; out="${out//%j/$SLURM_JOB_ID}"; out="${out//%x/$SLURM_JOB_NAME}"
  SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i "$@" >>"$out" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  while :; do wait "$pid"; code=$?; kill -0 "$pid" 2>/dev/null || break; done
  [[ $code -eq 0 ]] || status=$code
done
exit "$status"
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_SLURM_DIR/record.txt"
kill -TERM "$(cat "$FAKE_SLURM_DIR/srun.pid")"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM_DIR/record.txt"
"""


def launch(args, capsys):
    code = slurm.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def script_of(dry_run_output: str) -> str:
    return re.search(r"<<'PERIJAX_SBATCH'\n(.*)PERIJAX_SBATCH\n", dry_run_output, re.S).group(1)


def executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def fake_slurm_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    executable(bin_dir / "srun", FAKE_SRUN)
    executable(bin_dir / "scancel", FAKE_SCANCEL)
    executable(bin_dir / "scontrol", FAKE_SCONTROL)
    return bin_dir


def slurm_env(tmp_path: Path, ntasks: int) -> dict[str, str]:
    """This process's environment as two SLURM tasks on 127.0.0.1 would see it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f
    )
    env.update(
        PATH=f"{fake_slurm_bin(tmp_path)}:{env['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="perijax",
        SLURM_NTASKS=str(ntasks),
        SLURM_JOB_NODELIST="node[1-2]",
        PERIJAX_COORDINATOR_HOST="127.0.0.1",
        PERIJAX_COORDINATOR_PORT=str(port),
        JAX_NUM_CPU_DEVICES="2",
        FAKE_SLURM_DIR=str(tmp_path),
    )
    return env


def test_script_requests_the_resources_and_exports_the_coordinator(capsys):
    code, out, err = launch([*H100, "--cpus-per-task", "96", "--dry-run", "--", *TRAIN], capsys)
    assert code == 0, err
    script = script_of(out)
    lines = out.splitlines()
    assert lines[1] == "mkdir -p /shared/runs/peri-3b/logs"
    assert lines[-1] == "sbatch /shared/runs/peri-3b/logs/perijax.sbatch"
    sbatch = re.findall(r"^#SBATCH (.*)$", script, re.M)
    for option in [
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--time=24:00:00",
        "--partition=h100",
        "--cpus-per-task=96",
        "--signal=B:USR1@300",
        "--requeue",
        "--open-mode=append",
        "--output=/shared/runs/peri-3b/logs/%x-%j.out",
    ]:
        assert option in sbatch
    # srun: one task per node (from the allocation), per-node logs, all stopped if one fails.
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--output=/shared/runs/peri-3b/logs/%x-%j-node%n.log" in srun
    assert "--kill-on-bad-exit=1" in srun and "--cpus-per-task=96" in srun
    assert srun.endswith('bash -c "$PERIJAX_TASK" perijax-task "${run[@]}" &')
    assert f"run=({' '.join(['perijax', *TRAIN])})" in script
    # The task part is the shipped slurm_task.sh, and it exports what perijax.distributed reads.
    assert slurm.TASK_SCRIPT in script
    for export in [
        'PERIJAX_NUM_PROCESSES="$SLURM_NTASKS"',
        'PERIJAX_PROCESS_ID="$SLURM_PROCID"',
        'PERIJAX_COORDINATOR_ADDRESS="${host}:${port}"',
    ]:
        assert f"export {export}" in slurm.TASK_SCRIPT
    assert "scontrol show hostnames" in script  # coordinator = first host of the allocation
    assert "source /shared/venv/bin/activate" in script
    for flag, _ in slurm.H100_XLA_FLAGS:
        assert f"  {flag}\n" in script


@pytest.mark.parametrize(
    "options, train, message",
    [
        ([], [*TRAIN[:5], "--config.mesh.data=4", "--config.mesh.fsdp=4"],
         "4 node(s) x 8 GPU(s) = 32 devices: mesh data=4 x fsdp=4 x tensor=1 = 16 devices"),
        ([], ["train", "--workdir", "runs/peri", "--config.mesh.fsdp=8", "--config.mesh.data=4"],
         "--workdir runs/peri is relative"),
        ([], ["train", "--workdir", "/tmp/peri", "--config.mesh.fsdp=8"],
         "--workdir /tmp/peri is under /tmp"),
        ([], ["train", "--config.mesh.fsdp=8"], "needs --workdir"),
        ([], [*TRAIN[:5], "--config.mesh.fsdp=8", "--config.mesh.dcn_data=2"],
         "mesh.dcn_data=2 must be 1 or the number of nodes (4)"),
        (["--signal-lead", "600"], TRAIN, "must be shorter than the time limit"),
        ([], ["plan", "--devices", "8"], "must be `train ...`"),
        ([], [*TRAIN, "--config.model.bogus=1"], "unknown config key 'model.bogus'"),
    ],
)  # fmt: skip
def test_bad_input_is_one_error_line_and_writes_nothing(
    tmp_path, capsys, monkeypatch, options, train, message
):
    executable(tmp_path / "sbatch", '#!/bin/sh\ntouch "$0.called"\n')
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    args = [
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--time",
        "00:09:00",
        "--log-dir",
        str(tmp_path / "logs"),
        *options,
        "--",
        *train,
    ]
    code, out, err = launch(args, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("perijax: error: "), err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sbatch"]  # no logs, script, or call


def test_submit_writes_the_dry_run_script_and_runs_sbatch(tmp_path, capsys, monkeypatch):
    record = tmp_path / "sbatch-args.txt"
    (tmp_path / "bin").mkdir()
    executable(tmp_path / "bin" / "sbatch", f'#!/bin/sh\necho "$@" > {record}\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    options = [
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--time",
        "2:00:00",
        "--log-dir",
        str(tmp_path / "logs"),
    ]
    train = ["--", "train", "--workdir", str(tmp_path / "w"), "--config.mesh.fsdp=8"]
    code, dry, _ = launch([*options, "--dry-run", *train], capsys)
    assert code == 0 and not (tmp_path / "logs").exists()
    assert slurm.main([*options, *train]) == 0
    path = tmp_path / "logs" / "perijax.sbatch"
    assert path.read_text() == script_of(dry)
    assert record.read_text().split() == [str(path)]


def test_missing_sbatch_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    args = [
        "--nodes",
        "1",
        "--time",
        "1:00:00",
        "--log-dir",
        str(tmp_path / "logs"),
        "--",
        "train",
        "--workdir",
        str(tmp_path / "w"),
        "--config.mesh.fsdp=8",
    ]
    code, _, err = launch(args, capsys)
    assert code == 2 and err.count("\n") == 1
    assert "sbatch is not installed" in err and "--dry-run" in err
    assert not (tmp_path / "logs").exists()


def test_h100_settings_exist_in_this_jax():
    """An unknown flag in XLA_FLAGS aborts the process: each recommended flag must parse (XLA's
    CPU build knows its GPU flags too), and the memory-fraction variable must be the one jaxlib
    reads."""
    flags = " ".join(flag for flag, _ in slurm.H100_XLA_FLAGS)
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    probe = "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "3.0", proc.stderr[-2000:]
    bad = {**env, "XLA_FLAGS": "--xla_gpu_enable_not_a_flag=true"}
    assert subprocess.run([sys.executable, "-c", probe], env=bad, capture_output=True).returncode
    import jaxlib.xla_client

    source = Path(jaxlib.xla_client.__file__).read_text()
    assert all(f"'{name}'" in source for name, _, _ in slurm.H100_ENV if name.startswith("XLA"))


def test_array_job_script_runs_one_task_per_run():
    runs = [
        f"perijax train --workdir /shared/sweep/lr{lr} --config.optim.lr={lr} "
        "--config.mesh.fsdp=8 --config.mesh.data=2 --config.mesh.dcn_data=2"
        for lr in ("1e-3", "3e-3", "1e-2")
    ]
    script = slurm.array_job_script(
        runs, nodes=2, gpus_per_node=8, time="4:00:00", log_dir="/shared/sweep/logs", max_parallel=2
    )
    assert "#SBATCH --array=0-2%2" in script
    assert "#SBATCH --output=/shared/sweep/logs/%x-%A_%a.out" in script
    assert "--output=/shared/sweep/logs/%x-%A_%a-node%n.log" in script
    for i, run in enumerate(runs):
        assert f"  {i}) run=({run}) ;;" in script
    with pytest.raises(slurm.LaunchError, match="share a --workdir"):
        slurm.array_job_script(
            [runs[0], runs[0]],
            nodes=2,
            gpus_per_node=8,
            time="1:00:00",
            log_dir="/shared/sweep/logs",
        )
    with pytest.raises(slurm.LaunchError, match="= 8 devices"):
        slurm.array_job_script(
            runs, nodes=1, gpus_per_node=8, time="1:00:00", log_dir="/shared/sweep/logs"
        )


@pytest.mark.parametrize("how", ["time limit", "scancel --signal=TERM", "SIGTERM to the script"])
def test_time_limit_stop_and_sigterm(tmp_path, how):
    """USR1 (sbatch --signal, before the time limit) gives each task one SIGTERM through
    `scancel --signal=TERM`; the trainer saves and exits 0 and the job requeues. The same scancel
    by hand stops without requeueing. SIGTERM to the batch shell (plain scancel, preemption)
    does not end it while the tasks run."""
    task = textwrap.dedent(f"""
        import os, signal, sys, time
        def save(*_):
            print("saved", os.environ["PERIJAX_PROCESS_ID"], flush=True); sys.exit(0)
        signal.signal(signal.SIGTERM, save)
        open("{tmp_path}/ready" + os.environ["PERIJAX_PROCESS_ID"], "w").close()
        time.sleep(60)
    """)  # fmt: skip
    job = slurm.SlurmJob(
        nodes=2, gpus_per_node=1, time="1:00:00", log_dir=str(tmp_path), gpu_settings=False
    )
    script = executable(
        tmp_path / "job.sbatch", slurm.batch_script(job, [sys.executable, "-c", task])
    )
    env = slurm_env(tmp_path, 2)
    proc = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.time() + 20
    while not all((tmp_path / f"ready{i}").exists() for i in (0, 1)) and time.time() < deadline:
        time.sleep(0.05)
    if how == "time limit":
        proc.send_signal(signal.SIGUSR1)
    elif how == "scancel --signal=TERM":
        subprocess.run(["scancel", "--signal=TERM", "4242"], env=env, check=True)
    else:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # still waiting for its tasks
        subprocess.run(["scancel", "--signal=TERM", "4242"], env=env, check=True)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    logs = [(tmp_path / f"perijax-4242-node{i}.log").read_text() for i in (0, 1)]
    assert logs == ["saved 0\n", "saved 1\n"]  # every task saved once
    record = (tmp_path / "record.txt").read_text().splitlines()
    if how == "time limit":
        assert record == ["scancel --signal=TERM 4242", "scontrol requeue 4242"]
    else:
        assert record == ["scancel --signal=TERM 4242"]  # stopped: not requeued


def losses(workdir: Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def test_generated_job_trains_like_one_process(tmp_path):
    """The sbatch script, run as 2 SLURM tasks x 2 CPU devices on 127.0.0.1 (srun stood in for),
    trains the same losses as one process with 4 devices."""
    import jax

    from perijax import config as config_lib
    from perijax import train as train_lib

    def command(workdir):
        return [
            sys.executable,
            "-m",
            "perijax.cli",
            "train",
            "--config",
            "configs/tiny.py",
            "--workdir",
            str(workdir),
            *[f"--config.{k}={v}" for k, v in TINY.items()],
            "--config.mesh.dcn_data=2",
        ]

    job = slurm.SlurmJob(
        nodes=2, gpus_per_node=2, time="0:30:00", log_dir="/shared/logs", gpu_settings=False
    )
    slurm.validate(job, [command("/shared/runs/tiny")])  # what the launcher accepts
    job = slurm.SlurmJob(
        nodes=2, gpus_per_node=2, time="0:30:00", log_dir=str(tmp_path / "logs"), gpu_settings=False
    )
    (tmp_path / "logs").mkdir()
    script = executable(
        tmp_path / "job.sbatch", slurm.batch_script(job, command(tmp_path / "multi"))
    )
    proc = subprocess.Popen(
        ["bash", str(script)],
        env=slurm_env(tmp_path, 2),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    cfg = config_lib.load("configs/tiny.py", list(TINY.items()))
    train_lib.train(cfg, tmp_path / "single", devices=jax.devices()[:4], log=lambda s: None)

    out, _ = proc.communicate(timeout=300)
    node0 = (tmp_path / "logs" / "perijax-4242-node0.log").read_text()
    assert proc.returncode == 0, out + node0[-3000:]
    assert "perijax: tasks exited with status 0" in out
    assert "step 4/4" in node0 and "over 2 process(es)" in node0
    assert (tmp_path / "logs" / "perijax-4242-node1.log").exists()
    multi, single = losses(tmp_path / "multi"), losses(tmp_path / "single")
    assert len(multi) == 4
    np.testing.assert_allclose(multi, single, rtol=1e-5)
