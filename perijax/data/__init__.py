"""Training data: token corpora (stdlib, synthetic) and the Grain batch iterators over them."""

from perijax.data.corpus import (
    EOD_TOKEN,
    SOURCES,
    TokenData,
    load_token_data,
    split_files,
    stdlib_files,
    synthetic_token_data,
)
from perijax.data.loader import WindowSource, eval_batches, train_batches

__all__ = [
    "EOD_TOKEN",
    "SOURCES",
    "TokenData",
    "WindowSource",
    "eval_batches",
    "load_token_data",
    "split_files",
    "stdlib_files",
    "synthetic_token_data",
    "train_batches",
]
