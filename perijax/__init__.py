"""perijax: pretraining decoder-only language models with the LayerNorm placement as a setting.

Placements (see docs/ln_variants.md): Pre-LN, Post-LN, Peri-LN (Kim et al., arXiv 2502.02732)
and the OLMo-2 output-only placement, all on one model code path. README.md's "Code map" lists
the modules.
"""

import importlib.abc
import sys

__version__ = "0.1.0"

# Modules that moved when the commands left the library: importing (or `python -m`) an old path
# fails with one line naming the new one, instead of a bare "No module named".
MOVED = {
    "perijax.bench": "perijax.cli.bench",
    "perijax.commandline": "perijax.cli.common",
    "perijax.hf.commands": "perijax.cli.hf",
    "perijax.inference": "perijax.trained",
    "perijax.launch": "perijax.launchers.local",
    "perijax.launchers.tpu_cli": "perijax.launchers.tpu",
    "perijax.plan": "perijax.cli.plan",
    "perijax.report": "perijax.experiments.report",
    "perijax.report_figures": "perijax.experiments.figures",
    "perijax.runlog": "perijax.experiments.runlog",
    "perijax.sweep": "perijax.experiments.sweep",
    "perijax.sweep_grid": "perijax.experiments.grid",
}


class _MovedModules(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name in MOVED:
            raise ModuleNotFoundError(f"{name} is now {MOVED[name]}")
        return None


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())


def renamed(module: str, names: dict[str, str]):
    """A module `__getattr__` for names that were renamed ({old: what to use now}): using an old
    name fails with one line naming the new one."""

    def __getattr__(name: str):
        if name in names:
            raise AttributeError(f"{module}.{name} is now {module}.{names[name]}")
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
