"""The docs quote the code: each placement's code line in docs/ln_variants.md is in norms.py,
and the README's two commands are the ones .ci/run runs. Every document a file cites is a file of
the repository."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

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


# Names that look like Markdown documents but are not documents of this repository by nature.
# Every other Markdown name a repository file mentions must be a file of the repository.
NOT_REPOSITORY_DOCUMENTS = {
    "summary.md",  # the table `perijax report` writes into its --out folder (a run's output)
    "b.md",  # a file tests/test_data_prepare.py creates in a temporary corpus folder
}
MARKDOWN_NAME = re.compile(r"(?<![\w./-])([\w./-]+\.md)(?![\w-])")
URL = re.compile(r"https?://\S+")
OUTSIDE_FOLDER = re.compile(r"\.\./shared\b")  # the private folder beside a development checkout
SKIPPED_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".csv", ".npy", ".npz", ".safetensors"}


def repository_text_files():
    """Every file git tracks (or would track: new, not ignored) that exists and is text."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in sorted(set(filter(None, listed.split("\0")))):
        path = ROOT / name
        if path.suffix.lower() in SKIPPED_SUFFIXES or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            yield path, data.decode("utf-8")
        except UnicodeDecodeError:
            continue


def test_every_cited_document_is_in_the_repository():
    """A document a file names (a Markdown file, a path into the folder beside the checkout) is
    a file of this repository, so a user's clone has everything its code, tests and docs cite."""
    missing = []
    for path, text in repository_text_files():
        where = path.relative_to(ROOT)
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_FOLDER.search(line):
                missing.append(f"{where}:{number}: a path outside the repository")
            for name in MARKDOWN_NAME.findall(URL.sub("", line)):
                if name in NOT_REPOSITORY_DOCUMENTS:
                    continue
                candidates = (ROOT / name, path.parent / name, ROOT / "docs" / name)
                if not any(candidate.is_file() for candidate in candidates):
                    missing.append(f"{where}:{number}: {name}")
    assert not missing, "documents not in the repository:\n" + "\n".join(missing)
