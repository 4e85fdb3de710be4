"""The "many tensors" section of the benchmark (issue 24): per-tensor costs, side by side with the naive scripts.

    .venv/bin/python bench/run.py --only many                      # 100k and 1M tensors (the issue's cases)
    .venv/bin/python bench/run.py --only many --many 100000,200000 --reps 3

Cases: N tiny tensors ``.pth -> .safetensors`` and M one-element tensors ``safetensors -> .pth`` against the naive
``torch.load`` + ``safetensors`` scripts, ``inspect --summary`` of N tensors, and a ``ckconv.structure`` record of
shared ``$ref``s (64 and 128 levels, each level doubling the tree) refused in time proportional to its size. Every
case is a whole process timed from spawn to exit (``run.measure``), contenders alternating (``run.alternate``).
"""

from __future__ import annotations

# argv: output .pth, output .safetensors, count. Seeded; 4 float32 elements per tensor, 10 per layer.
MAKE_TINY = r"""
import sys, torch
from safetensors.torch import save_file
n = int(sys.argv[3])
g = torch.Generator().manual_seed(0)
sd = {f"layers.{i // 10}.w{i % 10}": torch.randn(4, generator=g) for i in range(n)}
torch.save(sd, sys.argv[1])
save_file(sd, sys.argv[2])
"""

# argv: output .safetensors, count. Written directly (safetensors' own writer takes minutes for a million tensors):
# the header as safetensors writes it, one float32 element per tensor, names in a mixture-of-experts layout.
MAKE_ONE_ELEMENT = r"""
import json, struct, sys
n = int(sys.argv[2])
names = sorted(f"layers.{i // 1000}.experts.{i % 1000}.scale" for i in range(n))
header = {"__metadata__": {"format": "pt"}}
for i, name in enumerate(names):
    header[name] = {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
raw = json.dumps(header, separators=(",", ":")).encode()
raw += b" " * (-len(raw) % 8)
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(raw)) + raw)
    f.write(struct.pack(f"<{n}f", *[float(i % 97) for i in range(n)]))
"""

# argv: output .safetensors, levels. Object i holds object i-1 twice: `levels` records standing for 2**levels nodes.
MAKE_SHARED_REFS = r"""
import json, sys, torch
from safetensors.torch import save_file
levels = int(sys.argv[2])
objects = [{"$object": "argparse:Namespace", "id": 0, "state": {"a": 1}}]
for i in range(1, levels):
    objects.append({"$object": "argparse:Namespace", "id": i, "state": {"x": {"$ref": i - 1}, "y": {"$ref": i - 1}}})
record = {"w": {"$tensor": "w"}, "objects": objects}
save_file({"w": torch.ones(2)}, sys.argv[1], metadata={"format": "pt", "ckconv.structure": json.dumps(record)})
"""


def counts(text: str) -> list:
    return [int(float(t)) for t in str(text).replace("_", "").split(",") if t.strip()]


def run_section(bench, reps, run):
    """Every case of the section (``run``: the bench/run.py module); rows go to ``bench.results["many"]``."""
    CKCONV, PY, Series, alternate, warm = run.CKCONV, run.PY, run.Series, run.alternate, run.warm

    rows = bench.results.setdefault("many", [])
    work = bench.work
    rev = bench.args.before
    before = bench.before_tree(rev) if rev else None

    def earlier(contenders, args, out):
        """With --before REV: the same command run with the code of REV, one more contender (its Series)."""
        if before is None:
            return None
        series = Series(f"ckconv at {rev}")
        contenders.append((series, lambda: (["env", f"PYTHONPATH={before}", PY, "-m", "ckconv", *args], out)))
        return series
    small, big = (counts(bench.args.many) + [0, 0])[:2]
    if small:
        pth, st = work / f"tiny_{small}.pth", work / f"tiny_{small}.safetensors"
        bench.build_pair(pth, st, MAKE_TINY, small)
        label = f"{small:,} tiny tensors"
        warm(pth)
        ck, nv = Series("ckconv convert"), Series("naive torch script")
        out, naive_out = work / "out_many.safetensors", work / "out_many_naive.safetensors"
        contenders = [(ck, lambda: ([CKCONV, "convert", pth, out], out)),
                      (nv, lambda: ([PY, "-c", run.NAIVE_PTH_TO_ST, pth, naive_out], naive_out))]
        bf = earlier(contenders, ["convert", pth, out], out)
        alternate(contenders, reps, bench.log)
        rows.append({"case": f"{label}, .pth -> .safetensors", "ck": ck, "ref": nv, "goal": 0.15, "rss": None,
                     "before": bf})
        warm(st)
        summary = Series("ckconv inspect --summary")
        contenders = [(summary, lambda: ([CKCONV, "inspect", "--summary", st], None))]
        bf = earlier(contenders, ["inspect", "--summary", st], None)
        alternate(contenders, reps, bench.log)
        rows.append({"case": f"{label}, `inspect --summary` of the .safetensors", "ck": summary, "ref": None,
                     "goal": None, "seconds": 1.0, "rss": None, "before": bf})
    if big:
        st = bench.build(f"one_element_{big}.safetensors", MAKE_ONE_ELEMENT, big)
        warm(st)
        ck, nv = Series("ckconv convert"), Series("naive torch script")
        out, naive_out = work / "out_many.pth", work / "out_many_naive.pth"
        contenders = [(ck, lambda: ([CKCONV, "convert", st, out], out)),
                      (nv, lambda: ([PY, "-c", run.NAIVE_ST_TO_PTH, st, naive_out], naive_out))]
        bf = earlier(contenders, ["convert", st, out], out)
        alternate(contenders, reps, bench.log)
        rows.append({"case": f"{big:,} one-element tensors, safetensors -> .pth", "ck": ck, "ref": nv, "goal": 0.25,
                     "rss": 512, "before": bf})
    bombs = [bench.build(f"shared_refs_{n}.safetensors", MAKE_SHARED_REFS, n) for n in (64, 128)]
    series = [Series(f"ckconv convert, {n} levels ({p.stat().st_size:,} bytes, 2**{n} nodes expanded)")
              for n, p in zip((64, 128), bombs)]
    alternate([(s, lambda p=p: ([CKCONV, "convert", p, work / "out_bomb.pth"], work / "out_bomb.pth"))
               for s, p in zip(series, bombs)], reps, bench.log, ok=(1, 2))
    rows.append({"case": "structure record of shared `$ref`s, refused: 128 levels / 64 levels", "ck": series[1],
                 "ref": series[0], "goal": None, "proportional": bombs[1].stat().st_size / bombs[0].stat().st_size,
                 "rss": None})


def table(bench, run) -> tuple:
    """(markdown lines, [(target, goal, measured, met)]) for the section."""
    MIB = run.MIB

    rows = bench.results.get("many") or []
    if not rows:
        return [], []
    lines = ["### Many tensors (issue 24)\n",
             "| case | ckconv median s | range s | CPU s | peak RSS MiB | reference | reference median s | CPU s | "
             "peak RSS MiB | ratio |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    targets = []
    for r in rows:
        ck, ref = r["ck"], r["ref"]
        if not ck.samples:
            continue
        refcells = (f"{ref.label} | {ref.wall:.2f} | {ref.cpu:.2f} | {ref.rss / MIB:,.0f}" if ref is not None and
                    ref.samples else "- | - | - | -")
        rv = ck.wall / ref.wall if ref is not None and ref.samples else None
        lines.append(f"| {r['case']} | {ck.wall:.2f} | {ck.spread} | {ck.cpu:.2f} | {ck.rss / MIB:,.0f} | {refcells} | "
                     f"{'-' if rv is None else f'{rv:.2f}'} |")
        bf = r.get("before")
        if bf is not None and bf.samples:
            bv = bf.wall / ref.wall if ref is not None and ref.samples else None
            lines.append(f"| {r['case']}, {bf.label} (before) | {bf.wall:.2f} | {bf.spread} | {bf.cpu:.2f} | "
                         f"{bf.rss / MIB:,.0f} | {refcells} | {'-' if bv is None else f'{bv:.2f}'} |")
        if r.get("goal") is not None and rv is not None:
            targets.append((f"{r['case']}: ckconv / naive", f"<= {r['goal']}", f"{rv:.2f}", rv <= r["goal"]))
            cpu = ck.cpu / ref.cpu
            targets.append((f"{r['case']}: ckconv / naive, CPU seconds", f"<= {r['goal']}", f"{cpu:.2f}",
                            cpu <= r["goal"]))
        if r.get("rss") is not None:
            targets.append((f"{r['case']}: ckconv peak RSS", f"<= {r['rss']} MiB", f"{ck.rss / MIB:,.0f} MiB",
                            ck.rss / MIB <= r["rss"]))
        if r.get("seconds") is not None:
            targets.append((r["case"], f"<= {r['seconds']} s", f"{ck.wall:.2f} s", ck.wall <= r["seconds"]))
        if r.get("proportional") is not None and rv is not None:
            targets.append(("shared `$ref`s refused in time proportional to the record (2x the levels: time ratio "
                            "near the size ratio, not 2**64)", f"<= {r['proportional']:.1f}", f"{rv:.2f}",
                            rv <= r["proportional"] * 1.5))
    lines.append("")
    return lines, targets
