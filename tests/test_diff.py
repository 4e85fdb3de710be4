"""``ckconv diff``: tensors decide, structure is a note (fails with --strict), tolerances across dtypes, every format."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections import OrderedDict

import pytest
import torch
import torchvision
from click.testing import CliRunner

import ckconv
from ckconv.reports import tensorvalues
from ckconv.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def as_json(*args):
    result = invoke("diff", *args, "--json")
    assert result.exit_code in (0, 1), result.output

    def no_constants(name):  # NaN / Infinity are not JSON
        raise AssertionError(f"{name} in --json output")

    return result.exit_code, json.loads(result.stdout, parse_constant=no_constants)


@pytest.fixture(scope="module")
def squeezenet():
    torch.manual_seed(0)
    return torchvision.models.squeezenet1_1(weights=None).state_dict()  # OrderedDict carrying _metadata


def test_huggingface_hub_output_equals_torch_save(tmp_path, squeezenet):
    import huggingface_hub  # in the test extra
    torch.save(squeezenet, tmp_path / "src.pth")
    for folder, shard in (("single", "5GB"), ("sharded", "1MB")):
        (tmp_path / folder).mkdir()
        huggingface_hub.save_torch_state_dict(squeezenet, tmp_path / folder, max_shard_size=shard)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    for folder in ("single", "sharded", "single/model.safetensors"):
        result = invoke("diff", tmp_path / "src.pth", tmp_path / folder)
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[-1].startswith("equal (52 tensors, 0 values compared")
        assert "<root>: OrderedDict in A, dict in B" in result.stdout  # reported, not counted
        assert "@attrs._metadata: only in A" in result.stdout
        assert invoke("diff", tmp_path / "src.pth", tmp_path / folder, "--strict").exit_code == 1


def test_convert_arch_metadata_noise_is_a_note(tmp_path, squeezenet):
    torch.save(squeezenet, tmp_path / "src.pth")
    assert invoke("convert", tmp_path / "src.pth", tmp_path / "out.pth", "--arch", "squeezenet1_1").exit_code == 0
    result = invoke("diff", tmp_path / "src.pth", tmp_path / "out.pth")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) < 10  # not one line per _metadata entry
    code, report = as_json(tmp_path / "src.pth", tmp_path / "out.pth")
    assert code == 0 and report["equal"] and report["tensors_compared"] == 52
    assert [n["kind"] for n in report["notes"]] == ["attrs"] and report["notes"][0]["path"] == "@attrs._metadata"
    strict = invoke("diff", tmp_path / "src.pth", tmp_path / "out.pth", "--strict")
    assert strict.exit_code == 1 and strict.stdout.splitlines()[-1].startswith("different")


def test_bf16_cast_needs_a_tolerance(tmp_path, squeezenet):
    torch.save(squeezenet, tmp_path / "src.pth")
    assert invoke("convert", tmp_path / "src.pth", tmp_path / "bf16.safetensors", "--dtype", "bf16").exit_code == 0
    exact = invoke("diff", tmp_path / "src.pth", tmp_path / "bf16.safetensors")
    assert exact.exit_code == 1 and "dtype float32 vs bfloat16, max abs diff" in exact.stdout
    # bf16 keeps 8 significant bits: rounding to nearest moves a value by half a unit in the last place, at most
    # 2**-8 of the rounded value
    ok = invoke("diff", tmp_path / "src.pth", tmp_path / "bf16.safetensors", "--rtol", 2.0 ** -8)
    assert ok.exit_code == 0, ok.output
    assert "float32 in A, bfloat16 in B (within tolerance)" in ok.stdout
    assert invoke("diff", tmp_path / "src.pth", tmp_path / "bf16.safetensors", "--rtol", 2.0 ** -8,
                  "--strict").exit_code == 1  # the dtype change is a note
    assert invoke("diff", tmp_path / "src.pth", tmp_path / "bf16.safetensors", "--rtol", 2.0 ** -10).exit_code == 1
    # the reported max abs diff is torch's, computed in float64
    code, report = as_json(tmp_path / "src.pth", tmp_path / "bf16.safetensors", "--atol", "1e-3")
    back = ckconv.load(tmp_path / "bf16.safetensors")
    expected = {k: (v.double() - back[k].double()).abs().max().item() for k, v in squeezenet.items() if v.numel()}
    got = {t["name"]: t["max_abs_diff"] for t in report["tensors"]}
    assert got == pytest.approx(expected, abs=0) and report["max_abs_diff"] == max(expected.values())


def test_changed_value_names_the_tensor_and_its_max_abs_diff(tmp_path):
    a = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.zeros(4), "step": torch.tensor(7)}
    b = {k: v.clone() for k, v in a.items()}
    b["w"][2, 1] += 0.25
    b["step"] += 3
    torch.save(a, tmp_path / "a.pth")
    ckconv.save(b, tmp_path / "b.safetensors")
    result = invoke("diff", tmp_path / "a.pth", tmp_path / "b.safetensors")
    assert result.exit_code == 1
    assert "differs: w: max abs diff 0.25 (1 of 12 elements differ)" in result.stdout
    assert "differs: step: max abs diff 3 (1 of 1 elements differ)" in result.stdout
    assert "2 tensors differ" in result.stdout.splitlines()[-1]
    code, report = as_json(tmp_path / "a.pth", tmp_path / "b.safetensors")
    assert report["tensors_differing"] == 2 and {t["name"] for t in report["tensors_differ"]} == {"w", "step"}
    assert code == 1 and invoke("diff", tmp_path / "a.pth", tmp_path / "b.safetensors", "--atol", 0.25).exit_code == 1
    assert invoke("diff", tmp_path / "a.pth", tmp_path / "b.safetensors", "--atol", 3).exit_code == 0


def test_tensors_only_ignores_an_epoch_change(tmp_path):
    weights = {"w": torch.randn(3, 3)}
    torch.save({"model": weights, "epoch": 3, "lr": 0.1}, tmp_path / "a.pth")
    torch.save({"model": weights, "epoch": 4, "lr": 0.1}, tmp_path / "b.pth")
    plain = invoke("diff", tmp_path / "a.pth", tmp_path / "b.pth")
    assert plain.exit_code == 1 and "differs: epoch: 3 vs 4" in plain.stdout
    only = invoke("diff", tmp_path / "a.pth", tmp_path / "b.pth", "--tensors-only")
    assert only.exit_code == 0 and only.stdout.splitlines()[-1].startswith("equal (1 tensor, 0 values compared")


def test_values_and_keys_still_decide(tmp_path):
    w = torch.ones(2)
    torch.save({"w": w, "lr": 0.1, "extra": torch.zeros(1)}, tmp_path / "a.pth")
    torch.save({"w": w, "lr": 0.1000001, "new": "x"}, tmp_path / "b.pth")
    result = invoke("diff", tmp_path / "a.pth", tmp_path / "b.pth", "--atol", 1)  # tolerance is for tensors only
    assert result.exit_code == 1
    assert "only in A: extra" in result.stdout and "only in B: new" in result.stdout
    assert "differs: lr: 0.1 vs 0.1000001" in result.stdout
    only = invoke("diff", tmp_path / "a.pth", tmp_path / "b.pth", "--tensors-only")
    assert only.exit_code == 1 and "only in A: extra" in only.stdout and "new" not in only.stdout


def test_container_types_are_notes(tmp_path):
    t = torch.randn(4)
    torch.save({"pair": (t, 1), "sd": OrderedDict(a=t), "flags": [True]}, tmp_path / "a.pth")
    torch.save({"sd": {"a": t}, "pair": [t, 1], "flags": [True]}, tmp_path / "b.pth")
    code, report = as_json(tmp_path / "a.pth", tmp_path / "b.pth")
    assert code == 0 and report["values_compared"] == 2
    assert {(n["path"], n["kind"]) for n in report["notes"]} == {
        ("pair", "container"), ("sd", "container"), ("<root>", "key-order")}
    assert invoke("diff", tmp_path / "a.pth", tmp_path / "b.pth", "--strict").exit_code == 1
    torch.save({"sd": {"a": t}, "pair": [t, 1], "flags": [1]}, tmp_path / "c.pth")
    assert invoke("diff", tmp_path / "a.pth", tmp_path / "c.pth").exit_code == 1  # True vs 1: a value differs


def test_shapes_always_differ(tmp_path):
    torch.save({"w": torch.zeros(6)}, tmp_path / "a.pth")
    torch.save({"w": torch.zeros(2, 3)}, tmp_path / "b.pth")
    result = invoke("diff", tmp_path / "a.pth", tmp_path / "b.pth", "--atol", 1e9)
    assert result.exit_code == 1 and "differs: w: shape [6] vs [2, 3]" in result.stdout
    code, report = as_json(tmp_path / "a.pth", tmp_path / "b.pth")
    assert report["tensors_differ"][0]["max_abs_diff"] is None


def test_every_dtype_against_its_float64_cast(tmp_path):
    """Values are decoded without torch; torch's own casts say what they are (float8 and bf16 included)."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    a = {name: codes.view(getattr(torch, name)) for name in
         ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")}
    torch.manual_seed(0)
    a["bfloat16"] = torch.randint(0, 2 ** 16, (4096,), dtype=torch.int32).to(torch.uint16).view(torch.bfloat16)
    a["float16"] = torch.randint(0, 2 ** 16, (4096,), dtype=torch.int32).to(torch.uint16).view(torch.float16)
    a["float32"] = torch.randn(1000) * 1e30
    a["int8"] = torch.arange(-128, 128, dtype=torch.int8)
    a["uint32"] = torch.tensor([0, 1, 2 ** 32 - 1], dtype=torch.uint32)
    a["bool"] = torch.tensor([True, False])
    a["complex64"] = torch.randn(8, dtype=torch.complex64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "ComplexHalf support is experimental"
        a["complex32"] = torch.randn(8, dtype=torch.complex64).to(torch.complex32)
    b = {k: (v.to(torch.complex128) if v.is_complex() else v.double()) for k, v in a.items()}
    torch.save(a, tmp_path / "a.pth")
    torch.save(b, tmp_path / "b.pth")
    code, report = as_json(tmp_path / "a.pth", tmp_path / "b.pth", "--atol", 0)
    assert code == 0, [(t["name"], t["max_abs_diff"], t["mismatched"]) for t in report["tensors"] if not t["equal"]]
    assert report["max_abs_diff"] == 0.0  # NaN against NaN counts as equal, infinities against themselves too
    exact = as_json(tmp_path / "a.pth", tmp_path / "b.pth")[1]
    assert exact["tensors_differing"] == len(a)  # exact: a dtype change is a difference

    b["float8_e4m3fn"][3] += 1.0
    b["bfloat16"][0] = float("nan") if not a["bfloat16"][0].isnan() else 0.0
    torch.save(b, tmp_path / "c.pth")
    code, report = as_json(tmp_path / "a.pth", tmp_path / "c.pth", "--atol", 0)
    differ = {t["name"]: t for t in report["tensors_differ"]}
    assert set(differ) == {"float8_e4m3fn", "bfloat16"} and differ["bfloat16"]["max_abs_diff"] == "nan"
    assert differ["float8_e4m3fn"]["max_abs_diff"] == 1.0 and differ["float8_e4m3fn"]["mismatched"] == 1


def test_integers_are_exact(tmp_path):
    lo, hi = -2 ** 63, 2 ** 63 - 1
    torch.save({"i": torch.tensor([lo, 5, hi]), "u": torch.tensor([0, 2 ** 64 - 1], dtype=torch.uint64)},
               tmp_path / "a.pth")
    torch.save({"i": torch.tensor([hi, 6, hi]), "u": torch.tensor([2 ** 63, 0], dtype=torch.uint64)},
               tmp_path / "b.pth")
    code, report = as_json(tmp_path / "a.pth", tmp_path / "b.pth")
    got = {t["name"]: (t["max_abs_diff"], t["mismatched"]) for t in report["tensors"]}
    assert got == {"i": (2 ** 64 - 1, 2), "u": (2 ** 64 - 1, 2)}
    torch.save({"i": torch.tensor([lo, 5, hi], dtype=torch.int64), "u": torch.tensor([-1, 1], dtype=torch.int8)},
               tmp_path / "c.pth")
    got = {t["name"]: t["max_abs_diff"] for t in as_json(tmp_path / "a.pth", tmp_path / "c.pth", "--atol", 0)[1]
           ["tensors"]}
    assert got == {"i": 0, "u": 2 ** 64 - 2}  # uint64 against int8: |0 - (-1)| and |2**64-1 - 1|


def test_blocks_stream_and_views(tmp_path, monkeypatch):
    monkeypatch.setattr(tensorvalues, "BLOCK_ELEMENTS", 1000)
    big = torch.randn(10_001)
    other = big.clone()
    other[-1] += 2.0
    other[1234] -= 0.5
    torch.save({"w": big, "view": big[::3]}, tmp_path / "a.pth")  # a strided view of a shared storage
    ckconv.save({"w": other, "view": other[::3].contiguous()}, tmp_path / "b.safetensors")
    report = ckconv.diff(tmp_path / "a.pth", tmp_path / "b.safetensors")
    got = {t.name: (t.max_abs_diff, t.mismatched) for t in report.tensors}
    assert got["w"] == (pytest.approx(2.0), 2)
    assert got["view"] == (0.0, 0)  # 1234 and 10000 are not multiples of 3
    assert not report.equal and [t.name for t in report.tensors_differ] == ["w"]


def test_dcp_against_torch_save(tmp_path):
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    state = {"model": torch.nn.Linear(5, 3).state_dict(), "epoch": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    torch.save(state, tmp_path / "a.pth")
    result = invoke("diff", tmp_path / "a.pth", tmp_path / "dcp", "--tensors-only")
    assert result.exit_code == 0, result.output
    state["model"]["bias"][1] = 9.0
    torch.save(state, tmp_path / "b.pth")
    result = invoke("diff", tmp_path / "b.pth", tmp_path / "dcp")
    assert result.exit_code == 1 and "differs: model.bias: max abs diff" in result.stdout


def test_api_accepts_objects_and_checks_tolerances(tmp_path):
    sd = {"w": torch.ones(3)}
    ckconv.save(sd, tmp_path / "a.safetensors")
    assert ckconv.diff(sd, tmp_path / "a.safetensors").equal
    assert not ckconv.diff({"w": torch.ones(3).half()}, tmp_path / "a.safetensors").equal
    assert ckconv.diff({"w": torch.ones(3).half()}, tmp_path / "a.safetensors", atol=0).equal
    with pytest.raises(ckconv.CkconvError, match="atol must be a finite number"):
        ckconv.diff(sd, sd, atol=-1.0)


def test_usage_errors_exit_2(tmp_path):
    torch.save({"w": torch.ones(1)}, tmp_path / "a.pth")
    for bad in (("--atol", "-1"), ("--rtol", "nan"), ("--atol", "x")):
        result = invoke("diff", tmp_path / "a.pth", tmp_path / "a.pth", *bad)
        assert result.exit_code == 2, (bad, result.output)


def test_names_are_printed_escaped(tmp_path):
    torch.save({"\x1b[2Jw": torch.ones(1)}, tmp_path / "a.pth")
    torch.save({"\x1b[2Jw": torch.zeros(1)}, tmp_path / "b.pth")
    result = invoke("diff", tmp_path / "a.pth", tmp_path / "b.pth")
    assert result.exit_code == 1 and "\x1b" not in result.stdout and "\\x1b[2Jw" in result.stdout


def test_memory_stays_flat_and_torch_stays_out(tmp_path):
    """A 128 MiB tensor against its bf16 cast: compared block by block, no tensor materialised, no torch."""
    big = torch.randn(32 << 20)
    torch.save({"w": big}, tmp_path / "a.pth")
    ckconv.save({"w": big.bfloat16()}, tmp_path / "b.safetensors")
    del big
    probe = (
        "import resource, sys\n"
        "from ckconv.cli import cli\n"
        "import ckconv.reports.diffing, numpy\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    cli([sys.argv[1], sys.argv[2], sys.argv[3], '--rtol', '0.004', '--json'], standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print('PROBE', (after - before) >> 10, 'torch' in sys.modules, file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", probe, "diff", tmp_path / "a.pth", tmp_path / "b.safetensors"],
                            capture_output=True, text=True, timeout=300)
    report = json.loads(result.stdout)
    assert report["equal"] and report["tensors"][0]["max_abs_diff"] > 0
    grew_mib, torch_loaded = result.stderr.split("PROBE")[1].split()
    assert torch_loaded == "False"
    assert int(grew_mib) < 64, f"diff grew by {grew_mib} MiB for a 128 MiB tensor"
