"""eval.sets: extra held-out sets evaluated at every evaluation as eval/NAME/loss, and read by
`perijax report`."""

import json

import pytest
from test_checkpoint import config
from test_data_loader import _docs, _prepare

from perijax import train as train_lib
from perijax.config import ConfigError
from perijax.experiments import report


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return {
        "words": _prepare(root, "words", _docs(0, 300, "abcdefghijklmnopqrstuvwxyz")),
        "digits": _prepare(root, "digits", _docs(1, 300, "0123456789")),
    }


def _cfg(datasets, **overrides):
    return config(**{"data.source": "prepared", "data.path": str(datasets["words"]),
                     "model.vocab_size": "257", "train.total_steps": "4",
                     "train.eval_every_steps": "2", "train.eval_batches": "2",
                     **overrides})  # fmt: skip


def test_each_set_is_logged_at_every_evaluation_and_reported(datasets, tmp_path):
    """A set naming the training data itself gives exactly eval/loss (the same validation
    batches); another dataset gives its own loss; `perijax report` has a column per set."""
    sets = f"digits={datasets['digits']},same={datasets['words']}"
    logs: list[str] = []
    train_lib.train(_cfg(datasets, **{"eval.sets": sets}), tmp_path / "run", log=logs.append)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for r in evals:
        assert r["eval/same/loss"] == r["eval/loss"]
        assert r["eval/digits/loss"] != r["eval/loss"]
        assert r["eval/digits/perplexity"] > 1
    assert any(line.startswith("eval  step 4") and "  digits " in line for line in logs), logs

    groups = report.report(tmp_path / "run", tmp_path / "out", figures=False, log=lambda s: None)
    assert groups[0]["eval_sets"]["digits"].mean == evals[-1]["eval/digits/loss"]
    table = (tmp_path / "out" / "summary.md").read_text()
    assert "final eval loss (digits)" in table and "final eval loss (same)" in table
    assert "eval_loss_digits_mean" in (tmp_path / "out" / "summary.csv").read_text()


def test_bad_sets_are_one_line_errors_before_anything_is_written(datasets, tmp_path):
    for sets, message in [
        ("digits", r"eval.sets: bad entry 'digits': write NAME=SOURCE"),
        ("a=stdlib,a=synthetic", r"eval.sets names 'a' twice"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _cfg(datasets, **{"eval.sets": sets})
    cfg = config(**{"data.source": "synthetic", "model.vocab_size": "257",
                    "eval.sets": f"words={datasets['words']}"})  # fmt: skip
    with pytest.raises(ConfigError, match=r"^eval.sets: words=.*: it is tokenized as words "
                       r"\(bytes\), the training data as synthetic"):  # fmt: skip
        train_lib.train(cfg, tmp_path / "mismatch", log=lambda s: None)
    with pytest.raises(ConfigError, match=r"^eval.sets: gone=.*not found"):
        train_lib.train(_cfg(datasets, **{"eval.sets": f"gone={tmp_path / 'gone'}"}),
                        tmp_path / "gone-run", log=lambda s: None)  # fmt: skip
    assert not (tmp_path / "mismatch").exists() and not (tmp_path / "gone-run").exists()
