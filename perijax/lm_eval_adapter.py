"""An lm-evaluation-harness model for perijax checkpoints, registered as "perijax".

    perijax eval runs/tiny --tasks hellaswag --limit 200          # the usual way
    python -m perijax.lm_eval_adapter run --model perijax \\
        --model_args checkpoint=runs/tiny,batch_size=32 --tasks hellaswag   # lm-eval's own CLI

Model arguments: checkpoint (a checkpoints/<step> folder or a workdir), batch_size (default 16),
max_length (default the run's data.seq_len), dtype (float32 | bfloat16 | auto), tokenizer (a
tokenizer.json instead of the run's own), max_gen_toks (default 256).

Scoring is batched and jitted. A request's tokens are right-padded to the smallest of a few
bucket lengths (powers of two from 16, and max_length) and each batch to a fixed number of rows,
so a whole evaluation compiles at most a handful of times. Padding cannot reach a scored
position: every operation of the model acts within a row; padding sits to the right of a row's
last real token and attention is causal, so the positions that are scored never attend to it;
right padding leaves every real token's position (RoPE) unchanged; and padded positions are
dropped by a mask (`jnp.where`, not a product) before anything is summed. Contexts longer than
max_length are truncated from the left, keeping the whole continuation.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import lm_eval.models  # noqa: F401  (the built-in models first: see the note at register_model)
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from perijax import sharding as sharding_lib
from perijax.config import ConfigError
from perijax.tuning import compiler_options

__all__ = ["PerijaxLM", "bucket_lengths", "token_logprobs", "main"]

MIN_BUCKET = 16
DEFAULT_BATCH_SIZE = 16


def bucket_lengths(max_length: int) -> list[int]:
    """Padded lengths a request may take: powers of two from MIN_BUCKET below max_length, and
    max_length itself (at most log2(max_length / 16) + 1 compiled shapes)."""
    buckets = []
    length = MIN_BUCKET
    while length < max_length:
        buckets.append(length)
        length *= 2
    return buckets + [max_length]


def token_logprobs(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """log p(targets | tokens) per position, and whether each target is the argmax.

    tokens, targets: [B, L] int32 (targets[:, i] follows tokens[:, :i + 1]); mask: [B, L] bool,
    the scored positions. Returns (logprobs [B, L] float32, 0 where not scored; greedy [B, L]
    bool, True where not scored)."""
    model = nnx.merge(graphdef, params)
    logits = model(tokens).astype(jnp.float32)
    logprobs = -optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    greedy = jnp.argmax(logits, axis=-1) == targets
    return jnp.where(mask, logprobs, 0.0), greedy | ~mask


def _gen_settings(kwargs: dict[str, Any], default_max_gen_toks: int) -> tuple:
    """(until strings, max_gen_toks, temperature, top_k, top_p) from a task's gen_kwargs, read as
    lm-eval's HF model reads them (greedy unless do_sample and temperature > 0)."""
    until = kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_gen_toks = default_max_gen_toks
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens"):
        if kwargs.get(key) is not None:
            max_gen_toks = int(kwargs[key])
            break
    temperature = float(kwargs.get("temperature", 0.0) or 0.0)
    if not kwargs.get("do_sample", temperature > 0):
        temperature = 0.0
    top_k = int(kwargs.get("top_k", 0) or 0)
    top_p = float(kwargs.get("top_p", 1.0) or 1.0)
    return until, max_gen_toks, temperature, top_k, top_p


# Registering "perijax" makes the registry non-empty, after which lm-eval's `get_model` no longer
# imports its own models; importing lm_eval.models above registers them first.
@register_model("perijax")
class PerijaxLM(TemplateLM):
    """A perijax checkpoint as an lm-eval model (`loglikelihood`, `loglikelihood_rolling`,
    `generate_until`); see the module docstring for the arguments and the padding scheme."""

    def __init__(
        self,
        checkpoint: str | None = None,
        batch_size: int | str | None = None,
        max_length: int | str | None = None,
        dtype: str | None = None,
        tokenizer: str | None = None,
        max_gen_toks: int | str = 256,
        seed: int | str = 0,
        device: str | None = None,  # lm-eval passes it; JAX places the model on its mesh
        max_batch_size: int | None = None,  # lm-eval passes it; batch_size is fixed here
    ):
        super().__init__()
        from perijax.data.tokenizer import load_tokenizer
        from perijax.trained import load_model, run_tokenizer

        if not checkpoint:
            raise ConfigError("the perijax model needs checkpoint=PATH in its model_args")
        overrides = {"dtype": dtype} if dtype else None
        loaded = load_model(checkpoint, overrides=overrides)
        tok = load_tokenizer(tokenizer) if tokenizer else run_tokenizer(loaded.cfg)
        if tok is None:
            raise ConfigError(
                f"run of {checkpoint} has no tokenizer (synthetic data): pass tokenizer=FILE"
            )
        self._setup(loaded.model, tok, loaded.mesh, max_length or loaded.cfg.data.seq_len)
        self._set_sizes(batch_size, max_gen_toks, seed)
        self.checkpoint = str(loaded.path)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """As lm-eval's, except that a setting in model_args wins over the same one from the
        command line (lm-eval's CLI always passes --batch_size; the base class would fail with
        "multiple values for keyword argument")."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(
            lm_utils.simple_parse_args_string(arg_string), additional_config
        )

    @classmethod
    def from_model(
        cls,
        model,
        tokenizer,
        mesh: jax.sharding.Mesh,
        *,
        max_length: int,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_gen_toks: int = 256,
        seed: int = 0,
    ) -> PerijaxLM:
        """An adapter around a model already in memory (a Transformer whose parameters live on
        `mesh`) and a perijax tokenizer, e.g. `perijax.trained.load_model`'s."""
        lm = cls.__new__(cls)
        TemplateLM.__init__(lm)
        lm._setup(model, tokenizer, mesh, max_length)
        lm._set_sizes(batch_size, max_gen_toks, seed)
        lm.checkpoint = None
        return lm

    def _setup(self, model, tokenizer, mesh, max_length: int | str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.mesh = mesh
        self._max_length = int(max_length)
        if self._max_length < 1:
            raise ConfigError(f"max_length={max_length} must be >= 1")
        graphdef, self._params = nnx.split(model)
        self._batch_sharding = sharding_lib.batch_sharding(mesh, 2)
        self._score = jax.jit(
            functools.partial(token_logprobs, graphdef),
            out_shardings=NamedSharding(mesh, PartitionSpec()),
            compiler_options=compiler_options(),
        )
        self._buckets = bucket_lengths(self._max_length)

    def _set_sizes(self, batch_size, max_gen_toks, seed) -> None:
        if batch_size in (None, "") or str(batch_size).startswith("auto"):
            batch_size = DEFAULT_BATCH_SIZE
        self._batch_size = int(batch_size)
        if self._batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self._rows = -(-self._batch_size // shards) * shards  # rows past batch_size: padding
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)

    # --- what TemplateLM needs -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eod_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.identity)

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        # perijax tokenizers add no special tokens; documents are preceded by end-of-document,
        # which lm-eval supplies as prefix_token_id where a request has no context.
        return [int(t) for t in self.tokenizer.encode(string)]

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tokenizer.decode(list(tokens))

    def get_model_info(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "max_length": self._max_length}

    # --- scoring -----------------------------------------------------------------------------
    def _score_rows(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), all greedy) for (context, continuation) token lists.

        The last max_length + 1 tokens of context + continuation are kept (left truncation); the
        model reads all but the last and is scored on the continuation's positions."""
        inputs = []
        for context, continuation in rows:
            if len(continuation) > self._max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens is longer than "
                    f"max_length={self._max_length}"
                )
            whole = (list(context) + list(continuation))[-(self._max_length + 1) :]
            inputs.append((whole, len(continuation)))
        # Longest first, so a batch holds similar lengths and lands in a tight bucket.
        order = sorted(range(len(inputs)), key=lambda i: -len(inputs[i][0]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(inputs)
        with jax.set_mesh(self.mesh):
            for start in range(0, len(order), self._batch_size):
                chunk = order[start : start + self._batch_size]
                longest = max(len(inputs[i][0]) - 1 for i in chunk)
                width = next(b for b in self._buckets if b >= longest)
                tokens = np.zeros((self._rows, width), np.int32)
                targets = np.zeros((self._rows, width), np.int32)
                mask = np.zeros((self._rows, width), bool)
                for row, i in enumerate(chunk):
                    whole, n_cont = inputs[i]
                    n = len(whole) - 1
                    tokens[row, :n] = whole[:-1]
                    targets[row, :n] = whole[1:]
                    mask[row, n - n_cont : n] = True
                put = functools.partial(
                    sharding_lib.replicated_batch, sharding=self._batch_sharding
                )
                logprobs, greedy = jax.device_get(
                    self._score(self._params, put(tokens), put(targets), put(mask))
                )
                for row, i in enumerate(chunk):
                    total = float(np.sum(logprobs[row], dtype=np.float64))
                    results[i] = (total, bool(np.all(greedy[row])))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: [((context, continuation) or None, context ids, continuation ids)]."""
        results = []
        batch = self._batch_size * 8  # tqdm granularity only
        for start in tqdm(
            range(0, len(requests), batch),
            disable=disable_tqdm or self.rank != 0,
            desc="perijax loglikelihood",
        ):
            chunk = requests[start : start + batch]
            scored = self._score_rows([(ctx, cont) for _, ctx, cont in chunk])
            for (key, _, _), answer in zip(chunk, scored, strict=True):
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            results.extend(scored)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of max_length predictions, each
        conditioned on as much preceding text as fits (lm-eval's rolling scheme, as its HF model:
        the first token is conditioned on the end-of-document token)."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            pairs = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self._max_length,
                context_len=1,
            )
            for context, continuation in map(lm_utils.make_disjoint_window, pairs):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(
            owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True
        ):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, if the task asks) continuations from `perijax.generate.generate`,
        cut at the first of the task's `until` strings. A prompt keeps its last
        max_length - max_gen_toks tokens so that prompt and continuation fit the window."""
        from perijax.generate import generate

        groups: dict[tuple, list[int]] = {}
        settings = []
        for index, req in enumerate(requests):
            context, gen_kwargs = req.args
            until, *sampling = _gen_settings(dict(gen_kwargs or {}), self.max_gen_toks)
            settings.append(until)
            groups.setdefault(tuple(sampling), []).append(index)
        outputs = [""] * len(requests)
        eod = self.eot_token_id
        progress = tqdm(
            total=len(requests), disable=disable_tqdm or self.rank != 0, desc="perijax generate"
        )
        for (max_gen_toks, temperature, top_k, top_p), indices in groups.items():
            room = self._max_length - max_gen_toks
            if room < 1:
                raise ValueError(
                    f"max_gen_toks={max_gen_toks} leaves no room for a prompt in "
                    f"max_length={self._max_length}: lower it in the task's generation_kwargs"
                )
            prompts = [self.tok_encode(requests[i].args[0])[-room:] or [eod] for i in indices]
            for start in range(0, len(indices), self._batch_size):
                chunk = prompts[start : start + self._batch_size]
                padded = chunk + [[eod]] * (self._batch_size - len(chunk))  # one compiled shape
                new = generate(
                    self.model,
                    padded,
                    max_gen_toks,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    seed=self.seed,
                    stop_tokens=(eod,),
                )
                for offset, ids in enumerate(new[: len(chunk)]):
                    index = indices[start + offset]
                    text = self.tok_decode([t for t in ids if t != eod])
                    for stop in settings[index]:
                        if stop:
                            text = text.split(stop)[0]
                    outputs[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
                progress.update(len(chunk))
        progress.close()
        return outputs


def main() -> None:
    """lm-eval's own command line, with the "perijax" model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    # Run as a script this module is `__main__`; alias it so that an import of
    # perijax.lm_eval_adapter finds this module instead of registering "perijax" a second time.
    sys.modules.setdefault("perijax.lm_eval_adapter", sys.modules[__name__])
    main()
