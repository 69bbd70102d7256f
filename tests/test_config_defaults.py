"""perijax/config.py is the one place a setting's default and allowed values are declared: no
other module gives a parameter or a field named as a config key a default of its own, the train
step's static settings are the config's keys by name, and each `Literal[...]` key's choices are
exactly what `validate` accepts."""

import ast
import dataclasses
from pathlib import Path

import pytest

from perijax import config as config_lib
from perijax import step as step_lib
from perijax import telemetry
from perijax.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
KEYS = {f.name for cls in config_lib.SECTIONS.values() for f in dataclasses.fields(cls)}
# A default that reads the schema (`seed: int = TrainConfig.seed`) is not a second declaration.
READ_FROM_THE_SCHEMA = {
    f"{cls.__name__}.{f.name}"
    for cls in config_lib.SECTIONS.values()
    for f in dataclasses.fields(cls)
}

# (module, function or Class.field, name) whose default is not a second declaration of a config
# default: another setting that shares the key's name, or None meaning "the run's config value".
ALLOWED = {
    # different settings that share a key's name
    ("perijax/data/prepare.py", "prepare", "val_fraction"):
        "the `perijax prepare` split written into a prepared dataset, not data.val_fraction",
    ("perijax/experiments/figures.py", "make_figures", "lr"):
        "which lr of a sweep the figures show (None: chosen), not optim.lr",
    ("perijax/experiments/figures.py", "representatives", "lr"):
        "which lr of a sweep the figures show (None: chosen), not optim.lr",
    ("perijax/experiments/report.py", "report", "lr"):
        "which lr of a sweep the report shows (None: chosen), not optim.lr",
    ("perijax/generate.py", "generate", "seed"): "the sampling seed, not train.seed",
    ("perijax/lm_eval_adapter.py", "PerijaxLM.__init__", "seed"):
        "the sampling seed of an lm-eval model_args string, not train.seed",
    ("perijax/lm_eval_adapter.py", "PerijaxLM.from_model", "seed"):
        "the sampling seed, not train.seed",
    ("perijax/hf/export.py", "export", "dtype"):
        "the exported weights' dtype (hf.targets.EXPORT_DTYPES), not model.dtype",
    ("perijax/hf/files.py", "hf_config", "dtype"):
        "the exported weights' dtype (hf.targets.EXPORT_DTYPES), not model.dtype",
    ("perijax/hf/tensors.py", "to_hf_tensors", "dtype"):
        "the exported weights' dtype (hf.targets.EXPORT_DTYPES), not model.dtype",
    ("perijax/metrics.py", "MetricWriter.__init__", "enabled"):
        "whether this process writes metrics, not telemetry.enabled",
    ("perijax/train.py", "train", "data"): "the datasets to train on, not mesh.data",
    ("perijax/launchers/tpu.py", "_common_args", "name"):
        "whether the TPU command takes a --name argument, not optim.name",
    ("perijax/evaluate.py", "evaluate_checkpoint", "data"): "the datasets, not mesh.data",
    # None: the run's config value
    ("perijax/evaluate.py", "evaluate_checkpoint", "seq_len"): "None: the run's data.seq_len",
    ("perijax/lm_eval_adapter.py", "PerijaxLM.__init__", "dtype"):
        "None: the checkpoint's model.dtype (an lm-eval model_args override)",
    ("perijax/model.py", "_norm", "norm_type"): "None: cfg.norm_type",
    ("perijax/model.py", "Transformer.init_cache", "dtype"):
        "the KV cache's dtype; None: the config's compute dtype",
}  # fmt: skip


def _defaults(path: Path):
    """(function or Class.field, name, default source, line) of every parameter with a default
    and every class-level annotated field with a value in the module at `path`."""

    def visit(node, scope: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                name = f"{scope}{child.name}"
                for stmt in child.body:
                    if (
                        isinstance(stmt, ast.AnnAssign)
                        and isinstance(stmt.target, ast.Name)
                        and stmt.value is not None
                    ):
                        yield name, stmt.target.id, ast.unparse(stmt.value), stmt.lineno
                yield from visit(child, f"{name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                name = f"{scope}{getattr(child, 'name', '<lambda>')}"
                a = child.args
                positional = a.posonlyargs + a.args
                pairs = list(
                    zip(positional[len(positional) - len(a.defaults) :], a.defaults, strict=True)
                )
                pairs += [
                    (k, d)
                    for k, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)
                    if d is not None
                ]
                for arg, default in pairs:
                    yield name, arg.arg, ast.unparse(default), arg.lineno
                yield from visit(child, f"{name}.")
            else:
                yield from visit(child, scope)

    yield from visit(ast.parse(path.read_text()), "")


def _key_defaults():
    for path in sorted((ROOT / "perijax").rglob("*.py")):
        module = path.relative_to(ROOT).as_posix()
        if module == "perijax/config.py":
            continue
        for where, name, default, line in _defaults(path):
            if name in KEYS and default not in READ_FROM_THE_SCHEMA:
                yield (module, where, name), f"{module}:{line} {where}({name}={default})"


def test_no_module_declares_a_config_default_again():
    """A parameter or field named as a config key takes its value from the config: a default
    there would be a second declaration that can drift from the schema's."""
    hits = [text for key, text in _key_defaults() if key not in ALLOWED]
    assert hits == [], "defaults of config keys outside perijax/config.py:\n" + "\n".join(hits)


def test_the_allow_list_names_only_existing_defaults():
    assert sorted(set(ALLOWED) - {key for key, _ in _key_defaults()}) == []


@pytest.mark.parametrize(
    "cls, section",
    [(step_lib.Guard, "train"), (step_lib.LossScaling, "train"), (telemetry.Spikes, "telemetry")],
)
def test_static_step_settings_are_config_keys_without_defaults(cls, section):
    """Guard, LossScaling and Spikes are built by `from_section`: their fields are the section's
    keys, with no default of their own."""
    fields = dataclasses.fields(cls)
    keys = {f.name for f in dataclasses.fields(config_lib.SECTIONS[section])}
    assert {f.name for f in fields} <= keys
    assert all(f.default is dataclasses.MISSING for f in fields)
    cfg_section = getattr(config_lib.Config(), section)
    built = config_lib.from_section(cls, cfg_section)
    assert all(getattr(built, f.name) == getattr(cfg_section, f.name) for f in fields)


CHOICE_TUPLES = {
    "model.ln_placement": config_lib.PLACEMENTS,
    "model.norm_type": config_lib.NORM_TYPES,
    "model.qk_norm": config_lib.QK_NORMS,
    "model.dtype": config_lib.DTYPES,
    "model.matmul_dtype": config_lib.MATMUL_DTYPES,
    "model.param_dtype": config_lib.PARAM_DTYPES,
    "model.remat": config_lib.REMAT,
    "model.attention": config_lib.ATTENTION,
    "data.source": config_lib.DATA_SOURCES,
    "data.remote": config_lib.DATA_REMOTE,
    "optim.schedule": config_lib.SCHEDULES,
    "optim.name": config_lib.OPTIMIZERS,
    "optim.decay_shape": config_lib.DECAY_SHAPES,
    "train.on_repeated_bad_steps": config_lib.ON_BAD_STEPS,
}
# What a value needs besides itself to be a valid config.
COMPANIONS = {("data.source", "prepared"): {"data.path": "/some/prepared/folder"}}


def test_every_literal_key_has_its_public_tuple():
    literal = {
        f"{section}.{f.name}": config_lib.choices(cls, f.name)
        for section, cls in config_lib.SECTIONS.items()
        for f in dataclasses.fields(cls)
        if config_lib.choices(cls, f.name)
    }
    assert literal == CHOICE_TUPLES
    assert config_lib.PLACEMENTS == ("pre", "post", "peri", "output")  # the report's order


def _resolve(key: str, value):
    """The value of `key` in the config that sets it (and what it needs) to `value`."""
    raw = config_lib.to_dict(config_lib.Config())  # a plain dict: any type gets to resolve()
    for k, v in {key: value, **COMPANIONS.get((key, value), {})}.items():
        section, name = k.split(".")
        raw[section][name] = v
    section, name = key.split(".")
    return getattr(getattr(config_lib.resolve(raw), section), name)


@pytest.mark.parametrize(
    "key, value", [(k, v) for k, values in CHOICE_TUPLES.items() for v in values]
)
def test_every_declared_choice_is_accepted(key, value):
    assert _resolve(key, value) == value
    cd = config_lib.base_config()
    for k, v in COMPANIONS.get((key, value), {}).items():
        config_lib.apply_override(cd, k, v)
    config_lib.apply_override(cd, key, value)  # from the command line too
    assert getattr(getattr(config_lib.resolve(cd), key.split(".")[0]), key.split(".")[1]) == value


@pytest.mark.parametrize("key", CHOICE_TUPLES)
def test_a_value_outside_the_choices_is_a_one_line_error(key):
    allowed = ", ".join(CHOICE_TUPLES[key])
    with pytest.raises(ConfigError) as e:
        _resolve(key, "bogus")
    assert str(e.value) == f"{key}='bogus' is not valid: expected one of {allowed}"
    cd = config_lib.base_config()
    config_lib.apply_override(cd, key, "bogus")  # parses as text: refused by the same check
    with pytest.raises(ConfigError, match=f"^{key}='bogus' is not valid"):
        config_lib.resolve(cd)
    with pytest.raises(ConfigError) as e:
        _resolve(key, 5)
    assert str(e.value) == f"config key '{key}' must be str, got 5"
