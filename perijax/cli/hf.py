"""The `perijax export` and `perijax import` subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from perijax.cli.common import fail
from perijax.config import ConfigError
from perijax.hf.export import export
from perijax.hf.files import check_out
from perijax.hf.importing import import_hf
from perijax.hf.targets import EXPORT_DTYPES, TARGETS, resolve_target
from perijax.hf.tensors import safetensors_numpy


# ---------------------------------------------------------------------------------------- CLI
def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers `perijax export` and `perijax import`."""
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face Transformers folder",
        description="Write a checkpoint as a folder that transformers' "
        "AutoModelForCausalLM.from_pretrained loads with no custom code (docs/eval_export.md). "
        "Settings no Transformers class represents exactly are refused.",
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a checkpoints/<step> folder, or a workdir (its latest checkpoint)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    p.add_argument(
        "--target",
        default="auto",
        choices=("auto", *TARGETS),
        help="Transformers class (default auto: pre->llama, pre+per_head QK-norm->qwen3, "
        "peri->glm4, peri+per_head->gemma3, output+full->olmo2)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=EXPORT_DTYPES,
        help="dtype of the matmul weights (norm weights stay float32; default float32)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")

    q = sub.add_parser(
        "import",
        help="turn a Hugging Face Transformers folder into a perijax checkpoint",
        description="Convert a Hugging Face Llama / Qwen3 / GLM-4 / Gemma 2 / Gemma 3 / OLMo 2 "
        "folder into WORKDIR/config.json + WORKDIR/checkpoints/0 (docs/eval_export.md); "
        "continue with `perijax train --config WORKDIR/config.json --restore "
        "WORKDIR/checkpoints/0`.",
    )
    q.add_argument("hf_dir", metavar="HF_DIR", help="folder with config.json + *.safetensors")
    q.add_argument("--out", required=True, metavar="WORKDIR", help="the workdir to write")
    q.add_argument(
        "--config",
        metavar="FILE[:ARG]",
        help="base config for everything but the model shape (default: the built-in defaults); "
        "--config.SECTION.KEY=VALUE overrides apply to it",
    )
    q.add_argument("--force", action="store_true", help="replace a non-empty --out")


def run_export(args: argparse.Namespace, overrides: Sequence[tuple[str, str]] = ()) -> int:
    """`perijax export`: bad input is one line on stderr and exit status 2."""
    from perijax.checkpoint import CheckpointError
    from perijax.trained import load_model, read_config, run_tokenizer

    if overrides:
        return fail("export takes no --config.* overrides (the checkpoint carries its config)")
    try:
        safetensors_numpy()  # before the checkpoint is read
        check_out(Path(args.out), args.force)
        _, _, cfg = read_config(args.checkpoint)
        resolve_target(cfg.model, args.target)  # refuse before reading any weights
        try:
            tokenizer = run_tokenizer(cfg)
        except (ConfigError, ValueError) as e:
            print(f"note: {e}; exporting without tokenizer files", flush=True)
            tokenizer = None
        loaded = load_model(args.checkpoint, overrides={"dtype": "float32"})
        t = export(
            loaded.model,
            loaded.cfg,
            args.out,
            target=args.target,
            tokenizer=tokenizer,
            dtype=args.dtype,
            force=args.force,
            log=lambda s: print(s, flush=True),
        )
    except (ConfigError, CheckpointError, OSError) as e:
        return fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(f"exported {loaded.path} (step {loaded.step}) as {t.architecture} to {args.out}")
    return 0


def run_import(args: argparse.Namespace, overrides: Sequence[tuple[str, str]] = ()) -> int:
    """`perijax import`: bad input is one line on stderr and exit status 2."""
    from perijax.checkpoint import CheckpointError

    try:
        path = import_hf(
            args.hf_dir,
            args.out,
            base_config=args.config,
            overrides=overrides,
            force=args.force,
            log=lambda s: print(s, flush=True),
        )
    except (ConfigError, CheckpointError, OSError) as e:
        return fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    workdir = path.parent.parent
    print(f"continue training: perijax train --config {workdir}/config.json --restore {path}")
    return 0
