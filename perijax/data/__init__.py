"""Training data: token corpora (stdlib, synthetic, prepared shards), `perijax prepare`, and the
Grain iterators over them. `open_datasets` is the trainer's entry point (docs/data.md); the
`perijax prepare` command lives in perijax.data.prepare (imported on demand: it is also run as
`python -m perijax.data.prepare`)."""

from perijax.data.corpus import (
    EOD_TOKEN,
    SOURCES,
    TokenData,
    load_token_data,
    split_files,
    stdlib_files,
    synthetic_token_data,
)
from perijax.data.datasets import (
    OPEN_SOURCES,
    Datasets,
    TrainIterator,
    open_datasets,
    parse_mixture,
)
from perijax.data.packing import PackedWindows, TokenStream
from perijax.data.remote import DataError
from perijax.data.shards import open_prepared
from perijax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "EOD_TOKEN",
    "OPEN_SOURCES",
    "SOURCES",
    "DataError",
    "Datasets",
    "PackedWindows",
    "TokenData",
    "TokenStream",
    "Tokenizer",
    "TrainIterator",
    "load_token_data",
    "load_tokenizer",
    "open_datasets",
    "open_prepared",
    "parse_mixture",
    "split_files",
    "stdlib_files",
    "synthetic_token_data",
]
