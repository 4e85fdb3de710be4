"""Messages people can act on: warnings on stderr and data on stdout, -q/-v, "did you mean", --dtype spellings, the
progress bar's line ended before an error, errors as JSON under --json, inspect --summary, tables that fit the
terminal, several inputs converted into a folder, shell completion."""

from __future__ import annotations

import json
import os
import struct
import sys
import zipfile

import pytest
import torch
from click.testing import CliRunner

import ckconv
from ckconv.cli import cli
from helpers import assert_deep_equal, run_cli
from matchcases import model, spec_cache  # noqa: F401 - fixtures


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def one_error_line(result, code=1):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def small_sd(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.weight": torch.randn(8, 8, generator=g) for i in range(n)} | {"step": torch.tensor(3)}


@pytest.fixture(scope="module")
def partial_resnet(tmp_path_factory):
    """resnet18's state_dict without its head (2 keys missing) plus 3 keys no resnet18 has."""
    sd = {k: v for k, v in model("resnet18").state_dict().items() if not k.startswith("fc.")}
    sd.update({"aux.0.weight": torch.ones(4, 4), "aux.0.bias": torch.zeros(4), "aux.1.weight": torch.ones(4)})
    path = tmp_path_factory.mktemp("partial") / "partial.pth"
    torch.save(sd, path)
    return path


# --- warnings on stderr, data on stdout, -q / -v -------------------------------------------------------------

def test_convert_warnings_go_to_stderr_and_data_to_stdout(partial_resnet, tmp_path):
    result = invoke("convert", partial_resnet, tmp_path / "out.safetensors", "--arch", "resnet18")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and len(result.stderr.splitlines()) == 2, result.stderr
    assert warnings[0].startswith("warning: coverage 98.4%: 2 of torchvision:resnet18's 122 keys not filled "
                                  "(2 missing, 0 with other shapes): fc.{weight,bias}")
    assert warnings[1] == ("warning: 3 checkpoint keys left out (no place in torchvision:resnet18): "
                           "aux.0.{weight,bias}, aux.1.weight")
    assert not any(line.startswith("warning") for line in result.stdout.splitlines())
    assert result.stdout.startswith("Converted ")
    assert "  note: " in result.stdout  # what was written: data


def test_the_library_result_carries_the_same_warnings(partial_resnet, tmp_path):
    """ckconv.convert's result names what --arch left unfilled and what fits nowhere (issue 23): warnings with
    the count and the first few keys, every key in ``names``; --json and the text show the same ones."""
    result = ckconv.convert(partial_resnet, tmp_path / "out.safetensors", arch="resnet18")
    warnings = {n.text: n for n in result.warnings}
    left_out = warnings["3 checkpoint keys left out (no place in torchvision:resnet18): aux.0.weight, aux.0.bias, "
                        "aux.1.weight"]
    assert left_out.names == ("aux.0.weight", "aux.0.bias", "aux.1.weight")
    unfilled = next(n for n in result.warnings if n.text.startswith("coverage 98.4%: 2 of torchvision:resnet18's"))
    assert unfilled.names == ("fc.weight", "fc.bias")
    data = json.loads(invoke("convert", partial_resnet, tmp_path / "j.safetensors", "--arch", "resnet18",
                             "--json").stdout)
    assert set(data["warnings"]) == set(warnings)
    sd = {f"extra{i}.weight": torch.ones(2) for i in range(6)} | dict(model("resnet18").state_dict())
    torch.save(sd, tmp_path / "extra.pth")
    result = ckconv.convert(tmp_path / "extra.pth", tmp_path / "extra.safetensors", arch="resnet18")
    assert [n.text for n in result.warnings] == ["6 checkpoint keys left out (no place in torchvision:resnet18): "
                                                 "extra0.weight, extra1.weight, extra2.weight and 3 more"]
    assert len(result.warnings[0].names) == 6


def test_a_warning_is_a_warning_by_its_severity_not_its_wording(tmp_path):
    """--json lists warnings apart from notes; the text shows them on stderr (issue 22 item 2)."""
    torch.save(model("resnet18", num_classes=10).state_dict(), tmp_path / "ft.pth")
    args = ["convert", tmp_path / "ft.pth", tmp_path / "out.pth", "--arch", "resnet18", "--arch-option",
            "num_classes=1000"]
    data = json.loads(invoke(*args, "--json").stdout)
    assert any(w.startswith("skipped 2 keys with other shapes: fc.weight") for w in data["warnings"]), data
    assert any("num_classes=10" in w for w in data["warnings"]) and not any("num_classes" in n for n in data["notes"])
    assert data["match"]["mismatched"] and any(n.startswith("replaced the state_dict") for n in data["notes"])
    text = invoke(*args, "--force")
    assert "warning: skipped 2 keys with other shapes" in text.stderr and "skipped keys" not in text.stdout
    result = ckconv.convert(tmp_path / "ft.pth", tmp_path / "out.pth", arch="resnet18",
                            arch_options={"num_classes": 1000}, force=True)
    assert result.match.mismatched and {n.text for n in result.warnings} == set(data["warnings"])


def test_quiet_keeps_only_data_and_verbose_lists_every_key(partial_resnet, tmp_path):
    quiet = invoke("-q", "convert", partial_resnet, tmp_path / "q.safetensors", "--arch", "resnet18")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and quiet.stdout.splitlines() == [quiet.stdout.strip()]
    assert quiet.stdout.startswith("Converted ")
    sd = {f"extra{i}.weight": torch.ones(2) for i in range(6)} | dict(model("resnet18").state_dict())
    path = tmp_path / "extra.pth"
    torch.save(sd, path)
    short = invoke("convert", path, tmp_path / "s.safetensors", "--arch", "resnet18")
    assert "extra0.weight, extra1.weight, extra2.weight, ... (-v lists all 6)" in short.stderr, short.stderr
    loud = invoke("-v", "convert", path, tmp_path / "v.safetensors", "--arch", "resnet18")
    assert loud.exit_code == 0, loud.output
    assert "6 checkpoint keys left out" in loud.stderr and "extra5.weight" in loud.stderr
    both = invoke("-q", "-v", "convert", path, tmp_path / "x.safetensors")
    assert both.exit_code == 2 and not (tmp_path / "x.safetensors").exists()


def test_quiet_scan_drops_the_count_and_group_verbose_lists_skipped_files(tmp_path):
    torch.save(small_sd(), tmp_path / "a.pth")
    (tmp_path / "config.json").write_text("{}")
    plain = invoke("scan", tmp_path)
    assert plain.exit_code == 0 and "scanned 1 checkpoints" in plain.stderr
    assert invoke("-q", "scan", tmp_path).stderr == ""
    assert "config.json" in invoke("-v", "scan", tmp_path).stdout
    assert "config.json" not in plain.stdout


# --- did you mean -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, suggestion", [
    (["--to", "safetensor"], "did you mean safetensors?"),
    (["--to", "torch_sharded"], "did you mean torch-sharded?"),
    (["--section", "modle"], "did you mean model?"),
    (["--arch", "vgg61"], "did you mean vgg16?"),
])
def test_near_misses_get_a_suggestion(tmp_path, args, suggestion):
    src = tmp_path / "bundle.pth"
    torch.save({"model": small_sd(), "epoch": 1}, src)
    line = one_error_line(invoke("convert", src, tmp_path / "out.safetensors", *args), code=2)  # a usage error
    assert suggestion in line
    assert sorted(os.listdir(tmp_path)) == ["bundle.pth"]


def test_no_suggestion_for_a_name_far_from_any(tmp_path):
    src = tmp_path / "a.pth"
    torch.save(small_sd(), src)
    line = one_error_line(invoke("convert", src, tmp_path / "o", "--to", "xyz"), code=2)
    assert "unknown format 'xyz'" in line and "did you mean" not in line


# --- --dtype spellings ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling, dtype", [
    ("float16", "float16"), ("half", "float16"), ("fp16", "float16"), ("FP16", "float16"),
    ("bfloat16", "bfloat16"), ("bf16", "bfloat16"), ("torch.bfloat16", "bfloat16"),
    ("float32", "float32"), ("float", "float32"), ("fp32", "float32"),
])
def test_dtype_spellings(tmp_path, spelling, dtype):
    src = tmp_path / "a.pth"
    torch.save({k: v.double() if v.is_floating_point() else v for k, v in small_sd().items()}, src)
    out = tmp_path / "a.safetensors"
    result = invoke("convert", src, out, "--dtype", spelling)
    assert result.exit_code == 0, result.output
    loaded = ckconv.load(out)
    assert str(loaded["layer0.weight"].dtype) == f"torch.{dtype}"
    assert loaded["step"].dtype == torch.int64  # integers are never cast


def test_an_unknown_dtype_is_a_usage_error(tmp_path):
    src = tmp_path / "a.pth"
    torch.save(small_sd(), src)
    result = invoke("convert", src, tmp_path / "a.safetensors", "--dtype", "float8")
    assert result.exit_code == 2 and "'float8' is not one of" in result.stderr
    assert not (tmp_path / "a.safetensors").exists()


# --- errors under --json ---------------------------------------------------------------------------------------

def test_an_error_under_json_is_a_json_object(tmp_path):
    png = tmp_path / "picture.pth"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    result = invoke("convert", png, tmp_path / "out.safetensors", "--json")
    assert result.exit_code == 1
    error = json.loads(result.stdout)  # the whole of stdout is one object
    assert error["type"] == "NotACheckpoint" and "picture.pth" in error["error"] and set(error) == {"error", "type"}
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["picture.pth"]
    inspect = invoke("inspect", png, "--json")
    assert inspect.exit_code == 1 and json.loads(inspect.stdout)["type"] == "NotACheckpoint"


def test_a_usage_error_under_json_is_a_json_object_with_exit_2(tmp_path):
    result = invoke("convert", tmp_path / "a.pth", "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout) == {"error": "missing DST: ckconv convert SRC... DST", "type": "UsageError"}


def test_json_errors_from_a_real_process(tmp_path):
    result = run_cli("diff", tmp_path / "nope.pth", tmp_path / "nope2.pth", "--json")
    assert result.returncode == 2 and json.loads(result.stdout)["type"] == "NotACheckpoint"
    assert "Traceback" not in result.stderr


# --- inspect --summary and tables that fit the terminal ---------------------------------------------------------

@pytest.fixture(scope="module")
def big_bundle(tmp_path_factory):
    """A bundle with hundreds of tensors: 4 layers x 60 blocks, an optimizer, a long-named head."""
    g = torch.Generator().manual_seed(1)
    sd = {f"model.layers.{i}.block{j}.weight": torch.randn(2, generator=g) for i in range(4) for j in range(60)}
    sd["model.a_very_long_head_name_that_goes_on_and_on.projection_with_many_words.weight"] = torch.zeros(3, 3).half()
    path = tmp_path_factory.mktemp("big") / "big.pth"
    torch.save({"model": {k.removeprefix("model."): v for k, v in sd.items()},
                "optimizer": {"state": {i: {"momentum_buffer": torch.zeros(2)} for i in range(240)},
                              "param_groups": [{"lr": 0.1, "params": list(range(241))}]}, "epoch": 2}, path)
    return path


def test_inspect_summary_groups_hundreds_of_tensors(big_bundle):
    result = invoke("inspect", big_bundle, "--summary")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "tensors: 481, " in result.stdout and "float16 x1, float32 x480" in result.stdout
    header = lines.index(next(line for line in lines if line.startswith("group ")))
    rows = [line.split()[:2] for line in lines[header + 1:]]
    assert rows == [["model.layers", "240"], ["model.a_very_long_head_name_that_goes_on_and_on", "1"],
                    ["optimizer.state", "240"]]
    assert len(lines) < 20  # no line per tensor
    data = json.loads(invoke("inspect", big_bundle, "--summary", "--json").stdout)
    assert "tensors" not in data and data["tensor_count"] == 481
    assert data["groups"][0] == {"group": "model.layers", "tensors": 240, "bytes": 240 * 8, "dtypes": {"float32": 240}}


def test_summary_of_a_flat_state_dict_looks_past_a_single_branch(tmp_path):
    path = tmp_path / "flat.pth"
    torch.save({f"model.layers.{i}.w": torch.ones(1) for i in range(3)} | {"lm_head.w": torch.ones(1)}, path)
    rows = invoke("inspect", path, "--summary").stdout.splitlines()
    groups = [line.split()[0] for line in rows[rows.index(next(r for r in rows if r.startswith("group "))) + 1:]]
    assert groups == ["model.layers", "lm_head"]


def test_tables_fit_the_terminal_width_and_pipes_get_whole_names(big_bundle):
    narrow = invoke("inspect", big_bundle, env={"COLUMNS": "60"})
    assert narrow.exit_code == 0, narrow.output
    table = narrow.stdout[narrow.stdout.index("\nname "):].splitlines()[1:]
    assert table and all(len(line) <= 60 for line in table)
    cut = [line for line in table if "projection" in line or "a_very" in line]
    assert len(cut) == 1 and ("\u2026" in cut[0] or "..." in cut[0]) and cut[0].split()[0].endswith("words.weight")
    assert cut[0].split()[1:] == ["float16", "3x3"]  # the other columns stay whole
    piped = invoke("inspect", big_bundle, env={"COLUMNS": ""})
    assert "a_very_long_head_name_that_goes_on_and_on.projection_with_many_words.weight" in piped.stdout


LONG_ROWS = [(f"module.backbone.stages.{i}.blocks.{j}.downsample_projection.weight", "<-",
              f"encoder.layer{i}.{j}.attention.output.dense_projection.weight", "rule", f"{64 * i}x{32 * j}")
             for i in range(1, 4) for j in range(1, 3)]


@pytest.mark.parametrize("width", [80, 200, 40])
def test_tables_share_the_width_fairly_and_cut_names_in_the_middle(monkeypatch, width):
    from ckconv.cli.common import table

    monkeypatch.setenv("COLUMNS", str(width))
    lines = table(LONG_ROWS, ["target", "", "source", "how", "shape"]).splitlines()
    assert len(lines) == 1 + len(LONG_ROWS)
    rows = [line.split() for line in lines[1:]]
    assert all(len(r) == 5 for r in rows)  # each cell fits its column: none runs into the next
    for row, want in zip(rows, LONG_ROWS):
        assert row[1:2] + row[3:] == [want[1]] + list(want[3:])  # short columns stay whole
        for cell, name in ((row[0], want[0]), (row[2], want[2])):
            if width == 200:
                assert cell == name
                continue
            mark = "\u2026" if "\u2026" in cell else "..."
            head, _, tail = cell.partition(mark)
            assert mark in cell and name.startswith(head) and name.endswith(tail), (cell, name)
            assert len(head) >= 3 and len(tail) >= 3  # both ends readable: prefix and leaf
    if width == 200:
        return
    assert all(len(line) <= width for line in lines)
    target, source = len(rows[0][0]), len(rows[0][2])  # both long columns shrink, to within one of each other
    assert abs(target - source) <= 1 and target < len(LONG_ROWS[0][0]) and source < len(LONG_ROWS[0][2])


def test_columns_never_shrink_below_their_floor():
    from ckconv.cli.common import fit_widths

    assert fit_widths([50, 2, 30, 6], [8, 8, 8, 8], 200) == [50, 2, 30, 6]  # room enough: nothing cut
    assert fit_widths([50, 2, 30, 6], [8, 8, 8, 8], 60) == [26, 2, 26, 6]  # the wide ones meet at one level
    assert fit_widths([50, 2, 31, 6], [8, 8, 8, 8], 60) == [26, 2, 26, 6]
    assert fit_widths([50, 2, 20, 6], [8, 8, 8, 8], 60) == [32, 2, 20, 6]  # a column under the level stays whole
    assert fit_widths([50, 2, 30, 6], [8, 8, 8, 8], 10) == [8, 2, 8, 6]  # floors wider than the room: the floors


def test_the_match_table_on_an_80_column_terminal_cuts_both_names(tmp_path):
    names = list(model("resnet18").state_dict())
    torch.save({f"module.{k}": v for k, v in model("resnet18").state_dict().items()}, tmp_path / "wrapped.pth")
    result = invoke("match", tmp_path / "wrapped.pth", "--arch", "resnet18", env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("target "))) + 1
    rows = [line.split() for line in lines[start:start + len(names)]]
    assert all(len(line) <= 80 for line in lines[start - 1:start + len(names)]) and all(len(r) == 5 for r in rows)
    widths = {(len(r[0]), len(r[2])) for r in rows if "\u2026" in r[0] and "\u2026" in r[2]}
    assert widths and all(abs(t - s) <= 1 for t, s in widths)  # both names cut, to the same width
    for row, name in zip(rows, names):  # both ends of each name on both sides
        for cell, full in ((row[0], name), (row[2], f"module.{name}")):
            head, _, tail = cell.partition("\u2026")
            assert full.startswith(head) and full.endswith(tail) and (cell == full or len(tail) >= 8), (cell, full)


# --- the progress bar -------------------------------------------------------------------------------------------

def test_the_bar_shows_rate_and_eta_and_ends_its_line_before_an_error(tmp_path):
    from test_progress import run_child

    g = torch.Generator().manual_seed(0)
    src = tmp_path / "src.pth"
    torch.save({f"layer{i}.weight": torch.randn(256, 256, generator=g) for i in range(8)}, src)
    good = tmp_path / "good.safetensors"
    code, _, err = run_child(["convert", src, good], tty=True)
    assert code == 0 and "MB/s" in err and "ETA " in err and " in 0:" in err, repr(err)
    data = bytearray(src.read_bytes())  # flip one byte in the last record: its CRC fails at the end of the copy
    last = max(zipfile.ZipFile(src).infolist(), key=lambda i: i.header_offset if "/data/" in i.filename else -1)
    name_len, extra_len = struct.unpack("<HH", data[last.header_offset + 26:last.header_offset + 30])
    data[last.header_offset + 30 + name_len + extra_len + 100] ^= 0xFF
    bad = tmp_path / "bad.pth"
    bad.write_bytes(bytes(data))
    code, out, err = run_child(["convert", bad, tmp_path / "bad.safetensors"], tty=True)
    assert code == 1 and "\r[" in err, repr(err)
    error_line = err.replace("\r\n", "\n").split("\n")[-2]
    assert error_line.startswith("Error: ") and "CRC" in error_line, repr(err)  # on a line of its own
    assert not (tmp_path / "bad.safetensors").exists()


# --- several inputs ---------------------------------------------------------------------------------------------

@pytest.fixture
def three(tmp_path):
    paths = []
    for i, name in enumerate(("a", "b", "c")):
        torch.save({"model": small_sd(seed=i), "epoch": i}, tmp_path / f"{name}.pth")
        paths.append(tmp_path / f"{name}.pth")
    (tmp_path / "out").mkdir()
    return paths, tmp_path / "out"


def test_several_inputs_go_into_a_folder_one_line_each(three):
    paths, out = three
    result = invoke("convert", *paths, out, "--to", "safetensors")
    assert result.exit_code == 0, result.output
    assert [line.split(" -> ")[1].split(" ")[0] for line in result.stdout.splitlines() if line.startswith("Conv")] \
        == [str(out / f"{n}.safetensors") for n in "abc"]
    for p in paths:
        assert_deep_equal(ckconv.load(out / f"{p.stem}.safetensors"), torch.load(p, weights_only=True))
    again = invoke("convert", *paths, out, "--to", "safetensors")
    assert one_error_line(again) == f"Error: {out / 'a.safetensors'} already exists; pass --force to overwrite it"
    assert invoke("convert", *paths, out, "--to", "safetensors", "--force").exit_code == 0
    listed = json.loads(invoke("convert", *paths, out, "--to", "torch", "--json").stdout)
    assert [r["destination"] for r in listed["results"]] == [str(out / f"{n}.pth") for n in "abc"]


def test_several_inputs_are_checked_before_any_is_converted(three, tmp_path):
    paths, out = three
    (out / "c.safetensors").write_bytes(b"precious")
    line = one_error_line(invoke("convert", *paths, out, "--to", "safetensors"))
    assert line == f"Error: {out / 'c.safetensors'} already exists; pass --force to overwrite it"
    assert sorted(os.listdir(out)) == ["c.safetensors"]  # a and b were not written either
    (tmp_path / "sub").mkdir()
    torch.save(small_sd(), tmp_path / "sub" / "a.pth")
    line = one_error_line(invoke("convert", paths[0], tmp_path / "sub" / "a.pth", out, "--to", "safetensors"), code=2)
    assert "would both be written to" in line
    line = one_error_line(invoke("convert", *paths, tmp_path / "nofolder", "--to", "safetensors"), code=2)
    assert "is not a folder" in line and not (tmp_path / "nofolder").exists()
    line = one_error_line(invoke("convert", *paths, out, "--to", "safetensors", "--max-shard-size", "1MB"), code=2)
    assert "folder of its own" in line
    line = one_error_line(invoke("convert", paths[0], tmp_path / "missing.pth", out, "--to", "safetensors"))
    assert "missing.pth: no such file or folder" in line
    assert sorted(os.listdir(out)) == ["c.safetensors"] and (out / "c.safetensors").read_bytes() == b"precious"


def test_an_error_stops_the_run_and_names_what_was_not_attempted(three):
    paths, out = three
    paths[1].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    result = invoke("convert", *paths, out, "--to", "safetensors")
    line = one_error_line(result)
    assert str(paths[1]) in line and line.endswith(f"(stopped: 1 of 3 converted; not attempted: {paths[2]})")
    assert result.stdout.startswith("Converted ") and result.stdout.count("\n") >= 1
    assert sorted(os.listdir(out)) == ["a.safetensors"]
    (out / "a.safetensors").unlink()
    as_json = invoke("convert", *paths, out, "--to", "safetensors", "--json")
    error = json.loads(as_json.stdout)
    assert as_json.exit_code == 1 and error["type"] == "NotACheckpoint" and error["failed"] == str(paths[1])
    assert [r["source"] for r in error["results"]] == [str(paths[0])] and error["not_attempted"] == [str(paths[2])]


# --- shell completion -------------------------------------------------------------------------------------------

@pytest.mark.skipif(sys.platform == "win32", reason="bash completion")
def test_bash_completion_script(tmp_path):
    env = dict(os.environ, _CKCONV_COMPLETE="bash_source")
    result = run_cli(env=env)
    assert result.returncode == 0 and "_ckconv_completion" in result.stdout and "complete " in result.stdout
    env.update(_CKCONV_COMPLETE="bash_complete", COMP_WORDS="ckconv conv", COMP_CWORD="1")
    assert "convert" in run_cli(env=env).stdout


# --- --to that contradicts DST's extension (issue 23) --------------------------------------------------------

@pytest.mark.parametrize("name, to", [("out.safetensors", "torch"), ("out.pth", "safetensors"),
                                      ("out.bin", "safetensors"), ("out.safetensors", "dcp")])
def test_to_that_contradicts_the_extension_is_refused_and_nothing_written(tmp_path, name, to):
    torch.save(small_sd(), tmp_path / "in.pth")
    result = invoke("convert", tmp_path / "in.pth", tmp_path / name, "--to", to)
    line = one_error_line(result, code=2)  # a usage error
    assert f"{name} names a" in line and f"--to {to}" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.pth"]
    with pytest.raises(ckconv.errors.UsageError):
        ckconv.convert(tmp_path / "in.pth", tmp_path / name, to=to)


@pytest.mark.parametrize("name, to", [("out.pth", "torch"), ("out.bin", "torch"), ("out.weights", "safetensors"),
                                      ("sharded", "torch")])
def test_to_that_agrees_with_the_name_or_a_name_without_a_known_extension_is_fine(tmp_path, name, to):
    torch.save(small_sd(), tmp_path / "in.pth")
    assert invoke("convert", tmp_path / "in.pth", tmp_path / name, "--to", to).exit_code == 0
    assert ckconv.detect_format(tmp_path / name) == to
