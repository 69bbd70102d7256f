"""Compile targets by name, and what perijax.targets.program reads off a compiled program:
custom calls, replica groups in XLA's three notations, the mesh axes a collective spans and the
axes along which it crosses hosts. The compiles themselves: tests/test_target_compile.py."""

import json

import pytest

from perijax import targets
from perijax.config import ConfigError
from perijax.launchers import common
from perijax.targets import program


@pytest.mark.parametrize(
    "name, platform, chips, hosts, topology",
    [("v5e-4", "tpu", 4, 1, "v5e:2x2"), ("v5litepod-16", "tpu", 16, 4, "v5e:4x4"),
     ("v5e-8", "tpu", 8, 1, "v5e:2x4"), ("v5p-128", "tpu", 64, 16, "v5p:4x4x4"),
     ("v4-32", "tpu", 16, 4, "v4:2x2x4"), ("v6e-8", "tpu", 8, 1, "v6e:2x4"),
     ("2xv5p-128", "tpu", 128, 32, "v5p:4x4x4"), ("h100x8", "gpu", 8, 1, "1x1x8"),
     ("h100x64", "gpu", 64, 8, "1x8x8"), ("h100x1", "gpu", 1, 1, "1x1x1"),
     ("4xh100x4", "gpu", 16, 4, "1x4x4"), ("h200x8", "gpu", 8, 1, "1x1x8"),
     ("a100x16", "gpu", 16, 2, "1x2x8")],
)  # fmt: skip
def test_targets_by_name(name, platform, chips, hosts, topology):
    t = targets.parse(name)
    assert (t.platform, t.chips, t.hosts, t.topology) == (platform, chips, hosts, topology)
    assert t.granules == (2 if name.startswith("2x") else hosts)
    if platform == "gpu":  # the shipped device description is read, with the chip's memory
        assert targets.spec_text(t).count("gpu_device_info") == 1
        assert targets.hbm_bytes(t) > 70 * 2**30


@pytest.mark.parametrize(
    "name, message",
    [("v5e-12", "v5e slices have"), ("v5p-12", "counts TensorCores"), ("tpu", "expected a TPU"),
     ("h100x12", "multiple of 8"), ("v5p-24", "no topology of this size"),
     ("v5e-1", "no topology of this size")],
)  # fmt: skip
def test_bad_target_names_are_one_line(name, message):
    with pytest.raises(ConfigError, match=message) as e:
        targets.parse(name)
    assert "\n" not in str(e.value)


def test_gpu_targets_need_the_plugin_and_cudnn():
    missing = targets.missing_compiler(targets.parse("h100x8"))
    if missing is not None:
        assert "pip install" in missing and "\n" not in missing


# ------------------------------------------------------------------------------ HLO reading
HLO = "\n".join([
    "ENTRY %main {",
    "  %splash_mha_fwd_residuals.4 = (f32[8,128,128]{2,1,0}, bf16[8,4,128,32]{3,2,1,0}) "
    'custom-call(%a, %b), custom_call_target="tpu_custom_call", metadata={op_name="x"}',
    "  %custom-call.7 = bf16[2,8,4,64]{3,2,1,0} custom-call(%q, %k, %v), "
    'custom_call_target="__cudnn$fmhaSoftmax"',
    '  %custom-call.8 = f32[4]{0} custom-call(%q), custom_call_target="__cublas$lt$matmul"',
    "  %all-reduce.1 = f32[1024]{0} all-reduce(%g), channel_id=1, replica_groups={{0,2},{1,3}}, "
    "use_global_device_ids=true, to_apply=%add",
    "  %all-gather-start = (bf16[256]{0}, bf16[1024]{0}) all-gather-start(%p), channel_id=2, "
    "replica_groups=[2,2]<=[4], dimensions={0}",
    "  %reduce-scatter.3 = bf16[128,4]{1,0} reduce-scatter(%h), channel_id=3, "
    "replica_groups=[2,2]<=[2,2]T(1,0), dimensions={0}",
    "  %all-reduce.9 = (bf16[64]{0}, bf16[64]{0}) all-reduce(%x, %y), channel_id=4, "
    "replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_0'}",
    "}",
])  # fmt: skip
MESH = (2, 2)  # data x fsdp: device i sits at (i // 2, i % 2)
AXES = ("data", "fsdp")


def test_custom_calls_are_counted_by_kind_and_kernel():
    calls = program.custom_calls(HLO)
    assert calls == {"__cublas$lt$matmul": 1, "__cudnn$fmhaSoftmax": 1,
                     "tpu_custom_call:splash_mha_fwd_residuals": 1}  # fmt: skip
    assert program.fused_attention_calls(calls) == {
        "__cudnn$fmhaSoftmax": 1, "tpu_custom_call:splash_mha_fwd_residuals": 1}  # fmt: skip


@pytest.mark.parametrize(
    "groups, expected",
    [("replica_groups={{0,2},{1,3}}", [[0, 2], [1, 3]]),
     ("replica_groups=[2,2]<=[4]", [[0, 1], [2, 3]]),
     ("replica_groups=[2,2]<=[2,2]T(1,0)", [[0, 2], [1, 3]]),
     ("replica_groups=[1,4]<=[4]", [[0, 1, 2, 3]]),
     ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_1'}", [[0, 1], [2, 3]]),
     ("replica_groups=mesh['axis_0'=2,'axis_1'=2] {'axis_0'}", [[0, 2], [1, 3]]),
     ("replica_groups=mesh['axis_0'=2,'axis_1'=2], device_ids=([2,2]T(1,0)) {'axis_1'}",
      [[0, 2], [1, 3]]),
     ("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) "
      "{'axis_0'}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
     ("source_target_pairs={{0,1},{1,0}}", [[0, 1], [1, 0]]),
     ("replica_groups={}", [[0, 1, 2, 3]])],
)  # fmt: skip
def test_replica_groups_in_every_notation(groups, expected):
    n = 8 if "axis_2" in groups else 4
    assert program.replica_groups(f"%x = f32[4] all-reduce(%y), {groups}", n) == expected


def test_collectives_are_grouped_by_kind_and_mesh_axes():
    got = {(c.kind, c.axes): (c.count, c.bytes) for c in
           program.collectives(HLO, MESH, AXES, lambda i: 0)}  # fmt: skip
    assert got == {
        ("all-reduce", ("data",)): (1, 4096),  # {{0,2},{1,3}}
        ("all-reduce", ("fsdp",)): (1, 256),  # ids [[0,2],[1,3]] grouped along axis_0: {0,1}
        ("all-gather", ("fsdp",)): (1, 2048),  # an async start: its largest array
        ("reduce-scatter", ("data",)): (1, 1024),
    }


@pytest.mark.parametrize(
    "host_of, crossing",
    [(lambda i: i // 2, {"data"}),  # a host per data row: only data parallelism crosses
     (lambda i: i % 2, {"fsdp"}),  # a host per fsdp column: the fsdp gathers cross
     (lambda i: 0, set())],
)  # fmt: skip
def test_crossing_axes_follow_the_hosts(host_of, crossing):
    assert program.crossing_axes(program.collectives(HLO, MESH, AXES, host_of)) == crossing


def test_a_group_over_both_axes_crosses_along_the_one_the_hosts_split():
    hlo = "%a = f32[8] all-reduce(%g), replica_groups={{0,1,2,3}}"
    by_row = program.collectives(hlo, MESH, AXES, lambda i: i // 2)
    by_column = program.collectives(hlo, MESH, AXES, lambda i: i % 2)
    assert program.crossing_axes(by_row) == {"data"}
    assert program.crossing_axes(by_column) == {"data", "fsdp"}


def test_collectives_over_one_mesh_and_other_axes_are_checked_apart():
    """XLA's mesh-axes notation: two groupings of one device mesh, one per axis, are two sets of
    groups (with a host per data row, the data groups cross hosts, the fsdp groups do not)."""
    hlo = "\n".join(
        f"%x{i} = f32[8] all-reduce(%g), replica_groups=mesh['axis_0'=2,'axis_1'=2] {{'{a}'}}"
        for i, a in enumerate(("axis_1", "axis_0"))
    )
    found = program.collectives(hlo, MESH, AXES, lambda i: i // 2)
    assert {c.axes: c.crosses_along for c in found} == {("fsdp",): (), ("data",): ("data",)}


def test_square_buffers_find_materialized_scores():
    hlo = "%s = f32[2,16,512,512]{3,2,1,0} dot(%q, %k)\n%o = bf16[2,512,64]{2,1,0} dot(%s, %v)"
    assert program.square_buffers(hlo, 512) == 1
    assert program.square_buffers(hlo, 64) == 0


# ------------------------------------------------------------------------------- pre-flight
def train_command(*overrides):
    return common.parse_train_command(
        ["train", "--config", "configs/tiny.py", "--workdir", "/shared/run", *overrides]
    )


def fake_plan(report):
    """A stand-in for the `perijax plan` child: writes `report` where --json says."""

    def run(argv):
        import subprocess

        assert argv[argv.index("--target") + 1] == "4xh100x8"
        assert "--config.model.ln_placement=peri" in argv
        with open(argv[argv.index("--json") + 1], "w") as f:
            json.dump(report, f)
        return subprocess.CompletedProcess(argv, 0, "", "")

    return run


def test_preflight_refuses_a_step_that_does_not_fit(monkeypatch, capsys):
    monkeypatch.setattr(targets, "missing_compiler", lambda t: None)
    report = {"per_device": {"peak_bytes": 90 * 2**30}, "hbm_bytes": 80 * 2**30, "fits": False,
              "interpreted_pallas": 0, "fused_attention": {}, "compiler": "XLA GPU",
              "compile_s": 1.0}  # fmt: skip
    train = train_command("--config.model.ln_placement=peri")
    with pytest.raises(common.LaunchError, match=r"needs 90.0 GiB per chip, more than the 80 GiB"):
        common.preflight(train, "4xh100x8", None, runner=fake_plan(report))
    report.update(fits=True, per_device={"peak_bytes": 10 * 2**30})
    common.preflight(train, "4xh100x8", None, runner=fake_plan(report))
    assert "pre-flight: fits, 10.0 of 80 GiB per chip" in capsys.readouterr().out


def test_preflight_needs_the_compiler_only_when_asked(capsys):
    t = targets.parse("4xh100x8")
    if targets.missing_compiler(t) is None:
        pytest.skip("the GPU compiler is installed here")
    with pytest.raises(common.LaunchError, match="--preflight: XLA's GPU compiler"):
        common.preflight(train_command(), "4xh100x8", True)
    common.preflight(train_command(), "4xh100x8", None)  # noted, not refused
    assert "no pre-flight compile" in capsys.readouterr().err
    common.preflight(train_command(), "4xh100x8", False)
    assert capsys.readouterr().err == ""
