"""`perijax bench` and compile counts: the report's numbers agree with each other and with
perijax/flops.py, bad arguments are one-line errors, peaks come from the right place, and the
trainer compiles its step once (plus one telemetry variant) and its eval step once."""

import collections
import contextlib
import json
import math
import re
import statistics
from pathlib import Path

import jax
import pytest
from jax import monitoring

from perijax import cli, config, flops, peaks
from perijax import config as config_lib
from perijax import train as train_lib
from perijax.cli import bench

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data.source": "synthetic", "data.seq_len": "16", "model.vocab_size": "64",
    "model.num_layers": "2", "model.d_model": "32", "model.num_heads": "4", "model.d_ff": "64",
    "model.dtype": "float32", "train.global_batch_size": "8",
}  # fmt: skip
CONFIG = str(ROOT / "configs" / "tiny.py")


def tiny_overrides(**extra: str) -> list[str]:
    return [f"--config.{k}={v}" for k, v in {**TINY, **extra}.items()]


def test_bench_report_is_consistent(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--config", CONFIG, "--placements", "pre,peri", "--steps", "2", "--warmup", "1",
            "--repeats", "2", "--peak-sizes", "128", "--json", str(out)]  # fmt: skip
    argv += tiny_overrides()
    assert bench.main(argv) == 0
    captured = capsys.readouterr()
    stdout = captured.out
    r = json.loads(out.read_text())
    assert [f.name for f in tmp_path.iterdir()] == ["bench.json"]  # rewritten in place

    assert r["command"].startswith("perijax bench --config ") and r["complete"] is True
    assert r["versions"]["jax"] == jax.__version__ and r["date"]
    assert r["device"]["platform"] == "cpu" and r["device"]["count"] == jax.device_count()
    assert r["settings"] == {"placements": ["pre", "peri"], "steps": 2, "warmup": 1, "repeats": 2}
    assert r["tokens_per_step"] == 8 * 16 and r["batch_shape"] == [8, 1, 17]
    assert list(r["placements"]) == ["pre", "peri"]
    # Rounds alternate direction (pre, peri | peri, pre), and the progress lines show that order.
    assert r["order"] == [["pre", "peri"], ["peri", "pre"]]
    ran = re.findall(r"^bench: \[(\w+)\] repeat (\d)/2", captured.err, re.M)
    assert ran == [("pre", "1"), ("peri", "1"), ("peri", "2"), ("pre", "2")]

    # CPU peak: measured in this run on the square and on every weight-matmul shape of the
    # model (128 tokens per microbatch), each in every precision; the best median wins.
    cfg = config_lib.load(CONFIG, list(TINY.items()))
    peak = r["peak"]
    assert peak["source"] == "measured" and peak["unit"] == "process"
    precisions = {"float32", "bfloat16->float32", "bfloat16"}
    shapes = [(128, 128, 128, "square")]
    shapes += [(*s, "model") for s in flops.weight_matmul_shapes(cfg.model, 8 * 16)]
    runs = collections.Counter((*m["shape"], m["source"], m["precision"]) for m in peak["matmul"])
    assert runs == collections.Counter((*s, p) for s in shapes for p in precisions)
    best = max(peak["matmul"], key=lambda m: m["tflops"])
    assert peak["tflops"] == best["tflops"]
    assert peak["precision"] == f"{best['precision']} matmul " + "x".join(map(str, best["shape"]))
    assert peak["tflops_total"] == pytest.approx(peak["tflops"] * jax.process_count())

    for name, p in r["placements"].items():
        model = bench._with_placement(cfg, name).model
        # FLOPs: exactly the documented formula.
        assert p["model_flops_per_token"] == flops.flops_per_token(model, 16)
        assert p["model_flops_per_token"] == r["model_flops_per_token"]
        assert p["norm_flops_per_token"] == flops.norm_flops_per_token(model)
        assert p["model_flops_per_step"] == p["model_flops_per_token"] * r["tokens_per_step"]

        st = p["step_time_s"]
        assert len(st["per_repeat"]) == 2 and all(len(t) == 2 for t in st["per_repeat"])
        assert st["per_repeat_median"] == [statistics.median(t) for t in st["per_repeat"]]
        assert st["median"] == statistics.median(st["per_repeat_median"])
        assert 0 < st["min"] <= st["p25"] <= st["p75"] <= st["max"]
        assert st["min"] <= st["median"] <= st["max"]

        # Throughput, FLOP rate and MFU follow from the median step time and the peak.
        assert p["tokens_per_s"] == pytest.approx(r["tokens_per_step"] / st["median"], rel=1e-12)
        achieved = p["model_flops_per_step"] / st["median"]
        assert p["model_tflops_per_s"] == pytest.approx(achieved / 1e12, rel=1e-12)
        assert p["model_tflops_per_s_per_device"] == pytest.approx(
            achieved / 1e12 / r["device"]["count"], rel=1e-12
        )
        assert p["mfu"] == pytest.approx(achieved / (peak["tflops_total"] * 1e12), rel=1e-12)

        # XLA's count is per device and close to the formula (it also counts the masked half of
        # the attention scores and the elementwise work).
        per_device = p["model_flops_per_step"] / r["device"]["count"]
        assert p["xla_to_model_flops"] == pytest.approx(
            p["xla_flops_per_step_per_device"] / per_device
        )
        assert 0.9 < p["xla_to_model_flops"] < 1.6, p["xla_to_model_flops"]

        # No device memory statistics on CPU: the compiled plan is the peak.
        mem = p["memory"]
        assert mem["peak_source"] == "compiled" and mem["device_peak_bytes"] is None
        assert mem["peak_bytes"] == mem["compiled_peak"] > 0
        assert mem["compiled_peak"] == (
            mem["arguments"] + mem["outputs"] - mem["aliased"] + mem["temporaries"]
        )
        assert p["compile_s"] > 0 and p["lower_s"] > 0 and p["init_s"] > 0
        assert abs(p["loss"] - math.log(64)) < 1.0  # random tokens: about ln(vocab)
        assert f"\n{name} " in stdout

    pre, peri = r["placements"]["pre"], r["placements"]["peri"]
    assert peri["parameters"] > pre["parameters"]  # Peri-LN adds the output norms: really built
    assert pre["overhead_vs_pre_pct"] == 0.0
    medians = (peri["step_time_s"]["per_repeat_median"], pre["step_time_s"]["per_repeat_median"])
    ratios = [100 * (a / b - 1) for a, b in zip(*medians, strict=True)]
    assert peri["overhead_vs_pre_pct"] == pytest.approx(statistics.median(ratios))
    assert "MFU" in stdout and "tokens/s" in stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--placements", "pre,sideways"], "unknown placement 'sideways'"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--peak-tflops", "0"], "--peak-tflops must be > 0"),
        (["--config", "configs/nope.py"], "config file not found"),
        (["--config.model.bogus=1"], "unknown config key 'model.bogus'"),
        (["--config.model.num_layers=many"], "model.num_layers"),
        (["--config.mesh.data=3"], "mesh data=3"),  # 8 devices
        (["--json", "/nonexistent-dir/bench.json"], "folder does not exist"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    base = ["--config", CONFIG, *tiny_overrides()]
    assert bench.main([*base, *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("perijax: error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_all_means_every_placement():
    assert sorted(bench.ALL_PLACEMENTS) == sorted(config.PLACEMENTS)
    assert bench.parse_placements("all", "pre") == list(bench.ALL_PLACEMENTS)
    assert bench.parse_placements(None, "output") == ["output"]  # default: the config's own
    assert bench.parse_placements("peri, pre,peri", "pre") == ["peri", "pre"]


def test_bench_is_a_perijax_subcommand():
    args = cli.build_parser().parse_args(["bench", "--placements", "all", "--steps", "3"])
    assert args.command == "bench" and args.steps == 3
    assert bench.parse_placements(args.placements, "pre") == ["pre", "peri", "post", "output"]


@pytest.mark.parametrize(
    "kind, name",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA GH200 480GB", "h100"),
        ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "a100-80gb"),
        ("TPU v4", "tpu-v4"),
        ("TPU v5 lite", "tpu-v5e"),
        ("TPU v5", "tpu-v5p"),
        ("TPU v5p", "tpu-v5p"),
        ("TPU v6 lite", "tpu-v6e"),
        ("NVIDIA H100 PCIe", None),  # other clocks: not the SXM peak
        ("NVIDIA H100 NVL", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_device_kind_peaks(kind, name):
    assert peaks.accelerator_peak(kind) == name


def test_weight_matmul_shapes_are_the_step_matmul_flops():
    """The shapes' FLOPs add up to the formula's 6 x matmul parameters per token: each weight's
    forward, input-gradient and weight-gradient products, nothing missing or counted twice."""
    for extra in ({}, {"num_kv_heads": 2}, {"d_ff": 96, "vocab_size": 50}):
        fields = dict(num_layers=3, d_model=32, num_heads=4, d_ff=64, vocab_size=64)
        model = config.ModelConfig(**{**fields, **extra})
        d, h, kv, dh, f = 32, 4, model.kv_heads, 8, model.d_ff
        params = 3 * (2 * d * h * dh + 2 * d * kv * dh + 3 * d * f) + d * model.vocab_size
        assert flops.matmul_params(model) == params
        shapes = flops.weight_matmul_shapes(model, rows=24)
        assert sum(c * 2 * m * k * n for (m, k, n), c in shapes.items()) == 6 * 24 * params
        assert sum(shapes.values()) == 3 * (7 * 3 + 1)  # 7 weights per block and the LM head
        assert {
            (24, d, model.vocab_size),
            (24, model.vocab_size, d),
            (d, 24, model.vocab_size),
        } <= (set(shapes))


def test_peak_sources():
    quiet = dict(sizes=(64,), log=lambda s: None)
    gpu = peaks.resolve_peak(
        "gpu", "NVIDIA H100 80GB HBM3", 8, no_peak=False, peak_tflops=None, **quiet
    )
    assert gpu["source"] == "table:h100" and gpu["tflops"] == 989 and gpu["tflops_total"] == 8 * 989
    unknown = peaks.resolve_peak(
        "gpu", "NVIDIA H100 PCIe", 8, no_peak=False, peak_tflops=None, **quiet
    )
    assert unknown["tflops"] is None and unknown["tflops_total"] is None
    flag = peaks.resolve_peak(
        "gpu", "NVIDIA H100 PCIe", 8, no_peak=False, peak_tflops=756.0, **quiet
    )
    assert flag["source"] == "--peak-tflops" and flag["tflops_total"] == 8 * 756.0
    cpu = peaks.resolve_peak("cpu", "cpu", 8, no_peak=False, peak_tflops=0.3, **quiet)
    assert cpu["unit"] == "process" and cpu["tflops_total"] == 0.3 * jax.process_count()
    assert peaks.resolve_peak("cpu", "cpu", 8, no_peak=True, peak_tflops=None, **quiet)[
        "tflops_total"
    ] is None  # fmt: skip


# ----------------------------------------------------------------------------- compile counts
# jax.monitoring events (jax._src.dispatch.JAXPR_TRACE_EVENT and BACKEND_COMPILE_EVENT), both
# recorded with fun_name. The backend-compile event wraps `compile_or_get_cached`, so it fires
# also when the persistent compilation cache (tests/conftest.py) supplies the executable: the
# cache cannot hide a compile from this count.
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRAIN = {
    **TINY, "train.total_steps": "20", "train.eval_every_steps": "0", "train.eval_batches": "1",
    "optim.warmup_steps": "2", "checkpoint.every_steps": "0",
}  # fmt: skip


@contextlib.contextmanager
def counting_compiles():
    counts: collections.Counter = collections.Counter()

    def listener(event: str, duration: float, **kwargs) -> None:
        if event in (TRACE_EVENT, COMPILE_EVENT):
            counts[event, kwargs.get("fun_name")] += 1

    jax.clear_caches()  # executables cached by an earlier test in this process would hide traces
    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize(
    "telemetry, log_every, telemetry_steps",
    [("false", "1000", 0), ("true", "5", 1)],  # telemetry: plain step + log-step variant
)
def test_train_compiles_each_step_function_once(tmp_path, telemetry, log_every, telemetry_steps):
    cfg = config_lib.load(
        CONFIG,
        list({**TRAIN, "telemetry.enabled": telemetry, "train.log_every_steps": log_every}.items()),
    )
    lines: list[str] = []
    with counting_compiles() as counts:
        result = train_lib.train(cfg, tmp_path, log=lines.append)
    assert int(result["state"].step) == 20
    evals = [line for line in lines if line.startswith("eval")]
    assert len(evals) == 2  # steps 0 and 20: the eval step ran twice, compiled once
    functions = ("train_step", "telemetry_step", "eval_step")
    trace = {fn: counts[TRACE_EVENT, fn] for fn in functions}
    compiled = {fn: counts[COMPILE_EVENT, f"jit({fn})"] for fn in functions}
    expected = {"train_step": 1, "telemetry_step": telemetry_steps, "eval_step": 1}
    # A second train_step trace means the log steps run a separately jitted copy of the plain
    # step (perijax/train.py should reuse it).
    assert trace == expected, f"traces {trace}, expected {expected}"
    assert compiled == expected, f"backend compiles {compiled}, expected {expected}"
