"""Config files, command-line overrides, validation errors and the shipped presets."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from perijax import cli
from perijax import config as config_lib
from perijax.config import ConfigError
from perijax.model import count_params

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.name for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py")


def build(spec: str, *overrides: tuple[str, str]) -> config_lib.Config:
    return config_lib.load(spec, list(overrides))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_resolves(name):
    cfg = build(str(ROOT / "configs" / name))
    assert cfg.model.num_layers > 0


def test_overrides_are_typed_by_the_schema():
    cfg = build(
        "configs/tiny.py",
        ("model.ln_placement", "pre"),
        ("optim.lr", "2e-3"),
        ("model.num_kv_heads", "2"),
        ("model.embed_norm", "true"),
        ("optim.decay_steps", "none"),
        ("optim.min_lr_ratio", "0"),
    )
    assert cfg.model.ln_placement == "pre"
    assert cfg.optim.lr == 2e-3
    assert cfg.model.num_kv_heads == 2 and cfg.model.embed_norm is True
    assert cfg.optim.decay_steps is None
    assert cfg.optim.min_lr_ratio == 0.0 and isinstance(cfg.optim.min_lr_ratio, float)


def test_packaged_configs_are_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert build("configs/paper.py:size=1.5b").model.d_model == 2048


TINY = "configs/tiny.py"


@pytest.mark.parametrize(
    "spec, overrides, pattern",
    [
        (TINY, [("model.foo", "1")], r"unknown config key 'model.foo'.*model.d_model"),
        (TINY, [("modle.d_model", "1")], r"unknown config key 'modle.d_model'.*model"),
        (TINY, [("model.d_model", "big")], r"'model.d_model' must be int, got 'big'"),
        (TINY, [("model.embed_norm", "maybe")], r"'model.embed_norm' must be bool"),
        (TINY, [("model.ln_placement", "sandwich")], r"'sandwich'.*pre, post, peri, output"),
        (TINY, [("model.num_heads", "3")], r"num_heads=3 must divide model.d_model=128"),
        (TINY, [("model.num_kv_heads", "3")], r"num_kv_heads=3 must divide model.num_heads=4"),
        (TINY, [("train.grad_accum_steps", "5")], r"grad_accum_steps=5 must divide"),
        ("configs/nope.py", [], r"config file not found: configs/nope.py"),
        ("configs/paper.py:size=7b", [], r"size='7b' is not valid: expected one of 400m, 1.5b"),
        ("configs/paper.py:sise=1.5b", [], r"bad config argument 'sise=1.5b'"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, capsys, spec, overrides, pattern):
    workdir = tmp_path / "run"
    argv = ["train", "--config", spec, "--workdir", str(workdir)]
    argv += [f"--config.{k}={v}" for k, v in overrides]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("perijax: error: ")
    assert re.search(pattern, err), err
    assert not workdir.exists()


def test_bad_input_from_the_real_command_has_no_traceback(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "perijax.cli", "train", "--workdir", str(workdir),
         "--config.model.ln_placement=sandwich"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "perijax: error: model.ln_placement='sandwich' is not valid: "
        "expected one of pre, post, peri, output"
    ]
    assert not workdir.exists()


@pytest.mark.parametrize(
    "body, pattern",
    [
        ("raise KeyError('no_such_key')\n",
         r"cannot load config file .*bad\.py: KeyError: 'no_such_key'$"),
        ("def get_config():\n    return {}['no_such_key']\n",
         r"cannot load config file .*bad\.py: get_config\(\) raised KeyError: 'no_such_key'$"),
        ("def get_config():\n    raise ValueError('first line\\nsecond line')\n",
         r"get_config\(\) raised ValueError: first line$"),
    ],
)  # fmt: skip
def test_config_file_exceptions_are_one_line_exit_2(tmp_path, body, pattern):
    """An exception while loading a config file and one raised inside its get_config() read
    the same: one line, status 2, no traceback, nothing written."""
    (tmp_path / "bad.py").write_text(body)
    workdir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "perijax.cli", "train", "--config", str(tmp_path / "bad.py"),
         "--workdir", str(workdir)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("perijax: error: "), proc.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert not workdir.exists()


def test_resolve_rejects_unknown_keys_in_config_files():
    cd = config_lib.base_config()
    with cd.unlocked():
        cd.train.steps = 5
    with pytest.raises(ConfigError, match=r"unknown config key 'train.steps'"):
        config_lib.resolve(cd)


def documented_counts() -> dict[str, int]:
    """Parameter counts from the presets table in docs/configs.md."""
    text = (ROOT / "docs" / "configs.md").read_text()
    rows = re.findall(r"^\|\s*`([^`]+)`\s*\|.*\|\s*([\d,]+)\s*\|\s*$", text, flags=re.M)
    return {name: int(count.replace(",", "")) for name, count in rows}


PRESETS = {
    "paper.py:size=400m": 400e6,
    "paper.py:size=1.5b": 1.5e9,
    "paper.py:size=3.2b": 3.2e9,
    "small.py": 25e6,
    "tiny.py": None,
}


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_build_abstractly_and_match_documented_counts(preset):
    """eval_shape builds every preset (3.2B included) without allocating; its count is the one
    docs/configs.md documents and within 5% of the size in the name."""
    cfg = build(f"configs/{preset}")
    total = count_params(cfg.model)["total"]
    assert documented_counts()[f"configs/{preset}"] == total
    if PRESETS[preset]:
        assert abs(total - PRESETS[preset]) / PRESETS[preset] < 0.05


def test_a_saved_config_json_reloads_to_the_same_config(tmp_path):
    """A workdir's config.json is a config file: it resolves to the config that wrote it, takes
    overrides, and bad content is a one-line error."""
    import dataclasses
    import json

    cfg = config_lib.load("configs/small.py", [("model.ln_placement", "peri")])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config_lib.to_dict(cfg)))
    assert config_lib.resolve(config_lib.load_config_file(str(path))) == cfg
    again = config_lib.load(str(path), [("optim.lr", "0.1")])
    assert again == dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=0.1))
    path.write_text('{"model": {"no_such_key": 1}}')
    with pytest.raises(ConfigError, match="model.no_such_key"):
        config_lib.resolve(config_lib.load_config_file(str(path)))
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        config_lib.load_config_file(str(path))
    with pytest.raises(ConfigError, match="takes no argument"):
        config_lib.load_config_file(f"{path}:size=1")


def _perijax_modules():
    root = ROOT / "perijax"
    for path in sorted(root.rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text())


def test_every_command_error_goes_through_one_function():
    """`perijax: error: ...` is written in one place (perijax.cli.common.fail); docstrings may
    quote it."""
    writers = []
    for name, tree in _perijax_modules():
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and "perijax: error" in node.value
                and id(node) not in docstrings
            ):
                writers.append(name)
    assert writers == ["perijax/cli/common.py"]


def test_load_is_the_command_lines_config(capsys):
    """config.load(spec, overrides) is what `perijax train --config SPEC --config.K=V` resolves;
    a bad value is the same one-line error."""
    cfg = config_lib.load("configs/tiny.py", [("model.ln_placement", "peri"), ("optim.lr", "0.5")])
    assert (cfg.model.ln_placement, cfg.optim.lr) == ("peri", 0.5)
    with pytest.raises(config_lib.ConfigError, match="model.ln_placement='x' is not valid"):
        config_lib.load("configs/tiny.py", [("model.ln_placement", "x")])
    assert cli.main(["train", "--config.model.ln_placement=x"]) == 2
    assert "model.ln_placement='x' is not valid" in capsys.readouterr().err


def test_a_replaced_key_names_its_replacement(tmp_path):
    """train.loss_spike_factor became train.skip_loss_spikes: the old key is a one-line error
    naming the new one, except in a saved config that holds its old "off" value (0)."""
    with pytest.raises(
        ConfigError,
        match=r"'train.loss_spike_factor' was replaced: use train\.skip_loss_spikes=true",
    ):
        build("configs/tiny.py", ("train.loss_spike_factor", "2"))
    saved = config_lib.to_dict(build("configs/tiny.py"))
    del saved["train"]["skip_loss_spikes"]
    saved["train"]["loss_spike_factor"] = 0.0  # a config.json from before the change
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved))
    assert config_lib.load(str(path)) == build("configs/tiny.py")
    saved["train"]["loss_spike_factor"] = 1.5
    path.write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match="was replaced: use train.skip_loss_spikes=true"):
        config_lib.load(str(path))
