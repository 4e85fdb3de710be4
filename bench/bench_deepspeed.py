#!/usr/bin/env python3
"""ZeRO consolidation (issue 25): ckconv against DeepSpeed's own ``zero_to_fp32.py`` on the same folder.

    .venv/bin/python bench/bench_deepspeed.py                 # ZeRO-2 and ZeRO-3, 2 ranks, ~256 MiB of fp32 weights
    .venv/bin/python bench/bench_deepspeed.py --mib 1024 --reps 3 --stages 3

The folders are written by DeepSpeed itself (CPU, gloo, torchrun with 2 ranks, one AdamW step, seeded) under
bench/work/deepspeed/ and kept for the next run. Each contender is one child process: ``python
<folder>/zero_to_fp32.py <folder> <out> --safe_serialization`` (the script DeepSpeed copies beside every
checkpoint) and ``ckconv convert <folder> out.safetensors --model-only``, run alternately; the table shows the
median wall time and the peak RSS of each (``os.wait4``). Targets: ckconv's peak RSS <= 0.25x DeepSpeed's, wall
time no more than DeepSpeed's. The latest table goes to bench/RESULTS-deepspeed.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "work" / "deepspeed"
BIN = Path(sys.executable).parent
MIB = 1 << 20

WRITER = r"""
import os, sys, torch, deepspeed
stage, mib, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
deepspeed.init_distributed(dist_backend="gloo")
torch.manual_seed(0)
width = 1024
layers = max(1, mib * (1 << 20) // (4 * (width * width + width)))
model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage}, "steps_per_print": 10**6,
       "zero_allow_untested_optimizer": True}
engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
loss = engine(torch.randn(2, width)).pow(2).mean()
engine.backward(loss)
engine.step()
engine.save_checkpoint(out)
"""


def build(stage: int, mib: int) -> Path:
    folder = WORK / f"zero{stage}-{mib}mib"
    if (folder / "latest").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    script = WORK / "writer.py"
    WORK.mkdir(parents=True, exist_ok=True)
    script.write_text(WRITER)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", str(script), str(stage),
                    str(mib), str(folder)], env=env, check=True, stdout=subprocess.DEVNULL)
    return folder


def measure(cmd, out: Path) -> tuple:
    """(wall seconds, peak RSS MiB) of one child process."""
    shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[0]} failed: {err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def compare(folder: Path, reps: int) -> dict:
    contenders = {
        "deepspeed zero_to_fp32.py": ([sys.executable, str(folder / "zero_to_fp32.py"), str(folder),
                                       str(WORK / "out-ds"), "--safe_serialization"], WORK / "out-ds"),
        "ckconv convert --model-only": ([str(BIN / "ckconv"), "convert", str(folder), str(WORK / "out.safetensors"),
                                         "--model-only", "--force"], WORK / "out.safetensors"),
    }
    runs: dict = {name: [] for name in contenders}
    names = list(contenders)
    for rep in range(reps):
        for name in names[rep % 2:] + names[:rep % 2]:  # alternate who goes first
            runs[name].append(measure(*contenders[name]))
    return {name: (statistics.median(w for w, _ in r), max(m for _, m in r)) for name, r in runs.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="fp32 weights to train, MiB")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--stages", default="2,3")
    args = ap.parse_args()
    lines = [f"# ZeRO consolidation: ckconv vs DeepSpeed zero_to_fp32", "",
             f"Run {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC, `bench/bench_deepspeed.py --mib "
             f"{args.mib} --reps {args.reps} --stages {args.stages}`, load average {os.getloadavg()[0]:.2f} at "
             "start (shared machine). Medians of alternating runs; peak RSS is the largest of the runs.", "",
             "| folder | contender | wall s | peak RSS MiB |", "|---|---|---:|---:|"]
    verdicts = []
    for stage in (int(s) for s in args.stages.split(",")):
        folder = build(stage, args.mib)
        result = compare(folder, args.reps)
        for name, (wall, rss) in result.items():
            lines.append(f"| ZeRO-{stage}, 2 ranks, {args.mib} MiB | {name} | {wall:.2f} | {rss:.0f} |")
        (dw, dm), (cw, cm) = result["deepspeed zero_to_fp32.py"], result["ckconv convert --model-only"]
        verdicts.append(f"ZeRO-{stage}: peak RSS ckconv/DeepSpeed = {cm / dm:.2f} (target <= 0.25: "
                        f"{'met' if cm <= 0.25 * dm else 'NOT met'}); wall ckconv/DeepSpeed = {cw / dw:.2f} "
                        f"(target <= 1: {'met' if cw <= dw else 'NOT met'})")
    lines += [""] + [f"- {v}" for v in verdicts]
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "bench" / "RESULTS-deepspeed.md").write_text(text)


if __name__ == "__main__":
    main()
