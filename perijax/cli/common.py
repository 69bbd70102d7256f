"""What every `perijax` subcommand shares: the one error path (one line on stderr, an exit
status), the `--config.SECTION.KEY=VALUE` override syntax and the default config file.
`perijax.cli` assembles the subcommands on top of this module; library modules never import
`perijax.cli`.
"""

from __future__ import annotations

import sys

DEFAULT_CONFIG = "configs/tiny.py"


ERROR = "perijax: error: "  # how every command error line starts


def fail(message: str, code: int = 2) -> int:
    """Prints `perijax: error: MESSAGE` (one line) to stderr and returns the exit status: 2 for
    bad input, before anything was computed or written."""
    print(f"{ERROR}{message}", file=sys.stderr)
    return code


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments
    (everything after a bare `--` is left alone, for launch-local). Raises ValueError for an
    override without a value."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg.startswith("--config."):
            key, sep, value = arg[len("--config.") :].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    raise ValueError(f"--config.{key} needs a value: --config.{key}=VALUE")
                value, i = argv[i + 1], i + 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides
