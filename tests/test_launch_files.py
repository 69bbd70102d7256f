"""The launchers' files outside Python: every shell script (shipped and generated) passes
shellcheck, launch/slurm_task.sh is the task script the batch files embed, launch/multinode.sh
exports the coordinator settings, the Dockerfiles install the right jax build, every launch recipe
in docs/launching.md passes the launchers' checks, and the subcommands plug into `perijax`."""

import argparse
import io
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from perijax.launchers import common, slurm, tpu, tpu_steps

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "launching.md"
SHARED_TRAIN = ["perijax", "train", "--workdir", "/shared/runs/x", "--config.mesh.fsdp=8"]


def generated_scripts() -> dict[str, str]:
    """Every shell script the launchers generate, by name."""
    job = slurm.SlurmJob(nodes=2, gpus_per_node=8, time="4:00:00", log_dir="/shared/logs",
                         cpus_per_task=32, env=(("NCCL_IB_HCA", "mlx5"),),
                         setup=("source /shared/venv/bin/activate",))  # fmt: skip
    array = slurm.array_job_script(
        [[*SHARED_TRAIN[:3], f"/shared/runs/{i}", *SHARED_TRAIN[4:]] for i in range(3)],
        nodes=2, gpus_per_node=8, time="4:00:00", log_dir="/shared/logs",
    )  # fmt: skip
    bash = "#!/bin/bash\n"
    return {
        "batch.sbatch": slurm.batch_script(job, SHARED_TRAIN),
        "array.sbatch": array,
        "tpu-run.sh": bash + tpu_steps.run_script(SHARED_TRAIN, run_name="x", env=[("A", "b c")]),
        "tpu-run-detached.sh": bash + tpu_steps.run_script(SHARED_TRAIN, run_name="x", detach=True),
        "tpu-install.sh": bash + tpu_steps.install_script("python3.11"),
        "tpu-stop.sh": bash + tpu_steps.STOP_SCRIPT,
        "tpu-logs.sh": bash + tpu_steps.logs_script(None),
    }


@pytest.mark.skipif(
    shutil.which("shellcheck") is None,
    reason="shellcheck is not installed (apt-get install -y shellcheck)",
)
def test_shell_scripts_pass_shellcheck(tmp_path):
    files = sorted((ROOT / "launch").glob("*.sh")) + sorted((ROOT / "scripts").glob("*.sh"))
    for name, text in generated_scripts().items():
        files.append(tmp_path / name)
        files[-1].write_text(text)
    buf = io.StringIO()
    with redirect_stdout(buf):  # the SLURM dry run is itself a shell script
        assert slurm.main(["--nodes", "1", "--time", "1:00:00", "--dry-run", "--", "train",
                           "--workdir", "/shared/x", "--config.mesh.fsdp=8"]) == 0  # fmt: skip
    files.append(tmp_path / "dry-run.sh")
    files[-1].write_text("#!/bin/bash\n" + buf.getvalue())
    # SC1091: a sourced file (a virtualenv's activate) is not there to follow, by design.
    proc = subprocess.run(["shellcheck", "--shell=bash", "--exclude=SC1091", *map(str, files)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout


def test_slurm_task_sh_is_the_embedded_task_script():
    assert (ROOT / "launch" / "slurm_task.sh").read_text() == "#!/usr/bin/env bash\n" + (
        slurm.TASK_SCRIPT
    )


def test_multinode_sh_exports_the_coordinator():
    script = str(ROOT / "launch" / "multinode.sh")
    names = "PERIJAX_COORDINATOR_ADDRESS", "PERIJAX_NUM_PROCESSES", "PERIJAX_PROCESS_ID"
    show = [sys.executable, "-c", f"import os; print(*(os.environ[k] for k in {names}))"]
    out = subprocess.run([script, "10.0.0.1:12355", "4", "3", "--", *show], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert out.split() == ["10.0.0.1:12355", "4", "3"]
    for bad in (["10.0.0.1", "4", "0"], ["h:1", "4", "4"], ["h:1", "0", "0"]):
        proc = subprocess.run([script, *bad, "--", "true"], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.startswith("multinode.sh: ")


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("kind, jax_build", [("cuda", "jax[cuda12]"), ("tpu", "jax[tpu]")])
def test_dockerfiles_install_the_right_jax_build(kind, jax_build):
    """No Docker engine here: the Dockerfile is read, not built."""
    steps = dockerfile(ROOT / "docker" / f"Dockerfile.{kind}")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    base = steps[0]
    assert base[0] == "FROM"
    version = re.match(r"python:3\.(\d+)", base[1])
    minimum = int(pyproject["project"]["requires-python"].removeprefix(">=3."))
    assert version and int(version.group(1)) >= minimum  # the base Python satisfies perijax's
    assert ("COPY", ". /opt/perijax") in steps  # the whole tree: package, configs/, launch/
    installs = [args for op, args in steps if op == "RUN" and "pip install" in args]
    # The tested versions (constraints.txt), with the accelerator's jax build.
    assert installs == [f"pip install -c /opt/perijax/constraints.txt -e '/opt/perijax[{kind}]'"]
    extra = pyproject["project"]["optional-dependencies"][kind]
    assert any(dep.startswith(jax_build) for dep in extra)
    assert ("ENTRYPOINT", '["perijax"]') in steps
    ignored = (ROOT / "docker" / f"Dockerfile.{kind}.dockerignore").read_text().split()
    assert {".git", ".venv", "runs"} <= set(ignored)
    if kind == "cuda":  # NCCL needs the verbs libraries for RDMA between nodes
        assert any("libibverbs1" in args for op, args in steps if op == "RUN")


def doc_commands() -> list[list[str]]:
    blocks = re.findall(r"^```bash\n(.*?)^```", DOC.read_text(), re.M | re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]


def test_doc_recipes_pass_the_launchers_checks():
    """Each `perijax launch-*` command in docs/launching.md, run with --dry-run, is accepted; each
    plain `perijax train` recipe fits the devices its section names."""
    launches = [c for c in doc_commands() if c[:1] == ["perijax"] and c[1].startswith("launch-")]
    assert len(launches) >= 9
    for argv in launches:
        main = slurm.main if argv[1] == "launch-slurm" else tpu.main
        args = argv[2:]
        cut = args.index("--") if "--" in args else len(args)
        buf = io.StringIO()
        with redirect_stdout(buf):
            code = main([*args[:cut], "--dry-run", *args[cut:]])
        assert code == 0, shlex.join(argv)
    devices = {"runs/peri-400m": 1, "runs/peri-1.5b": 8, "/shared/runs/peri-3.2b": 32}
    trains = [
        c[c.index("train") :] for c in doc_commands() if "train" in c and "launch" not in c[1]
    ]
    checked = set()
    for train in trains:
        parsed = common.parse_train_command(train)
        if parsed.workdir in devices:
            n = devices[parsed.workdir]
            common.check_mesh(parsed.config, devices=n, granules=max(1, n // 8), granule="nodes",
                              hardware=f"{n} GPU(s)")  # fmt: skip
            checked.add(parsed.workdir)
    assert checked == set(devices)


def test_doc_explains_every_gpu_setting():
    doc = DOC.read_text()
    for flag, _ in slurm.H100_XLA_FLAGS:
        assert f"| `{flag}` |" in doc
    for name, value, _ in slurm.H100_ENV:
        assert f"| `{name}={value}` |" in doc


def test_subcommands_plug_into_the_perijax_command(capsys):
    """What cli.py's two added lines do: register the subcommands, dispatch to args.launcher."""
    from perijax import cli, launchers

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "launch-slurm" not in sub.choices:
        launchers.add_parsers(sub)
    args = parser.parse_args(["launch-slurm", "--nodes", "1", "--time", "1:00:00", "--dry-run",
                              "--", "train", "--workdir", "/shared/x"])  # fmt: skip
    assert args.launcher(args, []) == 0
    assert "#SBATCH --nodes=1" in capsys.readouterr().out
    args = parser.parse_args(["launch-tpu", "stop", "peri", "--zone", "z", "--project", "p",
                              "--dry-run"])  # fmt: skip
    assert args.launcher(args, []) == 0
    assert "--worker=all" in capsys.readouterr().out
    assert args.launcher(args, [("model.num_layers", "2")]) == 2  # overrides belong after `--`
    assert "after `--`" in capsys.readouterr().err
