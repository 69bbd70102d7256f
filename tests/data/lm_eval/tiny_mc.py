"""Loads tiny_mc.jsonl (the local lm-eval task perijax_tiny_mc) from this folder."""

from pathlib import Path


def load(**kwargs):
    import datasets

    return datasets.load_dataset(
        "json", data_files={"test": str(Path(__file__).with_name("tiny_mc.jsonl"))}
    )
