"""Typed configuration: the one schema, config files, command-line overrides and validation.

The dataclasses below are the only place a setting, its default and (a `Literal[...]` type) its
allowed values are declared; each section's `check()` beside it holds its value checks, and the
train step's static settings are built from them by name (`from_section`). Config files
(`configs/*.py`, ml-collections style as in big_vision) start from `base_config()` and change only
what differs; `--config.section.key=value` overrides any key; `resolve()` turns the result into a
frozen, validated `Config`. Every mistake raises `ConfigError` with a one-line message naming the
key and what is allowed, before any compute or any write.

Over 500 lines on purpose: it is the one schema, and a setting's declaration, parsing and
validation sit side by side.
"""

import dataclasses
import importlib.resources
import importlib.util
import json
import math
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import ml_collections

MAX_LOSS_SCALE = 2.0**24  # float16 dynamic loss scaling grows the scale up to this
T = typing.TypeVar("T")


class ConfigError(ValueError):
    """A bad setting; the message is one line and names the key."""


# ------------------------------------------------------------------------------------- checks
def choices(section: type, key: str) -> tuple[Any, ...]:
    """The values a `Literal[...]` key allows, in declaration order; () for any other key."""
    hint = typing.get_type_hints(section)[key]
    return typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else ()


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(path: str, value: str, allowed: tuple[str, ...]) -> None:
    _require(
        value in allowed, f"{path}={value!r} is not valid: expected one of {', '.join(allowed)}"
    )


def _check_choices(section: Any, name: str) -> None:
    """Every `Literal[...]` key of the section `name` holds one of its values."""
    for f in dataclasses.fields(section):
        if allowed := choices(type(section), f.name):
            _one_of(f"{name}.{f.name}", getattr(section, f.name), allowed)


def _positive(cfg: Any, section: str, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        _require(value is None or value > 0, f"{section}.{key} must be > 0, got {value}")


def _non_negative(cfg: Any, section: str, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        _require(value >= 0, f"{section}.{key} must be >= 0, got {value}")


# ------------------------------------------------------------------------------------- schema
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder-only LM shape and the LayerNorm placement (docs/ln_variants.md)."""

    vocab_size: int = 32000
    num_layers: int = 12
    d_model: int = 768
    num_heads: int = 12
    num_kv_heads: int | None = None  # None: = num_heads (no grouped-query attention)
    head_dim: int | None = None  # None: = d_model // num_heads
    d_ff: int = 2048  # hidden width of the SwiGLU MLP
    ln_placement: Literal["pre", "post", "peri", "output"] = "pre"
    norm_type: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-6
    learnable_norm_scale: bool = True  # False: every norm has a fixed scale of 1
    embed_norm: bool = False  # normalize the token embeddings before the first block
    # RMSNorm of queries and keys before RoPE; per_head: Gemma 3, full: OLMo 2
    qk_norm: Literal["none", "per_head", "full"] = "none"
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    init_std: float = 0.02
    depth_scaled_init: bool = False  # output projections use init_std / sqrt(2 * num_layers)
    # compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU; float16: with dynamic loss
    # scaling (train.loss_scale_*) and float32 master weights
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    scan_layers: bool = False  # one scanned block with stacked weights: fast compiles at depth
    # minimal: save the weight matmuls; full: recompute the whole block
    remat: Literal["none", "minimal", "full"] = "none"
    # The attention and MLP weight matmuls: compute (in the compute dtype) or float8 (e4m3
    # forward, e5m2 gradients, per-tensor current scaling; docs/configs.md, "float8 matmuls")
    matmul_dtype: Literal["compute", "float8"] = "compute"
    # auto: cudnn on GPU, splash on TPU, xla on CPU; blockwise: any backend
    attention: Literal["auto", "xla", "blockwise", "cudnn", "splash"] = "auto"
    loss_chunk_len: int = 0  # positions per chunk of the fused output head + loss; 0: auto

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def final_norm(self) -> bool:
        """Post-LN's last block already ends in a norm; every other placement adds one."""
        return self.ln_placement != "post"

    def check(self) -> None:
        _check_choices(self, "model")
        _positive(self, "model", "vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads")
        _positive(self, "model", "head_dim", "d_ff", "norm_eps", "rope_theta", "init_std")
        if self.head_dim is None:
            _require(
                self.d_model % self.num_heads == 0,
                f"model.num_heads={self.num_heads} must divide model.d_model={self.d_model} "
                "(or set model.head_dim)",
            )
        _require(
            self.num_heads % self.kv_heads == 0,
            f"model.num_kv_heads={self.kv_heads} must divide model.num_heads={self.num_heads}",
        )
        _require(
            self.dim_per_head % 2 == 0, f"head dimension {self.dim_per_head} must be even for RoPE"
        )
        _require(
            self.dtype != "float16" or self.param_dtype == "float32",
            "model.dtype=float16 keeps float32 master weights: set model.param_dtype=float32",
        )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from (docs/configs.md); the full pipeline lives in perijax.data."""

    # stdlib: the interpreter's .py files (no download)
    source: Literal["stdlib", "synthetic", "prepared"] = "stdlib"
    path: str = ""  # prepared: a `perijax prepare` folder, or a mixture "DIR_A=0.7,DIR_B=0.3"
    seq_len: int = 128
    cache_dir: str = ""  # "": $PERIJAX_CACHE, else ~/.cache/perijax
    # A data.path URL (gs://...): read in place by ranged requests, or copied to cache_dir first.
    remote: Literal["stream", "copy"] = "stream"
    val_fraction: float = 0.05
    num_threads: int = 2
    prefetch: int = 4
    # Packed rows: attend only within each document (documents end with the data's
    # end-of-document token) and restart positions at each document's first token.
    document_masking: bool = False

    def check(self) -> None:
        _check_choices(self, "data")
        _positive(self, "data", "seq_len", "num_threads", "prefetch")
        _require(
            (self.source == "prepared") == bool(self.path),
            "data.path names a `perijax prepare` folder and is used exactly when "
            "data.source=prepared",
        )
        _require(
            0 < self.val_fraction < 1,
            f"data.val_fraction must be in (0, 1), got {self.val_fraction}",
        )


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW (or Muon for the hidden matrices) with warmup and a decay schedule, global-norm
    clipping (perijax/optim.py)."""

    # adamw; muon: Muon for the hidden matrices, AdamW for embeddings, head and norms
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-4
    # After a linear warmup. wsd: warmup, stable at `lr`, then a decay of `decay_shape` that
    # ends at train.total_steps (docs/configs.md, "Learning-rate schedules").
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = 100
    # cosine, linear: the step where the decay ends (None: train.total_steps).
    # wsd: the length of the decay (None: decay_fraction of train.total_steps).
    decay_steps: int | None = None
    decay_fraction: float = 0.2  # wsd: the decay's share of train.total_steps
    decay_shape: Literal["1-sqrt", "linear", "cosine"] = "1-sqrt"  # wsd
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, linear, wsd)
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # not applied to norm scales and biases
    grad_clip_norm: float = 1.0  # 0 disables clipping
    muon_beta: float = 0.95  # muon: momentum of the orthogonalized (Nesterov) update
    muon_ns_steps: int = 5  # muon: Newton-Schulz iterations

    def check(self) -> None:
        _check_choices(self, "optim")
        _positive(self, "optim", "lr", "decay_steps", "eps")
        _non_negative(self, "optim", "warmup_steps")
        _require(
            0 < self.decay_fraction <= 1,
            f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction}",
        )
        _require(
            0 <= self.min_lr_ratio <= 1,
            f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}",
        )
        _require(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1)")
        _require(
            0 <= self.muon_beta < 1, f"optim.muon_beta must be in [0, 1), got {self.muon_beta}"
        )
        _positive(self, "optim", "muon_ns_steps")
        _non_negative(self, "optim", "weight_decay", "grad_clip_norm")
        _require(math.isfinite(self.lr), f"optim.lr must be finite, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The loop: steps, batch, logging and evaluation cadence."""

    seed: int = 0
    total_steps: int = 1000
    global_batch_size: int = 32  # sequences per optimizer step, over all devices and micro-batches
    # Micro-batches per step; 0: automatic, the fewest that keep each device at 16,384 tokens
    # or one sequence (perijax.sharding.grad_accum_for).
    grad_accum_steps: int = 1
    log_every_steps: int = 10
    eval_every_steps: int = 200  # 0: evaluate only at the end
    eval_batches: int = 8
    # Divergence guard (docs/checkpointing.md): a step with a non-finite loss or gradient, or
    # (skip_loss_spikes) a loss spike as telemetry.* defines and counts it, leaves params untouched.
    skip_bad_steps: bool = True
    skip_loss_spikes: bool = False
    max_consecutive_bad_steps: int = 5  # then: roll back to the last checkpoint, or stop
    on_repeated_bad_steps: Literal["rollback", "stop"] = "rollback"
    rollback_skips_batches: bool = True  # after a rollback, continue with fresh batches
    max_rollbacks: int = 3
    # Dynamic loss scaling, used with model.dtype=float16 only (docs/checkpointing.md): the loss
    # is multiplied by the scale before differentiation; a step whose gradients overflow is not
    # applied and halves the scale; this many consecutive finite steps double it.
    loss_scale_init: float = 2.0**15
    loss_scale_growth_interval: int = 2000
    # Weights & Biases (docs/telemetry.md; the `wandb` extra): off while wandb_project is empty.
    wandb_project: str = ""
    wandb_entity: str = ""  # empty: the logged-in user's default entity
    wandb_group: str = ""  # empty: the workdir's parent folder (a sweep's runs share one group)

    def check(self) -> None:
        _check_choices(self, "train")
        _positive(self, "train", "total_steps", "global_batch_size")
        _require(
            self.grad_accum_steps >= 0,
            f"train.grad_accum_steps must be >= 0 (0: automatic), got {self.grad_accum_steps}",
        )
        _positive(self, "train", "log_every_steps", "eval_batches")
        _non_negative(self, "train", "eval_every_steps")
        _require(
            self.grad_accum_steps == 0 or self.global_batch_size % self.grad_accum_steps == 0,
            f"train.grad_accum_steps={self.grad_accum_steps} must divide "
            f"train.global_batch_size={self.global_batch_size}",
        )
        _positive(self, "train", "max_consecutive_bad_steps")
        _non_negative(self, "train", "max_rollbacks")
        _require(
            1 <= self.loss_scale_init <= MAX_LOSS_SCALE,
            f"train.loss_scale_init must be in [1, 2**24], got {self.loss_scale_init}",
        )
        _positive(self, "train", "loss_scale_growth_interval")


@dataclasses.dataclass(frozen=True)
class TelemetryConfig:
    """Stability metrics (docs/telemetry.md): per-layer statistics computed inside the step on
    log steps only, and spike counters updated every step."""

    enabled: bool = True
    grad_spike_factor: float = 3.0  # grad-norm spike: > factor x running median
    loss_spike_factor: float = 1.2  # loss spike: > factor x running median
    spike_window: int = 64  # steps in the running median
    spike_min_history: int = 16  # steps of history before spikes are counted

    def check(self) -> None:
        _positive(self, "telemetry", "grad_spike_factor", "loss_spike_factor", "spike_window")
        _require(
            0 < self.spike_min_history <= self.spike_window,
            "telemetry.spike_min_history must be in [1, telemetry.spike_window]",
        )


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Held-out sets evaluated beside the training data's validation split (docs/configs.md)."""

    # "NAME=SOURCE[,NAME=SOURCE...]": SOURCE is stdlib, synthetic, or a `perijax prepare`
    # folder or URL; its validation split is logged as eval/NAME/loss at every evaluation.
    sets: str = ""

    def check(self) -> None:
        eval_sets(self.sets)


_SET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def eval_sets(text: str) -> list[tuple[str, str]]:
    """eval.sets "NAME=SOURCE,..." -> [(name, source)]; ConfigError in one line if malformed."""
    out: list[tuple[str, str]] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, sep, source = item.partition("=")
        _require(
            bool(sep and source and _SET_NAME.match(name)),
            f"eval.sets: bad entry {item!r}: write NAME=SOURCE (NAME of letters, digits, _ . -; "
            "SOURCE stdlib, synthetic or a prepared dataset), e.g. "
            "eval.sets=code=datasets/code,web=gs://bucket/web",
        )
        _require(
            name not in {n for n, _ in out}, f"eval.sets names {name!r} twice: names must differ"
        )
        out.append((name, source))
    return out


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints in WORKDIR/checkpoints (docs/checkpointing.md)."""

    every_steps: int = 500  # 0: only at the end and on preemption
    every_minutes: float = 0.0  # 0: off; else also save when this much time has passed
    keep: int = 3  # most recent checkpoints kept (0: all)
    keep_every_steps: int = 0  # also keep every checkpoint at a multiple of this (0: off)
    async_save: bool = True
    restore: str = ""  # a checkpoint step folder, checkpoints folder or workdir to start from
    # RUN[@STEP]: start a new run from another run's checkpoint (its latest without @STEP):
    # parameters, optimizer state and data position; read only while the workdir has no
    # checkpoint of its own, so a requeued branch resumes itself.
    branch_from: str = ""

    def check(self) -> None:
        _non_negative(
            self, "checkpoint", "every_steps", "every_minutes", "keep", "keep_every_steps"
        )
        _require(
            not (self.restore and self.branch_from),
            "give checkpoint.restore or checkpoint.branch_from, not both",
        )
        if self.branch_from:
            _, at, step = self.branch_from.rpartition("@")
            _require(
                not at or step.isdigit(),
                f"checkpoint.branch_from={self.branch_from!r}: write RUN or RUN@STEP with a "
                "step number, e.g. runs/stable@4000",
            )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (docs/scaling.md): sizes of the data, fsdp and tensor axes; -1 absorbs the
    remaining devices. `dcn_data` splits the data axis across that many hosts/slices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1

    def check(self) -> None:
        _require(self.dcn_data >= 1, f"mesh.dcn_data must be >= 1, got {self.dcn_data}")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """Multi-process setup. Empty/negative values: taken from PERIJAX_COORDINATOR_ADDRESS,
    PERIJAX_NUM_PROCESSES, PERIJAX_PROCESS_ID, else detected (SLURM, TPU pods), else one process."""

    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1

    def check(self) -> None:
        pass  # any value: the launcher's environment decides


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    mesh: MeshConfig = MeshConfig()
    distributed: DistributedConfig = DistributedConfig()


SECTIONS: dict[str, type] = {f.name: f.type for f in dataclasses.fields(Config)}
# The allowed values of the choice keys, as declared by their Literal types above.
PLACEMENTS = choices(ModelConfig, "ln_placement")
NORM_TYPES = choices(ModelConfig, "norm_type")
QK_NORMS = choices(ModelConfig, "qk_norm")
DTYPES = choices(ModelConfig, "dtype")
MATMUL_DTYPES = choices(ModelConfig, "matmul_dtype")
PARAM_DTYPES = choices(ModelConfig, "param_dtype")
REMAT = choices(ModelConfig, "remat")
ATTENTION = choices(ModelConfig, "attention")
DATA_SOURCES = choices(DataConfig, "source")
DATA_REMOTE = choices(DataConfig, "remote")
SCHEDULES = choices(OptimConfig, "schedule")
OPTIMIZERS = choices(OptimConfig, "name")
DECAY_SHAPES = choices(OptimConfig, "decay_shape")
ON_BAD_STEPS = choices(TrainConfig, "on_repeated_bad_steps")
# Where a run's metrics are sent, not what it computes: runs that differ only here are one
# experiment (perijax sweep and perijax report compare configs without them).
TRACKING_KEYS = ("train.wandb_project", "train.wandb_entity", "train.wandb_group")


def base_config() -> ml_collections.ConfigDict:
    """Every key with its default, as a ConfigDict for config files to edit."""
    return ml_collections.ConfigDict(dataclasses.asdict(Config()))


def from_section(cls: type[T], section: Any) -> T:
    """A dataclass whose fields are named as config keys (the train step's static settings)
    built from those keys of a config section, so the section's defaults are the only ones."""
    return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls) if f.init})


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flat_dict(config: dict[str, Any]) -> dict[str, Any]:
    """{"section.key": value} of a config dict as `to_dict` (and config.json) holds it."""
    return {
        f"{section}.{key}": value
        for section, values in config.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }


# ------------------------------------------------------------------------------------- typing
def _allowed_types(section: type, key: str) -> tuple[type, ...]:
    """The types a key's value may have; a `Literal[...]` key: its values' type (which value
    is allowed is the section's `check()`'s test, so a wrong one reads "expected one of ...")."""
    hint = typing.get_type_hints(section)[key]
    if allowed := choices(section, key):
        return tuple(dict.fromkeys(type(value) for value in allowed))
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _check_type(path: str, value: Any, allowed: tuple[type, ...]) -> Any:
    """Returns value (ints widened to float where a float is expected) or raises ConfigError."""
    for t in allowed:
        if t is type(None) and value is None:
            return None
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"config key '{path}' must be {names}, got {value!r}")


def _parse_text(path: str, text: str, allowed: tuple[type, ...]) -> Any:
    """Parses a command-line value by the key's declared type."""
    if type(None) in allowed and text.lower() in ("none", "null"):
        return None
    for t in allowed:
        try:
            if t is bool:
                if text.lower() in ("true", "1", "yes"):
                    return True
                if text.lower() in ("false", "0", "no"):
                    return False
            elif t is int:
                return int(text.replace("_", ""))
            elif t is float:
                return float(text)
            elif t is str:
                return text
        except ValueError:
            continue
    names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"config key '{path}' must be {names}, got {text!r}")


# Keys that were replaced: {old key: (the value that meant "off", what to use now)}. A saved
# config (config.json, a checkpoint's) holding the "off" value still loads; any other use is a
# one-line error naming the replacement.
REPLACED_KEYS = {
    "train.loss_spike_factor": (
        0.0,
        "train.skip_loss_spikes=true (a loss spike is loss > telemetry.loss_spike_factor x the "
        "running median of the last telemetry.spike_window losses, as telemetry counts it)",
    ),
}


def _unknown_key(path: str, known: list[str]) -> ConfigError:
    if path in REPLACED_KEYS:
        return ConfigError(f"config key '{path}' was replaced: use {REPLACED_KEYS[path][1]}")
    return ConfigError(f"unknown config key '{path}': expected one of {', '.join(sorted(known))}")


# -------------------------------------------------------------------------------- files, args
def parse_config_arg(arg: str | None, **defaults: Any) -> types.SimpleNamespace:
    """Parses a config-file argument `k=v,k2=v2` against typed defaults (big_vision style)."""
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, text = item.partition("=")
        if not sep or key not in defaults:
            raise ConfigError(
                f"bad config argument {item!r}: expected key=value with key in "
                f"{', '.join(sorted(defaults)) or '(none)'}"
            )
        values[key] = _parse_text(key, text, (type(defaults[key]),))
    return types.SimpleNamespace(**values)


def _find_config_file(path: str) -> Path:
    file = Path(path)
    if file.is_file():
        return file
    # Configs ship inside the package too, so `--config configs/paper.py` works from any
    # directory after a plain (non-editable) install.
    if file.parent.name == "configs" or str(file.parent) == ".":
        packaged = Path(str(importlib.resources.files("perijax.configs"))) / file.name
        if packaged.is_file():
            return packaged
    raise ConfigError(f"config file not found: {path}")


def _one_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads `path.py[:arg]` and calls its `get_config(arg)` (or `get_config()`), or reads a
    `config.json` that a run (or `perijax import`) wrote: keys it lacks take their defaults."""
    path, _, arg = spec.partition(":")
    file = _find_config_file(path)
    if file.suffix == ".json":
        if arg:
            raise ConfigError(f"config file {path} is JSON and takes no argument (':{arg}')")
        try:
            saved = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        if not isinstance(saved, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of sections")
        cd = base_config()
        with cd.unlocked():
            for section, values in saved.items():
                if section in cd and isinstance(values, dict):
                    cd[section].update(values)
                else:
                    cd[section] = values  # resolve() reports the unknown section
        return cd
    module_spec = importlib.util.spec_from_file_location(f"perijax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as e:  # a config file is user code: report where it failed, in one line
        raise ConfigError(f"cannot load config file {path}: {_one_line(e)}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    try:
        return module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # the same one line as a failure while loading the file
        raise ConfigError(
            f"cannot load config file {path}: get_config() raised {_one_line(e)}"
        ) from e


def apply_override(cd: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Applies one `--config.section.key=value` to a ConfigDict, typed by the schema."""
    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        if parts[0] in SECTIONS:
            known = [f"{parts[0]}.{f.name}" for f in dataclasses.fields(SECTIONS[parts[0]])]
        else:
            known = list(SECTIONS)
        raise _unknown_key(dotted, known)
    section, key = parts
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in names:
        raise _unknown_key(dotted, [f"{section}.{n}" for n in names])
    value = _parse_text(dotted, text, _allowed_types(SECTIONS[section], key))
    with cd.unlocked():
        cd[section][key] = value


# ---------------------------------------------------------------------------------- resolve
def load(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> "Config":
    """The config a `perijax train --config SPEC --config.KEY=VALUE ...` run gets: the config
    file (`FILE[:ARG]`, a saved config.json too), then each (dotted key, text) override in
    order, resolved and validated. Raises ConfigError with a one-line message."""
    cd = load_config_file(spec)
    for key, value in overrides:
        apply_override(cd, key, value)
    return resolve(cd)


def resolve(cd: ml_collections.ConfigDict | dict) -> Config:
    """ConfigDict -> frozen Config; rejects unknown keys, wrong types and invalid values."""
    raw = cd.to_dict() if isinstance(cd, ml_collections.ConfigDict) else dict(cd)
    for section in raw:
        if section not in SECTIONS:
            raise _unknown_key(section, list(SECTIONS))
    sections = {}
    for name, cls in SECTIONS.items():
        values = dict(raw.get(name) or {})
        names = [f.name for f in dataclasses.fields(cls)]
        for key in list(values):
            replaced = REPLACED_KEYS.get(f"{name}.{key}")
            if replaced is not None and key not in names and values[key] == replaced[0]:
                del values[key]  # a saved config from before the change, with the key off
        for key in values:
            if key not in names:
                raise _unknown_key(f"{name}.{key}", [f"{name}.{n}" for n in names])
        typed = {
            k: _check_type(f"{name}.{k}", v, _allowed_types(cls, k)) for k, v in values.items()
        }
        sections[name] = cls(**typed)
    cfg = Config(**sections)
    validate(cfg)
    return cfg


def wsd_decay_steps(optim: OptimConfig, total_steps: int) -> int:
    """The length of a wsd schedule's decay: optim.decay_steps, else decay_fraction of the run
    (at least one step)."""
    if optim.decay_steps is not None:
        return optim.decay_steps
    return max(1, round(optim.decay_fraction * total_steps))


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express: each section's own (its `check()`, beside
    its declaration), then those across sections."""
    for f in dataclasses.fields(cfg):
        getattr(cfg, f.name).check()
    m, d, o = cfg.model, cfg.data, cfg.optim
    if o.schedule == "wsd":
        total = cfg.train.total_steps
        decay = wsd_decay_steps(o, total)
        _require(
            o.warmup_steps + decay <= total,
            f"optim.schedule=wsd: warmup ({o.warmup_steps}) and decay ({decay} steps) exceed "
            f"train.total_steps={total}; shorten them or train longer",
        )
    _require(
        m.loss_chunk_len >= 0 and (m.loss_chunk_len == 0 or d.seq_len % m.loss_chunk_len == 0),
        f"model.loss_chunk_len={m.loss_chunk_len} must divide data.seq_len={d.seq_len} "
        "(or be 0: chosen automatically)",
    )
