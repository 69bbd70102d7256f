"""`perijax eval` reports the trainer's eval loss and scores every token once; the
lm-evaluation-harness adapter equals direct log-probs from the model, padding does not leak, and
a local multiple-choice task runs end to end offline."""

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

# Before anything imports `datasets` (lm-eval does): never reach the network, cache in /tmp.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault(
    "HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), "perijax-hf-datasets")
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from perijax import config as config_lib  # noqa: E402
from perijax import evaluate as eval_lib  # noqa: E402
from perijax import train as train_lib  # noqa: E402
from perijax.cli import eval as eval_cli  # noqa: E402
from perijax.data.corpus import TokenData  # noqa: E402
from perijax.data.datasets import Datasets  # noqa: E402
from perijax.trained import load_model, run_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny model trained 3 steps on the stdlib corpus (BPE 512) with grad accumulation, so
    the trainer's eval batch (the micro-batch, 8) differs from the global batch (16)."""
    cache = tmp_path_factory.mktemp("cache")
    workdir = tmp_path_factory.mktemp("eval") / "run"
    overrides = {
        "data.cache_dir": str(cache), "model.vocab_size": "512", "data.seq_len": "32",
        "model.num_layers": "2", "model.d_model": "32", "model.num_heads": "4",
        "model.num_kv_heads": "2", "model.d_ff": "64", "train.total_steps": "3",
        "train.global_batch_size": "16", "train.grad_accum_steps": "2",
        "train.eval_every_steps": "0", "train.eval_batches": "3", "train.log_every_steps": "1",
        "telemetry.enabled": "false", "optim.warmup_steps": "0",
        "checkpoint.async_save": "false",
    }  # fmt: skip
    cfg = config_lib.load(str(ROOT / "configs" / "tiny.py"), list(overrides.items()))
    result = train_lib.train(cfg, workdir, log=lambda s: None)
    return {"cfg": cfg, "workdir": workdir, "eval": result["eval"]}


def _one_device(model):
    """The model with its parameters on one device: reference forward passes run eagerly
    outside any mesh (no compile per length, no dispatch over 8 devices)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))


def _log_softmax64(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ------------------------------------------------------------------------------ perijax eval
def test_eval_equals_trainer_eval_at_that_step(run):
    cfg = run["cfg"]
    got = eval_lib.evaluate_checkpoint(
        run["workdir"], max_batches=cfg.train.eval_batches, log=lambda s: None
    )
    rows = [json.loads(line) for line in (run["workdir"] / "metrics.jsonl").open()]
    logged = [r["eval/loss"] for r in rows if "eval/loss" in r and r["step"] == 3]
    assert got["step"] == 3 and got["split"] == "val"
    assert got["batch_size"] == 8 and got["seq_len"] == 32
    assert got["tokens"] == 3 * 8 * 32
    assert got["loss"] == pytest.approx(run["eval"]["eval/loss"], rel=1e-6)
    assert got["loss"] == pytest.approx(logged[-1], rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))
    assert got["bits_per_token"] == pytest.approx(got["loss"] / math.log(2))


def test_eval_scores_every_token_whatever_the_batching(run):
    data = train_lib.load_data(run["cfg"], log=lambda s: None)
    kw = dict(seq_len=128, data=data, log=lambda s: None)
    full = eval_lib.evaluate_checkpoint(run["workdir"], batch_size=64, **kw)
    # 20 rows per batch do not divide over the 8 devices: padded rows must not count.
    odd = eval_lib.evaluate_checkpoint(run["workdir"], batch_size=20, **kw)
    assert full["tokens"] == odd["tokens"] == data.val_tokens - 1
    assert odd["loss"] == pytest.approx(full["loss"], rel=1e-6)
    assert full["batches"] == math.ceil(math.ceil((data.val_tokens - 1) / 128) / 64)


def test_eval_windows_and_padding_match_a_direct_forward(run):
    """Every target of a short split once, with a short last window and a padded last batch,
    against the model applied to each window alone (float64 log-softmax)."""
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 512, 300), rng.integers(0, 512, 100)
    tokens = TokenData(train=train, val=val, vocab_size=512, name="random", tokenizer_path=None)
    data = Datasets.from_token_data(tokens)
    model = _one_device(load_model(run["workdir"]).model)

    def reference(stream, windows):
        total, count = 0.0, 0
        for w in windows:
            logp = _log_softmax64(model(jnp.asarray(stream[w[0] : w[1]][None, :-1])))[0]
            total += sum(logp[i, t] for i, t in enumerate(stream[w[0] + 1 : w[1]]))
            count += w[1] - w[0] - 1
        return -total / count, count

    got = eval_lib.evaluate_checkpoint(
        run["workdir"], batch_size=3, seq_len=32, data=data, log=lambda s: None
    )
    want, count = reference(val, [(0, 33), (32, 65), (64, 97), (96, 100)])
    assert (got["tokens"], got["batches"]) == (count, 2) == (99, 2)
    assert got["loss"] == pytest.approx(want, rel=1e-5)

    got = eval_lib.evaluate_checkpoint(
        run["workdir"], split="train", batch_size=2, seq_len=32, max_batches=1, data=data,
        log=lambda s: None,
    )  # fmt: skip
    want, count = reference(train, [(0, 33), (32, 65)])
    assert got["tokens"] == count == 64
    assert got["loss"] == pytest.approx(want, rel=1e-5)


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="perijax")
    eval_cli.add_parser(parser.add_subparsers(dest="command"))
    return eval_cli.run(parser.parse_args(argv))


def test_cli_reports_loss_and_writes_json(run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert _cli(["eval", str(run["workdir"]), "--max-batches", "3", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["loss"] == pytest.approx(run["eval"]["eval/loss"], rel=1e-6)
    assert f"loss        {result['loss']:.6f} nats/token" in printed
    assert "perplexity" in printed and "bits/token" in printed


def test_cli_data_evaluates_a_prepared_dataset(run, tmp_path, capsys):
    from perijax.data.prepare import prepare

    texts = tmp_path / "texts.jsonl"
    with texts.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"def f_{i}(x):\n    return x * {i} + {i % 7}\n"}) + "\n")
    tokenizer = train_lib.load_data(run["cfg"], log=lambda s: None).tokenizer_path
    manifest = prepare(
        [str(texts)], tmp_path / "ds", tokenizer=tokenizer, val_fraction=0.25, log=lambda s: None
    )
    out = tmp_path / "eval.json"
    argv = ["eval", str(run["workdir"]), "--data", str(tmp_path / "ds"), "--json", str(out)]
    assert _cli(argv) == 0
    result = json.loads(out.read_text())
    assert result["data"] == manifest["name"]
    assert result["tokens"] == manifest["splits"]["val"]["tokens"] - 1 > 0
    assert math.isfinite(result["loss"])
    capsys.readouterr()
    assert _cli(["eval", str(run["workdir"]), "--data", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"perijax: error: --data {tmp_path / 'nothing'}")


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "perijax: error: checkpoint {missing}: no such file or directory"),
        (["--split", "test"], "perijax: error: unknown --split 'test': expected one of val, train"),
        (["--num-fewshot", "5"], "perijax: error: --num-fewshot needs --tasks"),
        (["--tasks", "x", "--max-batches", "2"], "perijax: error: --max-batches has no effect"),
    ],
)
def test_cli_errors_are_one_line(run, tmp_path, capsys, args, message):
    missing = tmp_path / "nowhere"
    target = missing if "{missing}" in message else run["workdir"]
    assert _cli(["eval", str(target), *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert captured.err.startswith(message.format(missing=missing))


def test_cli_without_lm_eval_is_an_error(run, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # import raises ImportError
    assert _cli(["eval", str(run["workdir"]), "--tasks", "hellaswag"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install lm_eval" in err


# ---------------------------------------------------------------------------- lm-eval adapter
@pytest.fixture(scope="module")
def adapter(run):
    """The adapter around the run's model with weights scaled up (peaked logits, so that
    attention to padding or a wrong position would change the scores visibly)."""
    pytest.importorskip("lm_eval")
    from perijax.lm_eval_adapter import PerijaxLM

    loaded = load_model(run["workdir"])
    graphdef, state = nnx.split(loaded.model)
    model = nnx.merge(graphdef, jax.tree.map(lambda x: x * 3.0 if x.ndim > 1 else x, state))
    tok = run_tokenizer(loaded.cfg)
    lm = PerijaxLM.from_model(model, tok, loaded.mesh, max_length=32, batch_size=4)
    return lm, _one_device(model), tok


def _requests(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _direct_logprobs(model, tokens: list[int]) -> np.ndarray:
    """log p(tokens[i + 1] | tokens[:i + 1]) for every i, from one plain forward pass."""
    logp = _log_softmax64(model(jnp.asarray([tokens[:-1]])))[0]
    return logp[np.arange(len(tokens) - 1), tokens[1:]], logp.argmax(-1) == tokens[1:]


PAIRS = [
    ("def main(argv):\n    return", " argv[0]"),
    ("import os", "\nimport sys\nimport re"),
    ("", "class Foo:"),  # empty context: conditioned on end-of-document
    ("x = ", "1"),  # the trailing space moves to the continuation
    (
        "    def __repr__(self):\n        return '%s(%r, %r)' % (self.__class__.__name__, "
        "self.name, self.value)\n\n    def __eq__(self, other):\n",  # longer than max_length
        "        return NotImplemented",
    ),
]


def test_loglikelihood_equals_direct_logprobs_and_padding_does_not_leak(adapter):
    lm, model, tok = adapter
    got = lm.loglikelihood(_requests("loglikelihood", PAIRS))
    lengths = set()
    for (context, continuation), (logprob, greedy) in zip(PAIRS, got, strict=True):
        if context:
            ctx, cont = lm._encode_pair(context, continuation)
        else:
            ctx, cont = [tok.eod_id], tok.encode(continuation).tolist()
        whole = (ctx + cont)[-(lm.max_length + 1) :]
        lengths.add(len(whole))
        logps, argmax = _direct_logprobs(model, whole)
        assert logprob == pytest.approx(logps[-len(cont) :].sum(), abs=1e-4)
        assert greedy == bool(argmax[-len(cont) :].all())
        alone = lm.loglikelihood(_requests("loglikelihood", [(context, continuation)]))[0]
        assert alone[0] == pytest.approx(logprob, abs=1e-5) and alone[1] == greedy
    assert max(lengths) == lm.max_length + 1 and len(lengths) >= 4  # truncated, mixed lengths


def test_is_greedy_on_token_level(adapter):
    lm, model, tok = adapter
    context = tok.encode("for item in items:\n    ").tolist()
    best = int(np.asarray(model(jnp.asarray([context])))[0, -1].argmax())
    other = (best + 1) % 512
    (_, greedy), (_, not_greedy) = lm._loglikelihood_tokens(
        [(None, context, [best]), (None, context, [other])]
    )
    assert greedy and not not_greedy


def test_loglikelihood_rolling_equals_direct_sums(adapter):
    lm, model, tok = adapter
    short = "def f(x):\n    return x + 1\n"
    long = "import os\n" + "".join(f"value_{i} = os.path.join('a', '{i}')\n" for i in range(6))
    ids_short, ids_long = tok.encode(short).tolist(), tok.encode(long).tolist()
    assert len(ids_short) <= lm.max_length < 2 * lm.max_length < len(ids_long)
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,), (long,)]))

    eod, L = tok.eod_id, lm.max_length
    assert got[0] == pytest.approx(_direct_logprobs(model, [eod] + ids_short)[0].sum(), abs=1e-4)
    # Disjoint windows of L predictions; the last one has a full window of context.
    n, want, start = len(ids_long), 0.0, 0
    while start < n:
        stop = min(start + L, n)
        first = max(0, stop - L - 1) if start else 0
        window = ([eod] if not start else []) + ids_long[first:stop]
        want += _direct_logprobs(model, window)[0][-(stop - start) :].sum()
        start = stop
    assert got[1] == pytest.approx(want, abs=1e-4)


def test_generate_until_equals_greedy_decoding(adapter):
    lm, model, tok = adapter
    prompts = ["def main():\n", "class A:\n    def f(self):\n        return"]
    kwargs = {"until": ["\n\n", ")"], "max_gen_toks": 8}
    got = lm.generate_until(_requests("generate_until", [(p, kwargs) for p in prompts]))
    for prompt, text in zip(prompts, got, strict=True):
        seq = tok.encode(prompt).tolist()[-(lm.max_length - 8) :]
        new = []
        for _ in range(8):  # greedy, one full forward per token (right-padded to one shape)
            row = seq + new
            logits = model(jnp.asarray([row + [0] * (lm.max_length - len(row))]))
            token = int(np.asarray(logits)[0, len(row) - 1].argmax())
            if token == tok.eod_id:
                break
            new.append(token)
        want = tok.decode(new).split("\n\n")[0].split(")")[0]
        assert text == want
        assert "\n\n" not in text and ")" not in text


def test_local_multiple_choice_task_through_lm_eval(run):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    kwargs = dict(
        model="perijax",
        model_args=f"checkpoint={run['workdir']},batch_size=4",
        tasks=["perijax_tiny_mc"],
        task_manager=manager,
        log_samples=False,
    )
    first = lm_eval.simple_evaluate(**kwargs)["results"]["perijax_tiny_mc"]
    from perijax.lm_eval_adapter import PerijaxLM

    lm = PerijaxLM(checkpoint=str(run["workdir"]), batch_size=4)
    again = lm_eval.simple_evaluate(**{**kwargs, "model": lm})["results"]["perijax_tiny_mc"]
    assert 0.0 <= first["acc,none"] <= 1.0 and 0.0 <= first["acc_norm,none"] <= 1.0
    assert (first["acc,none"], first["acc_norm,none"]) == (
        again["acc,none"],
        again["acc_norm,none"],
    )

    # The same accuracy from the adapter's loglikelihood directly.
    docs = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").open()]
    correct = 0
    for doc in docs:
        scores = lm.loglikelihood(
            _requests("loglikelihood", [(doc["context"], c) for c in doc["choices"]])
        )
        correct += int(np.argmax([s for s, _ in scores]) == doc["answer"])
    assert first["acc,none"] == pytest.approx(correct / len(docs))


@pytest.mark.slow
def test_cli_tasks_runs_local_task_and_rejects_unknown(run, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    out = tmp_path / "lm_eval.json"
    argv = ["eval", str(run["workdir"]), "--tasks", "perijax_tiny_mc"]
    argv += ["--include-path", str(TASKS), "--batch-size", "4", "--json", str(out)]
    assert _cli(argv) == 0
    assert "perijax_tiny_mc" in capsys.readouterr().out
    acc = json.loads(out.read_text())["results"]["perijax_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0

    argv = ["eval", str(run["workdir"]), "--tasks", "no_such_task_anywhere"]
    assert _cli(argv + ["--include-path", str(TASKS)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("perijax: error: unknown lm-eval task 'no_such_task_anywhere'")
