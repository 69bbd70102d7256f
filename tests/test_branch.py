"""WSD decay branches: `checkpoint.branch_from` (`perijax train --branch-from RUN[@STEP]`) starts
a new run from another run's checkpoint, with its own schedule tail."""

import json

import pytest
from test_checkpoint import config, losses_by_step, rows

from perijax import train as train_lib
from perijax.config import ConfigError

WSD = {"optim.schedule": "wsd", "optim.warmup_steps": "2", "optim.decay_steps": "4",
       "optim.lr": "3e-3", "train.total_steps": "16", "checkpoint.every_steps": "4",
       "checkpoint.keep": "0"}  # fmt: skip


@pytest.fixture(scope="module")
def stable(tmp_path_factory):
    """A 16-step wsd run (stable to step 12, decay 12-16) with checkpoints every 4 steps."""
    workdir = tmp_path_factory.mktemp("stable")
    train_lib.train(config(**WSD), workdir, log=lambda s: None)
    return workdir


def _lr(workdir) -> dict[int, float]:
    return {r["step"]: r["train/lr"] for r in rows(workdir) if "train/lr" in r}


@pytest.mark.slow
def test_a_branch_continues_bit_exactly_and_takes_its_own_schedule_tail(stable, tmp_path):
    """Branched at step 8 with the source's config: steps 9-16 equal the source's, bit for bit.
    Branched at step 8 with total_steps=12: it decays over steps 8-12 instead, so its first two
    losses (made by updates at the stable rate) equal the source's and the later ones do not.
    A relaunch with the same --branch-from resumes the branch's own checkpoints."""
    source = losses_by_step(stable)
    logs: list[str] = []
    same = tmp_path / "same"
    train_lib.train(config(**WSD, **{"checkpoint.branch_from": f"{stable}@8"}), same,
                    log=logs.append)  # fmt: skip
    got = losses_by_step(same)
    assert sorted(got) == list(range(9, 17))
    assert got == {s: source[s] for s in range(9, 17)}
    assert any(f"branched from {stable}/checkpoints/8" in line for line in logs), logs
    record = json.loads((same / "branch.json").read_text())
    assert record["branch_from"] == f"{stable}@8" and record["step"] == 8
    assert record["checkpoint"] == f"{stable}/checkpoints/8"

    short = tmp_path / "short"
    cfg = config(**{**WSD, "train.total_steps": "12", "checkpoint.branch_from": f"{stable}@8"})
    train_lib.train(cfg, short, log=lambda s: None)
    got = losses_by_step(short)
    assert [got[s] == source[s] for s in range(9, 13)] == [True, True, False, False]
    # The rate of the update at step s is the schedule at s - 1: 1-sqrt over steps 8-12.
    tail = {s: 3e-4 + 2.7e-3 * (1 - ((s - 9) / 4) ** 0.5) for s in range(9, 13)}
    assert _lr(short) == pytest.approx(tail) and _lr(stable)[12] == pytest.approx(3e-3)

    logs.clear()
    train_lib.train(config(**WSD, **{"checkpoint.branch_from": f"{stable}@8"}), same,
                    log=logs.append)  # fmt: skip
    assert any(f"resumed from {same}/checkpoints/16" in line for line in logs), logs


def test_branch_errors_are_one_line(stable, tmp_path):
    with pytest.raises(ConfigError, match=r"no checkpoints in .*nowhere/checkpoints"):
        train_lib.train(config(**{"checkpoint.branch_from": str(tmp_path / "nowhere")}),
                        tmp_path / "a", log=lambda s: None)  # fmt: skip
    with pytest.raises(ConfigError, match=r"has no checkpoint at step 7 \(it has 4, 8, 12, 16\)"):
        train_lib.train(config(**{"checkpoint.branch_from": f"{stable}@7"}), tmp_path / "b",
                        log=lambda s: None)  # fmt: skip
    with pytest.raises(ConfigError, match=r"write RUN or RUN@STEP with a step number"):
        config(**{"checkpoint.branch_from": f"{stable}@last"})
    with pytest.raises(ConfigError, match="not both"):
        config(**{"checkpoint.branch_from": str(stable), "checkpoint.restore": str(stable)})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
