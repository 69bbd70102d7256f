"""The docs quote the code: each placement's code line in docs/ln_variants.md is in norms.py,
and the README's two commands are the ones .ci/run runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ln_variants_quotes_the_residual_code_lines():
    doc = (ROOT / "docs" / "ln_variants.md").read_text()
    code = (ROOT / "perijax" / "norms.py").read_text()
    rows = re.findall(r"^\| `(pre|post|peri|output)`.*\| `(y = [^`]+)` \|$", doc, flags=re.M)
    assert [placement for placement, _ in rows] == ["pre", "post", "peri", "output"]
    for placement, line in rows:
        match = re.search(rf'case "{placement}":.*\n\s+(y = .+)\n', code)
        assert match and match.group(1) == line, (placement, line)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^```bash\n(.+?)\n```", readme, flags=re.M | re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in ci
