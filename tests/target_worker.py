"""Compiles train steps for real targets, one request per line, in the environment that holds
the target compilers (`.venv-targets`, README.md): reads `{"config", "target", "overrides"}` as
JSON lines on stdin and answers each with `perijax.cli.plan.plan_target`'s report (or
`{"error": ...}`) as one JSON line on stdout. tests/test_target_compile.py drives it, so one
process (one JAX start-up) serves every compile."""

import json
import sys

import jax

jax.config.update("jax_platforms", "cpu")

from perijax import config as config_lib  # noqa: E402
from perijax import targets  # noqa: E402
from perijax.cli.plan import plan_target  # noqa: E402


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        try:
            target = targets.parse(request["target"])
            missing = targets.missing_compiler(target)
            if missing:
                raise RuntimeError(missing)
            cfg = config_lib.load(request["config"], [tuple(o) for o in request["overrides"]])
            answer = plan_target(cfg, target)
        except Exception as e:  # reported to the test, which fails with it
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
