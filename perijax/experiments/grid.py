"""Sweep files: a base config, fixed overrides, a grid (or a list of grids) expanded into named
runs, and an optional refine stage (docs/experiments.md). Loading checks everything a sweep file
can get wrong, with one-line errors, before anything runs; `perijax sweep`
(perijax.experiments.sweep) runs what this module describes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.resources
import importlib.util
import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from perijax import config as config_lib
from perijax.config import ConfigError


# ------------------------------------------------------------------------------------ the grid
@dataclasses.dataclass(frozen=True)
class Run:
    """One point of the grid."""

    index: int  # position in the full grid (stable: a cluster array index)
    name: str  # its workdir name under the sweep root
    values: dict[str, Any]  # grid key -> value
    overrides: tuple[tuple[str, str], ...]  # every override of the base config, in order


@dataclasses.dataclass(frozen=True)
class Refine:
    """More runs once the grid has finished: for each setting of the other grid keys, `grid`'s
    runs (e.g. more seeds) at the value of `best` (e.g. optim.lr) whose finished runs have the
    lowest mean final `metric`."""

    best: str
    grid: dict[str, list[Any]]
    metric: str = "eval/loss"


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A parsed sweep file plus the command line's overrides."""

    name: str
    base: str
    overrides: dict[str, Any]
    grids: tuple[dict[str, list[Any]], ...]  # one or more, all with the same keys in order
    extra: tuple[tuple[str, str], ...] = ()  # --config.section.key=value, applied to every run
    refine: Refine | None = None

    @property
    def grid(self) -> dict[str, list[Any]]:
        """Every value each key takes in any of the grids (the keys of every grid)."""
        merged: dict[str, list[Any]] = {k: [] for k in self.grids[0]}
        for grid in self.grids:
            for key, values in grid.items():
                merged[key] += [v for v in values if v not in merged[key]]
        return merged

    def runs(self) -> list[Run]:
        """The cartesian product of each grid, first key varying slowest, one grid after the
        other."""
        combos = [
            dict(zip(g, c, strict=True)) for g in self.grids for c in itertools.product(*g.values())
        ]
        return [self.run(i, values) for i, values in enumerate(combos)]

    def run(self, index: int, values: dict[str, Any]) -> Run:
        """The run at these grid values: the base, the fixed overrides, then the values."""
        fixed = [(k, value_text(v)) for k, v in self.overrides.items()] + list(self.extra)
        grid_overrides = [(k, value_text(v)) for k, v in values.items()]
        return Run(index, run_name(values), values, tuple(fixed + grid_overrides))


ROOT = "{root}"  # in a sweep value: the sweep's root folder (e.g. checkpoint.branch_from)


def with_root(overrides: Sequence[tuple[str, str]], root: Any) -> tuple[tuple[str, str], ...]:
    """`overrides` with every "{root}" replaced by the absolute sweep root (a run folder of
    the same sweep, for checkpoint.branch_from); unchanged without a root."""
    if root is None:
        return tuple(overrides)
    where = str(Path(root).absolute())
    return tuple((key, text.replace(ROOT, where)) for key, text in overrides)


def value_text(value: Any) -> str:
    """A grid/override value as command-line text that parses back to the same value (so an
    in-process run and its emitted `perijax train` command build the same config)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest text that round-trips: 0.002, 1e-05
    return str(value)


def run_name(values: dict[str, Any]) -> str:
    """`ln_placement=peri,lr=0.002,seed=1`: the last part of each key, unless two grid keys share
    it (then the full key); characters that are unsafe in file names become `_`."""
    short = [k.rpartition(".")[2] for k in values]
    parts = []
    for key, label in zip(values, short, strict=True):
        label = label if short.count(label) == 1 else key
        parts.append(f"{label}={value_text(values[key]).replace(ROOT + '/', '')}")
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))


def _flatten(tree: Any, what: str, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": x}} and {"optim.lr": x} both give {"optim.lr": x} (ConfigDicts cannot
    hold dotted keys, so sweep files written with them nest instead)."""
    if hasattr(tree, "to_dict"):
        tree = tree.to_dict()
    if not isinstance(tree, dict):
        raise ConfigError(f"sweep {what} must be a dict of section.key entries, got {tree!r}")
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) or hasattr(value, "to_dict"):
            flat.update(_flatten(value, what, path + "."))
        else:
            flat[path] = value
    return flat


def _find_sweep_file(path: str) -> Path:
    file = Path(path)
    if file.is_file():
        return file
    # Like config files: shipped sweeps are found inside the package from any directory.
    if file.parent.name == "sweeps":
        packaged = Path(str(importlib.resources.files("perijax.configs"))) / "sweeps" / file.name
        if packaged.is_file():
            return packaged
    raise ConfigError(f"sweep file not found: {path}")


def read_sweep_file(path: str | Path) -> dict:
    """What a sweep file's get_sweep() returns, as a dict (not yet checked: see `load_sweep`).
    Sweep files call it to build on another, e.g. the shipped sweeps on `ln_placement_small.py`:
    `read_sweep_file(Path(__file__).with_name("ln_placement_small.py"))`."""
    file = _find_sweep_file(str(path))
    spec = importlib.util.spec_from_file_location(f"perijax_sweep_{file.stem}", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        raw = module.get_sweep()
    except AttributeError as e:
        if not hasattr(module, "get_sweep"):
            raise ConfigError(f"sweep file {path} defines no get_sweep()") from e
        raise ConfigError(f"cannot load sweep file {path}: AttributeError: {e}") from e
    except ConfigError:
        raise
    except Exception as e:  # user code: report where it failed, in one line
        raise ConfigError(f"cannot load sweep file {path}: {type(e).__name__}: {e}") from e
    raw = raw.to_dict() if hasattr(raw, "to_dict") else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"get_sweep() in {path} must return a dict, got {type(raw).__name__}")
    return raw


def load_sweep(path: str, extra: Sequence[tuple[str, str]] = ()) -> Sweep:
    """Loads a sweep file and checks its shape (not yet the configs: see `build_configs`)."""
    file = _find_sweep_file(path)
    raw = read_sweep_file(path)
    unknown = sorted(set(raw) - {"base", "overrides", "grid", "name", "refine"})
    if unknown:
        raise ConfigError(
            f"sweep file {path}: unknown entries {', '.join(unknown)}: expected base, "
            "overrides, grid, refine, name"
        )
    base = raw.get("base")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"sweep file {path}: 'base' must be a config spec like configs/tiny.py")
    grids = _grids(raw.get("grid"), path)
    overrides = _flatten(raw.get("overrides") or {}, "overrides")
    values = [(k, v) for g in grids for k, vs in g.items() for v in vs] + list(overrides.items())
    for key, value in values:
        if value is not None and not isinstance(value, (str, int, float, bool)):
            raise ConfigError(f"sweep value for '{key}' must be a plain value, got {value!r}")
    clash = sorted(set(grids[0]) & ({k for k, _ in extra} | set(overrides)))
    if clash:
        raise ConfigError(
            f"'{clash[0]}' is swept by the grid and cannot also be fixed (in the sweep's "
            "overrides or with --config.*)"
        )
    name = raw.get("name") or file.stem
    refine = _refine(raw.get("refine"), grids[0], path)
    sweep = Sweep(str(name), base, overrides, grids, tuple(extra), refine)
    names = [r.name for r in sweep.runs()]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"sweep {name}: the grids give run {dup} twice")
    return sweep


def _refine(raw: Any, grid: dict[str, list[Any]], path: str) -> Refine | None:
    """`refine`: {"best": grid key, "grid": {grid key: [values]}, "metric": "eval/loss"}."""
    if raw is None:
        return None
    raw = raw.to_dict() if hasattr(raw, "to_dict") else raw
    where = f"sweep file {path}: refine"
    if not isinstance(raw, dict) or set(raw) - {"best", "grid", "metric"} or "best" not in raw:
        raise ConfigError(f"{where} must be a dict with 'best', 'grid' and optionally 'metric'")
    best, metric = raw["best"], raw.get("metric", "eval/loss")
    if best not in grid:
        raise ConfigError(f"{where}: best '{best}' is not a grid key ({', '.join(grid)})")
    if not isinstance(metric, str) or not metric.startswith(("train/", "eval/")):
        raise ConfigError(f"{where}: metric must be a train/ or eval/ metric, got {metric!r}")
    more = _flatten(raw.get("grid") or {}, "refine grid")
    if not more:
        raise ConfigError(f"{where}: 'grid' is empty: give the runs to add, e.g. more seeds")
    for key, values in more.items():
        if key not in grid or key == best:
            raise ConfigError(
                f"{where}: grid key '{key}' must be one of the grid's keys other than '{best}'"
            )
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{where}: grid '{key}' must be a non-empty list, got {values!r}")
        for value in values:
            if value is not None and not isinstance(value, (str, int, float, bool)):
                raise ConfigError(f"sweep value for '{key}' must be a plain value, got {value!r}")
    return Refine(best, {k: list(v) for k, v in more.items()}, metric)


def _grids(raw: Any, path: str) -> tuple[dict[str, list[Any]], ...]:
    """`grid`: one {key: [values]} dict, or a list of them with the same keys in the same order
    (their union: e.g. float16 over fewer learning rates than float32)."""
    given = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    grids = []
    for one in given:
        grid = _flatten(one or {}, "grid")
        if not grid:
            raise ConfigError(
                f"sweep file {path}: 'grid' is empty: give at least one key and values"
            )
        for key, values in grid.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"sweep grid '{key}' must be a non-empty list, got {values!r}")
            texts = [value_text(v) for v in values]
            dup = sorted({t for t in texts if texts.count(t) > 1})
            if dup:
                raise ConfigError(f"sweep grid '{key}' repeats {', '.join(dup)}")
            grid[key] = list(values)
        if grids and list(grid) != list(grids[0]):
            raise ConfigError(
                f"sweep file {path}: every grid must list the same keys in the same order "
                f"({', '.join(grids[0])}), one has {', '.join(grid)}"
            )
        grids.append(grid)
    if not grids:
        raise ConfigError(f"sweep file {path}: 'grid' is empty: give at least one key and values")
    return tuple(grids)


def select(runs: Sequence[Run], only: Sequence[str], allow_none: bool = False) -> list[Run]:
    """Runs whose name contains one of the `only` patterns (shell wildcards allowed); none is
    an error unless `allow_none` (the patterns may name refine runs, decided later)."""
    if not only:
        return list(runs)
    chosen = [r for r in runs if any(fnmatch.fnmatchcase(r.name, f"*{p}*") for p in only)]
    if not chosen and not allow_none and runs:
        raise ConfigError(
            f"--only {' '.join(only)} matches no run; runs are named like {runs[0].name}"
        )
    return chosen


def build_configs(sweep: Sweep, runs: Sequence[Run], root: Any = None) -> dict[str, Any]:
    """Every run's resolved `Config`, so a bad grid value stops the sweep before any run starts
    ("{root}" in a value is the sweep's `root`). The config file is loaded once per run (config
    files may return shared mutable state)."""

    configs = {}
    for run in runs:
        try:
            configs[run.name] = config_lib.load(sweep.base, list(with_root(run.overrides, root)))
        except ConfigError as e:
            raise ConfigError(f"run {run.name}: {e}") from e
    return configs
