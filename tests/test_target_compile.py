"""The train step compiled by the targets' own compilers on this CPU-only machine: libtpu for
TPU topologies, XLA's GPU compiler for H100 nodes (`perijax plan --target`, perijax.targets).

The compilers live in their own environment (`.venv-targets`, made by the README's test
command; `PERIJAX_TARGETS_PYTHON` names another interpreter): with their plugins installed, every
JAX program on a CPU-only machine logs their failed start-up. One worker process there
(tests/target_worker.py) serves every compile. In CI a missing environment fails these tests;
elsewhere it skips them, saying why.

Placements change only the norms, not the kernels or the collectives, so each model size is
compiled for a covering set of cases (every placement, document masking on and off, grouped-query
attention) rather than their full product: tiny on both targets and the 400M at 8,192 tokens on
8 H100s; the 400M on v5e-4 is compiled once, by the `perijax plan` command itself.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TPU, GPU = "v5e-4", "h100x8"
TINY = "configs/tiny.py"
M400 = "configs/paper.py:size=400m"
GQA = {"model.num_kv_heads": "4"}  # 400M: 16 query heads on 4 kv heads; tiny: 4 on 1 below
# (placement, document masking, grouped-query attention): each value of each appears.
COVER = [
    ("pre", False, False),
    ("post", True, False),
    ("peri", True, True),
    ("output", False, True),
]


def targets_python() -> str | None:
    python = os.environ.get("PERIJAX_TARGETS_PYTHON") or str(ROOT / ".venv-targets/bin/python")
    return python if Path(python).exists() else None


@pytest.fixture(scope="module")
def compile_for():
    """compile_for(config, target, **overrides) -> the plan report of `plan_target`."""
    python = targets_python()
    if python is None:
        why = "no target-compiler environment (.venv-targets, see README.md's test command)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    worker = subprocess.Popen(
        [python, str(ROOT / "tests" / "target_worker.py")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # the plugins' start-up logs
        text=True,
        cwd=ROOT,
        env=env,
    )
    cache: dict = {}

    def compile_for(config: str, target: str, **overrides: str) -> dict:
        key = (config, target, tuple(sorted(overrides.items())))
        if key not in cache:
            request = {"config": config, "target": target, "overrides": list(overrides.items())}
            worker.stdin.write(json.dumps(request) + "\n")
            worker.stdin.flush()
            line = worker.stdout.readline()
            assert line, "the target-compile worker died"
            cache[key] = json.loads(line)
        report = cache[key]
        assert "error" not in report, report.get("error")
        return report

    yield compile_for
    worker.stdin.close()
    worker.wait(timeout=60)


def case(placement: str, masking: bool, gqa: bool, kv_heads: str) -> dict:
    overrides = {"model.ln_placement": placement, "data.document_masking": str(masking).lower()}
    if gqa:
        overrides["model.num_kv_heads"] = kv_heads
    return overrides


# ----------------------------------------------------------------------------------- TPU
@pytest.mark.parametrize("placement,masking,gqa", COVER)
def test_tpu_program_holds_the_splash_kernels_not_an_interpreted_one(compile_for, placement,
                                                                     masking, gqa):  # fmt: skip
    r = compile_for(TINY, TPU, **case(placement, masking, gqa, "1"))
    assert r["compiler"].startswith("libtpu ") and r["estimate"] is False
    assert r["interpreted_pallas"] == 0
    calls = r["fused_attention"]
    # tiny: 4 unscanned layers, each with its forward, dq and dkv kernels (the segmented
    # variants with document masking).
    segmented = "_segmented" if masking else ""
    assert calls == {f"tpu_custom_call:splash_mha_{k}": 4 for k in (
        f"fwd{segmented}_residuals", f"dq{segmented}_no_residuals",
        f"dkv{segmented}_no_residuals")}, calls  # fmt: skip
    assert r["compute_dtype"] == "bfloat16" and r["fits"]


def test_tpu_interpreted_kernel_is_detected():
    """The check above can fail: a program traced as for the CPU holds the interpreted kernel."""
    import jax

    from perijax import attention
    from perijax.targets import program

    q = jax.ShapeDtypeStruct((1, 128, 2, 64), "bfloat16")
    jaxpr = jax.make_jaxpr(lambda q: attention.splash_attention(q, q, q, interpret=True))(q)
    assert program.interpreted_pallas(jaxpr) == 1
    jaxpr = jax.make_jaxpr(lambda q: attention.splash_attention(q, q, q, interpret=False))(q)
    assert program.interpreted_pallas(jaxpr) == 0


# ----------------------------------------------------------------------------------- H100
@pytest.mark.parametrize("placement,masking,gqa", COVER)
def test_h100_program_holds_cudnn_attention(compile_for, placement, masking, gqa):
    r = compile_for(TINY, GPU, **case(placement, masking, gqa, "1"))
    assert r["compiler"].startswith("XLA GPU") and r["estimate"] is False
    assert r["attention"]["target"] == "cudnn"
    calls = r["fused_attention"]
    if masking:  # cuDNN through JAX takes no packed documents: blockwise runs (attention.py)
        assert calls == {} and r["attention"]["planned"] == "blockwise"
    else:
        assert calls == {"__cudnn$fmhaSoftmax": 4, "__cudnn$fmhaSoftmaxBackward": 4}, calls
    assert r["fits"]


def test_float8_matmuls_reach_the_h100_as_float8_gemms(compile_for):
    """model.matmul_dtype=float8: every attention and MLP matmul of the H100 program takes
    float8 operands: e4m3 x e4m3 forward, e5m2 gradients times e4m3 backward (XLA GPU runs them as
    float8 GEMM fusions); the same config in bfloat16 holds none."""
    dots = compile_for(TINY, "h100x1", **{"model.matmul_dtype": "float8"})["float8_dots"]
    assert dots.get("f8e4m3fn x f8e4m3fn", 0) >= 4 * 4  # 4 layers: qkv, wo, gate/up, down
    assert dots.get("f8e5m2 x f8e4m3fn", 0) + dots.get("f8e4m3fn x f8e5m2", 0) >= 2 * 4 * 4
    assert set(dots) <= {"f8e4m3fn x f8e4m3fn", "f8e5m2 x f8e4m3fn", "f8e4m3fn x f8e5m2"}
    assert compile_for(TINY, "h100x1")["float8_dots"] == {}
    tpu = compile_for(TINY, TPU, **{"model.matmul_dtype": "float8"})["float8_dots"]
    assert tpu.get("f8e4m3fn x f8e4m3fn", 0) >= 4 * 4  # libtpu takes the float8 operands too


@pytest.mark.slow
@pytest.mark.parametrize("placement,masking,gqa", COVER)
def test_400m_at_8192_on_h100(compile_for, placement, masking, gqa):
    r = compile_for(M400, GPU, **case(placement, masking, gqa, "4"),
                    **{"mesh.data": "1", "mesh.fsdp": "8"})  # fmt: skip
    assert r["seq_square_buffers"] == 0
    assert bool(r["fused_attention"]) is not masking
    no_tt_bound(r)
    assert r["fits"], r["per_device"]


def no_tt_bound(r: dict) -> None:
    """Temporaries stay below one layer's [T, T] float32 scores for the micro-batch, which the
    XLA path materializes for its softmax (and keeps for every layer's backward pass)."""
    m, t = r["config"]["model"], r["config"]["data"]["seq_len"]
    rows = r["config"]["train"]["global_batch_size"] // r["config"]["train"]["grad_accum_steps"]
    rows_per_device = max(1, rows // (r["mesh"]["data"] * r["mesh"]["fsdp"]))
    scores = rows_per_device * m["num_heads"] * t * t * 4
    assert r["per_device"]["temp_bytes"] < scores, (r["per_device"]["temp_bytes"], scores)


# ------------------------------------------------------------------- paper presets (docs)
@pytest.mark.slow
@pytest.mark.parametrize(
    "size,target,mesh,accum,fsdp",
    [
        ("1.5b", "v5p-128", "1", "4", "-1"),
        ("3.2b", "v5p-128", "1", "4", "-1"),
        ("1.5b", GPU, "1", "32", "8"),
        ("3.2b", GPU, "1", "32", "8"),
    ],
)
def test_paper_presets_fit_their_documented_chips(compile_for, size, target, mesh, accum, fsdp):
    """docs/scaling.md's settings: Peri-LN, FSDP over every chip, 8,192 tokens."""
    r = compile_for(f"configs/paper.py:size={size}", target, **{
        "model.ln_placement": "peri", "mesh.data": mesh, "mesh.fsdp": fsdp,
        "train.grad_accum_steps": accum})  # fmt: skip
    assert r["fits"] and r["seq_square_buffers"] == 0, r["per_device"]
    assert r["fused_attention"] and r["interpreted_pallas"] == 0


# ------------------------------------------------------------------------------ many hosts
@pytest.mark.parametrize(
    "target,data,fsdp,dcn,crossing",
    [
        ("v5p-128", "16", "4", "16", ["data"]),  # 16 hosts: data between, fsdp within
        ("v5p-128", "16", "4", "1", ["data", "fsdp"]),  # the plain mesh splits fsdp over hosts
        ("h100x64", "8", "8", "8", ["data"]),  # 8 nodes x 8
        ("h100x64", "1", "64", "1", ["fsdp"]),
    ],
)
def test_only_the_data_axis_crosses_hosts_with_dcn_data(compile_for, target, data, fsdp, dcn,
                                                        crossing):  # fmt: skip
    """Read off the compiled collectives' replica groups (perijax.targets.program): with the
    hybrid mesh (`mesh.dcn_data` = hosts) every group's members that share a data coordinate
    share a host."""
    mesh = {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.dcn_data": dcn}
    r = compile_for(TINY, target, **mesh, **{"train.global_batch_size": "64"})
    assert r["hosts"] == (16 if target.startswith("v5p") else 8)
    assert r["crosses_hosts"] == crossing, r["collectives"]
    spans = {axis for c in r["collectives"] for axis in c["axes"]}
    assert spans == {a for a, n in (("data", data), ("fsdp", fsdp)) if n != "1"}, spans


# ------------------------------------------------------------------------------ command
@pytest.mark.slow
@pytest.mark.parametrize("target,needle", [(TPU, "splash_mha_fwd_residuals"),
                                           (GPU, "__cudnn$fmhaSoftmax")])  # fmt: skip
def test_plan_command_compiles_the_400m_for_the_target(tmp_path, target, needle):
    python = targets_python()
    if python is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("no .venv-targets")
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [python, "-m", "perijax.cli", "plan", "--config", M400, "--target", target,
         "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
        env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    compiler = "libtpu" if target == TPU else "XLA GPU"
    assert r["compiler"].startswith(compiler) and not r["estimate"]
    assert f"compiler: {compiler}" in proc.stdout and needle in proc.stdout
    assert "peak " in proc.stdout and "(estimate)" not in proc.stdout
    assert r["per_device"]["peak_bytes"] > r["per_device"]["params_bytes"] > 0
    # The 400M at 8,192 tokens: fused kernels, no [T, T] array, and it fits the chip.
    assert r["interpreted_pallas"] == 0 and r["seq_square_buffers"] == 0
    no_tt_bound(r)
    assert r["fits"], r["per_device"]


def test_plan_without_the_compiler_says_so_and_estimates(tmp_path):
    """This environment (the tests') has no libtpu: one line, then the labeled estimate."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is not None:
        pytest.skip("libtpu is installed here")
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "perijax.cli", "plan", "--config", TINY, "--target", TPU,
         "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    notes = [line for line in proc.stderr.splitlines() if line.startswith("perijax:")]
    assert len(notes) == 1 and "libtpu) is not installed" in notes[0], proc.stderr
    assert "estimate for 4 simulated tpu-v5e chips" in notes[0]
    r = json.loads(out.read_text())
    assert r["estimate"] is True and r["compiler"] == "XLA:CPU" and r["devices"] == 4
    assert r["target"]["name"] == TPU
    assert "(estimate)" in proc.stdout and "an estimate: the target's compiler" in proc.stdout


# ---------------------------------------------------------------------------- pre-flight
@pytest.mark.slow
@pytest.mark.parametrize(
    "size, overrides, fits",
    [("tiny", [], True),
     ("3.2b", ["--config.train.global_batch_size=8", "--config.train.grad_accum_steps=1",
               "--config.model.remat=none"], False)],
)  # fmt: skip
def test_launch_slurm_compiles_before_it_submits(tmp_path, size, overrides, fits):
    """`perijax launch-slurm` compiles the step for its nodes' GPUs first (here one H100) and
    refuses, in one line, a step that does not fit: 3.2B parameters with Adam (38 GB) and the
    activations of 8 x 8,192 tokens without remat."""
    python = targets_python()
    if python is None:
        (pytest.fail if os.environ.get("CI") else pytest.skip)("no .venv-targets")
    config = TINY if size == "tiny" else f"configs/paper.py:size={size}"
    proc = subprocess.run(
        [python, "-m", "perijax.cli", "launch-slurm", "--nodes", "1", "--gpus-per-node", "1",
         "--time", "1:00:00", "--dry-run", "--", "train", "--config", config,
         "--workdir", "/shared/runs/preflight", *overrides],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    errors = [x for x in proc.stderr.splitlines() if x.startswith("perijax:")]
    assert "pre-flight: compiling the train step for h100x1" in proc.stdout
    if fits:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "pre-flight: fits" in proc.stdout and "__cudnn$fmhaSoftmax" in proc.stdout
        assert "sbatch " in proc.stdout  # the dry run's commands follow
    else:
        assert proc.returncode == 2 and "sbatch" not in proc.stdout
        assert len(errors) == 1 and "more than the 79 GiB of h100x1" in errors[0], errors
