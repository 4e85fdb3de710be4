#!/usr/bin/env python3
"""Pickle speed (issue 24): the opcode flood, ``scan`` against picklescan, the 300k-storage legacy file.

    .venv/bin/python bench/bench_pickle.py [--reps 3] [--keep]

Each measurement is a child process that imports what it needs, then times only the operation (so import costs,
2-5 s for torch, do not blur the ratios); contenders alternate, the table shows medians and the load average.
picklescan is a bench-only dependency: ``pip install torch==2.14.1 torchvision==0.29.1 picklescan``; without it
that row says so. Inputs are built in bench/work/pickle/ (seeded, tiny tensors) and deleted unless --keep.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "pickle"
PY = sys.executable

MAKE = r"""
import sys, torch
from pathlib import Path
work = Path(sys.argv[1])
flood = work / "flood.pkl"
if not flood.exists():
    flood.write_bytes(b"\x80\x04" + b"N0" * 10_000_000 + b"N.")   # 20 MB of NONE POP
many = work / "100k.pth"
if not many.exists():
    torch.save({f"layer{i}.weight": torch.full((1,), float(i)) for i in range(100_000)}, many)
legacy = work / "legacy300k.pth"
if not legacy.exists():
    torch.save({f"t{i}": torch.full((1,), float(i)) for i in range(300_000)}, legacy,
               _use_new_zipfile_serialization=False)
"""

TIMED = r"""
import sys, time
{setup}
t = time.perf_counter()
{body}
print(time.perf_counter() - t)
"""

CASES = {  # name -> (target text, target ratio or seconds, [(contender, setup, body)])
    "20 MB NONE POP flood, read": ("<= 2 s", 2.0, [
        ("ckconv", "from ckconv.pickling.unpickler import unpickle; f = open(sys.argv[1], 'rb')",
         "unpickle(f, where='flood')"),
        ("pickle.loads", "import pickle; data = open(sys.argv[1], 'rb').read()", "pickle.loads(data)"),
    ]),
    "scan of the 100k-tensor .pth": ("faster than picklescan", 1.0, [
        ("ckconv scan", "from ckconv.reports.scanning import scan_paths",
         "r = scan_paths([sys.argv[1]]); assert r[0].verdict == 'safe', r"),
        ("picklescan", "from picklescan.scanner import scan_file_path",
         "r = scan_file_path(sys.argv[1]); assert r.scan_err is False, r"),
    ]),
    "legacy .pth, 300k storages -> .safetensors": ("<= 0.5x naive", 0.5, [
        ("ckconv convert", "import ckconv, os; out = sys.argv[1] + '.out.safetensors'",
         "ckconv.convert(sys.argv[1], out, force=True)"),
        ("naive torch.load + save_file", "import torch; from safetensors.torch import save_file; "
                                         "out = sys.argv[1] + '.naive.safetensors'",
         "save_file(torch.load(sys.argv[1], weights_only=True), out)"),
    ]),
}
FILES = {"20 MB NONE POP flood, read": "flood.pkl", "scan of the 100k-tensor .pth": "100k.pth",
         "legacy .pth, 300k storages -> .safetensors": "legacy300k.pth"}


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH", "")]))
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def timed(setup, body, path) -> float | str:
    proc = subprocess.run([PY, "-c", TIMED.format(setup=setup, body=body), str(path)], capture_output=True,
                          text=True, env=child_env(), timeout=1800)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return "unavailable: " + last[:80]
    return float(proc.stdout.strip().splitlines()[-1])


def run_case(name, reps):
    target_text, target, contenders = CASES[name]
    path = WORK / FILES[name]
    times: dict = {c[0]: [] for c in contenders}
    for rep in range(reps):
        order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
        for label, setup, body in order:
            times[label].append(timed(setup, body, path))
    medians = {k: (statistics.median(v) if all(isinstance(x, float) for x in v) else v[0]) for k, v in times.items()}
    mine, ref = (medians[c[0]] for c in contenders)
    if not isinstance(mine, float):
        return name, medians, f"ckconv failed: {mine}", False
    if name.startswith("20 MB"):
        return name, medians, f"{mine:.2f} s ({target_text})", mine <= target
    if not isinstance(ref, float):
        return name, medians, f"reference {ref}", False
    ratio = mine / ref
    return name, medians, f"{ratio:.2f}x ({target_text})", ratio <= target if target != 1.0 else ratio < 1.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated words a case name must contain")
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run([PY, "-c", MAKE, str(WORK)], check=True, env=child_env())
    load_before = os.getloadavg()[0]
    rows = []
    for name in CASES:
        if args.only and not any(w in name for w in args.only.split(",")):
            continue
        rows.append(run_case(name, args.reps))
    load_after = os.getloadavg()[0]
    print("| case | contenders (median s) | result | met |")
    print("|---|---|---|---|")
    for name, medians, result, met in rows:
        shown = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in medians.items())
        print(f"| {name} | {shown} | {result} | {'yes' if met else 'no'} |")
    print(f"\nload average {load_before:.2f} at start, {load_after:.2f} at end; {os.cpu_count()} cores; "
          f"{args.reps} repetitions, operation timed inside each child (imports excluded)")
    if not args.keep:
        shutil.rmtree(WORK, ignore_errors=True)


if __name__ == "__main__":
    main()
