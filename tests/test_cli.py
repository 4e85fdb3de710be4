"""The command line: exit codes, one-line errors, JSON output, no torch import where none is needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckconv.cli import cli
from helpers import run_cli

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_convert_reports_what_it_did(tmp_path):
    result = invoke("convert", FIXTURES / "tiny_bundle.pth", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.output
    assert "-> " in result.stdout and "43 tensors" in result.stdout
    assert "argparse.Namespace" in result.stdout  # foreign objects are named
    assert (tmp_path / "out.safetensors").is_file()


def test_existing_destination_needs_force(tmp_path):
    dst = tmp_path / "out.pth"
    dst.write_bytes(b"precious")
    result = invoke("convert", FIXTURES / "tiny_bundle.pth", dst)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"Error: {dst} already exists; pass --force to overwrite it"]
    assert dst.read_bytes() == b"precious"
    assert invoke("convert", FIXTURES / "tiny_bundle.pth", dst, "--force").exit_code == 0
    assert dst.read_bytes() != b"precious"


def test_missing_source_is_one_line_error(tmp_path):
    result = invoke("convert", tmp_path / "nope.pth", tmp_path / "out.pth")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ")
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.pth").exists()


def test_unknown_output_format_is_a_clear_error(tmp_path):
    result = invoke("convert", FIXTURES / "tiny_bundle.pth", tmp_path / "out.weird")
    assert result.exit_code == 2  # a usage error
    assert "pass --to" in result.stderr
    result = invoke("convert", FIXTURES / "tiny_bundle.pth", tmp_path / "out.weird", "--to", "safetensors")
    assert result.exit_code == 0
    assert invoke("convert", FIXTURES / "tiny_bundle.pth", tmp_path / "o", "--to", "nosuch").exit_code == 2


def test_usage_errors_exit_2(tmp_path):
    assert invoke("convert", FIXTURES / "tiny_bundle.pth").exit_code == 2
    assert invoke("convert", FIXTURES / "tiny_bundle.pth", tmp_path / "x.pth", "--dtype", "int3").exit_code == 2


def test_inspect_json_lists_sections_tensors_and_foreign_objects():
    result = invoke("inspect", FIXTURES / "tiny_bundle.pth", "--json")
    assert result.exit_code == 0
    info = json.loads(result.stdout)
    assert info["format"] == "torch"
    assert set(info["sections"]) == {"model", "optimizer", "other"}
    assert info["tensor_count"] == 43
    assert info["foreign"] == [{"path": "args", "class": "argparse.Namespace"}]
    names = [t["name"] for t in info["tensors"]]
    assert "model.features.0.weight" in names and "optimizer.state.0.exp_avg" in names
    first = info["tensors"][0]
    assert first["dtype"] == "float32" and first["shape"] == [8, 3, 3, 3]


def test_inspect_table():
    """One row per tensor, in file order, each with its name, dtype and shape in their columns."""
    import re

    result = invoke("inspect", FIXTURES / "dtype_zoo.pth")
    assert result.exit_code == 0
    zoo = torch.load(FIXTURES / "dtype_zoo.pth", weights_only=True)
    tensors = {k: v for k, v in zoo.items() if isinstance(v, torch.Tensor)} if isinstance(zoo, dict) else {}
    assert tensors
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if re.match(r"name\s+dtype\s+shape", line))
    rows = [line.split() for line in lines[header + 1: header + 1 + len(tensors)]]
    assert [r[0] for r in rows] == list(tensors)
    for (name, dtype, shape), (key, t) in zip(rows, tensors.items()):
        assert dtype == str(t.dtype).removeprefix("torch.")
        assert shape == ("scalar" if t.dim() == 0 else "x".join(map(str, t.shape)))


def test_diff_exit_codes(tmp_path):
    torch.save({"w": torch.ones(3), "epoch": 1}, tmp_path / "a.pth")
    torch.save({"w": torch.tensor([1.0, 1.5, 1.0]), "epoch": 2}, tmp_path / "b.pth")
    assert invoke("convert", tmp_path / "a.pth", tmp_path / "a.safetensors").exit_code == 0
    same = invoke("diff", tmp_path / "a.pth", tmp_path / "a.safetensors")
    assert same.exit_code == 0 and "equal" in same.stdout
    different = invoke("diff", tmp_path / "a.pth", tmp_path / "b.pth", "--json")
    assert different.exit_code == 1
    report = json.loads(different.stdout)
    assert report["equal"] is False
    assert report["tensors_differ"][0]["name"] == "w" and report["tensors_differ"][0]["max_abs_diff"] == 0.5
    assert report["values_differ"][0]["name"] == "epoch"


def test_plugins_json_lists_builtins():
    result = invoke("plugins", "--json")
    assert result.exit_code == 0
    plugins = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert plugins["ckconv.formats.torch_pickle"]["formats"] == ["torch"]
    assert plugins["ckconv.formats.safetensors_format"]["formats"] == ["safetensors"]
    assert all(p["builtin"] for n, p in plugins.items() if n.startswith("ckconv."))


def test_real_subprocess_convert_and_python_m(tmp_path):
    result = run_cli("convert", FIXTURES / "dtype_zoo.pth", tmp_path / "zoo.safetensors")
    assert result.returncode == 0, result.stderr
    back = subprocess.run([sys.executable, "-m", "ckconv", "diff", FIXTURES / "dtype_zoo.pth", tmp_path / "zoo.safetensors"],
                          capture_output=True, text=True)
    assert back.returncode == 0 and "equal" in back.stdout


def test_real_subprocess_error_has_no_traceback(tmp_path):
    bad = tmp_path / "picture.pth"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    result = run_cli("convert", bad, tmp_path / "out.safetensors")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("Error: ")
    assert "not a readable checkpoint" in result.stderr
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("args", [["--help"], ["plugins"], ["inspect", "{st}"], ["scan", "{pth}"], ["scan", "{st}"],
                                  ["convert", "{pth}", "{out}"]])
def test_commands_that_need_no_torch_do_not_import_it(tmp_path, args):
    st = tmp_path / "m.safetensors"
    torch.save({"w": torch.ones(2)}, tmp_path / "m.pth")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, st)
    args = [a.format(st=st, pth=tmp_path / "m.pth", out=tmp_path / "o.safetensors") for a in args]
    code = ("import sys\nfrom click.testing import CliRunner\nfrom ckconv.cli import cli\n"
            f"r = CliRunner().invoke(cli, {args!r})\nassert r.exit_code == 0, r.output\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_reader_closing_the_pipe_is_not_an_error(tmp_path):
    """`ckconv inspect big.pth | head -1`: no BrokenPipeError traceback, no error line."""
    torch.save({f"layer{i}.weight": torch.zeros(1) for i in range(3000)}, tmp_path / "many.pth")
    proc = subprocess.Popen([sys.executable, "-m", "ckconv", "inspect", tmp_path / "many.pth"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away while ckconv still writes the table
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == ""
