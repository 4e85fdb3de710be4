"""``pip install ckconv`` without extras: a fresh venv, no torch, well under 150 MB; convert, inspect, scan and diff
print and write exactly what the full install does, and what needs torch says so in one line naming the extra."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run_cli

ROOT = Path(__file__).resolve().parents[1]
LIMIT_MB = 150
INSTALL_SECONDS = 600  # a bound, not a target: it takes ~30 s on an idle machine


def _size_mb(folder: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += os.stat(path).st_size
    return total / 1e6


@pytest.fixture(scope="module")
def light(tmp_path_factory):
    """A venv holding ckconv installed from a copy of this checkout (the build leaves nothing in the tree)."""
    base = tmp_path_factory.mktemp("light")
    source = base / "src-copy"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=INSTALL_SECONDS)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    started = time.monotonic()
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
                         capture_output=True, text=True, env=env, timeout=INSTALL_SECONDS)
    assert pip.returncode == 0, pip.stderr[-3000:]
    seconds = time.monotonic() - started
    print(f"\nlight install: {seconds:.1f} s, venv {_size_mb(venv):.1f} MB")
    return venv, env


def test_the_light_install_has_no_torch_and_is_small(light):
    venv, env = light
    python = str(venv / "bin" / "python")
    probe = "import importlib.util as u; print([m for m in ('torch', 'torchvision', 'triton') if u.find_spec(m)])"
    assert subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env).stdout.strip() == "[]"
    assert _size_mb(venv) < LIMIT_MB, f"the light install takes {_size_mb(venv):.1f} MB"
    site = subprocess.run([python, "-c", "import ckconv; print(ckconv.__file__)"], capture_output=True, text=True,
                          env=env).stdout
    assert str(venv) in site  # the installed copy, not this checkout
    licenses = list(venv.glob("lib/python*/site-packages/ckconv-*.dist-info/licenses/LICENSE"))
    assert licenses and licenses[0].read_text().startswith("MIT License")  # the LICENSE is in the wheel


def _run(exe, args, cwd, env):
    return subprocess.run([str(exe), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_the_four_commands_match_the_full_install_byte_for_byte(light, tmp_path):
    venv, env = light
    full_env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    light_env = {k: v for k, v in env.items() if k != "COLUMNS"}
    outputs = {}
    for side, exe, run_env in (("full", Path(sys.executable).with_name("ckconv"), full_env),
                               ("light", venv / "bin" / "ckconv", light_env)):
        work = tmp_path / side
        shutil.copytree(ROOT / "fixtures", work)
        steps = [["convert", "tiny_bundle.pth", "out.safetensors"], ["convert", "out.safetensors", "back.pth"],
                 ["convert", "tiny_model.safetensors", "model.pth", "--json"],
                 ["convert", "tiny_state_dict_legacy.pth", "legacy.safetensors"],
                 ["inspect", "tiny_bundle.pth"], ["inspect", "dtype_zoo.pth", "--json"],
                 ["scan", ".", "--json", "--exclude", "hostile", "--exclude", "*.safetensors", "--exclude", "*back.pth",
                  "--exclude", "model.pth"],
                 ["scan", "hostile", "--format", "sarif"], ["diff", "tiny_bundle.pth", "back.pth"],
                 ["diff", "tiny_bundle.pth", "dtype_zoo.pth", "--json"]]
        runs = [_run(exe, step, work, run_env) for step in steps]
        files = {name: (work / name).read_bytes() for name in ("out.safetensors", "back.pth", "model.pth",
                                                               "legacy.safetensors")}
        here = (work.resolve().as_uri(), str(work.resolve()))  # SARIF names the scanned folder
        outputs[side] = ([(r.returncode, *(t.replace(here[0], "<work>").replace(here[1], "<work>")
                                            for t in (r.stdout, r.stderr))) for r in runs], files)
    (full_runs, full_files), (light_runs, light_files) = outputs["full"], outputs["light"]
    assert [r[0] for r in full_runs] == [0, 0, 0, 0, 0, 0, 0, 1, 0, 1]
    for step, full, light_run in zip(range(len(full_runs)), full_runs, light_runs):
        assert light_run == full, f"step {step}: the light install printed something else"
    for name, data in full_files.items():
        assert _comparable(light_files[name]) == _comparable(data), name


def _comparable(data: bytes):
    """The file's bytes; for a torch.save archive, its size and every record but the random serialization_id
    (torch draws a new one for every file, and so does ckconv)."""
    if not data.startswith(b"PK"):
        return data
    import io
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return len(data), [(i.filename, i.header_offset, z.read(i)) for i in z.infolist()
                           if not i.filename.endswith("/.data/serialization_id")]
    assert json.loads(full_runs[6][1])["summary"]["checkpoints"] >= 3


@pytest.mark.parametrize("args, what", [
    (["match", "tiny_bundle.pth", "--arch", "resnet18"], "ckconv match"),
    (["match", "--arch", "resnet18"], "ckconv match"),
    (["convert", "tiny_bundle.pth", "o.pth", "--dtype", "fp16"], "ckconv convert --dtype"),
    (["convert", "tiny_bundle.pth", "o.pth", "--arch", "resnet18"], "ckconv convert --arch"),
])
def test_what_needs_torch_says_so_in_one_line(light, tmp_path, args, what):
    venv, env = light
    shutil.copy(ROOT / "fixtures" / "tiny_bundle.pth", tmp_path)
    env = {**env, "CKCONV_CACHE_DIR": str(tmp_path / "cache")}  # no spec cached from an earlier full run
    result = _run(venv / "bin" / "ckconv", args, tmp_path, env)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.splitlines() == [f"Error: {what} needs torch, which is not installed: "
                                          "pip install 'ckconv[torch]'"]
    assert sorted(os.listdir(tmp_path)) == ["cache", "tiny_bundle.pth"] or sorted(os.listdir(tmp_path)) == [
        "tiny_bundle.pth"]
    as_json = _run(venv / "bin" / "ckconv", [*args, "--json"], tmp_path, env)
    assert as_json.returncode == 2 and json.loads(as_json.stdout)["type"] == "MissingExtra"


def test_the_api_that_returns_tensors_names_the_extra(light):
    venv, env = light
    code = ("import ckconv\ntry:\n    ckconv.load(%r)\nexcept ckconv.errors.MissingExtra as exc:\n    print(exc)"
            % str(ROOT / "fixtures" / "tiny_bundle.pth"))
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == ("reading into torch tensors (ckconv.load) needs torch, which is not installed: "
                                  "pip install 'ckconv[torch]'"), out.stderr
