#!/usr/bin/env python3
"""Matching speed (issue 4): 10k synthetic checkpoint keys against a 10k-key target must match in under 1 s.

    .venv/bin/python bench/bench_match.py            # all scenarios, best of 5
    .venv/bin/python bench/bench_match.py --reps 10

No torch, no files: the target is a list of TensorSpecs (a transformer-like stack of blocks) and the checkpoint a
tree of TensorRefs, so the numbers measure ckconv's matching alone (unwrap + the whole pipeline). Scenarios:

* wrapped   -- every key under ``module._orig_mod.``, in a Lightning-style bundle (wrapper step);
* prefixed  -- every key under ``net.`` and 2% of them under a legacy name a plugin rule fixes (prefix + rules);
* mixed     -- 80% exact, 10% under another common prefix, 5% needing suffix matching, 1% renamed caffe-style
               (structural alignment), a 10-way head against a 1000-way one, missing num_batches_tracked.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from ckconv.architectures import TensorSpec  # noqa: E402
from ckconv.matching.engine import match_keys  # noqa: E402
from ckconv.model import Storage, TensorRef  # noqa: E402
from ckconv.rules import KeyRule  # noqa: E402
from ckconv.contents.unwrap import unwrap  # noqa: E402

LIMIT_S = 1.0
STORAGE = Storage("0", "float32", 0, buffer=b"")


def target_spec(blocks=834):
    """~10k keys: blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.{weight,bias} (+ BN buffers)."""
    out = []

    def add(name, shape, kind="parameter", dtype="float32"):
        out.append(TensorSpec(name, shape, dtype, kind, name.rpartition(".")[0]))

    for i in range(blocks):
        d = 16 + i % 97
        p = f"blocks.{i}"
        add(f"{p}.norm1.weight", (d,))
        add(f"{p}.norm1.bias", (d,))
        add(f"{p}.attn.qkv.weight", (3 * d, d))
        add(f"{p}.attn.qkv.bias", (3 * d,))
        add(f"{p}.attn.proj.weight", (d, d))
        add(f"{p}.attn.proj.bias", (d,))
        add(f"{p}.norm2.weight", (d,))
        add(f"{p}.norm2.bias", (d,))
        add(f"{p}.norm2.running_mean", (d,), "buffer")
        add(f"{p}.norm2.num_batches_tracked", (), "buffer", "int64")
        add(f"{p}.mlp.fc1.weight", (4 * d, d))
        add(f"{p}.mlp.fc2.weight", (d, 4 * d))
    add("head.weight", (1000, 64))
    add("head.bias", (1000,))
    return out


def ref(shape):
    return TensorRef(STORAGE, "float32", shape)


def scenario(name, target):
    sd = {}
    if name == "wrapped":
        for t in target:
            sd[f"module._orig_mod.{t.name}"] = ref(t.shape)
        return {"state_dict": sd, "epoch": 3, "global_step": 1000}, []
    if name == "prefixed":
        for i, t in enumerate(target):
            key = t.name.replace(".mlp.fc1.", ".mlp.linear_1.") if i % 50 == 0 else t.name
            sd[f"net.{key}"] = ref(t.shape)
        rule = KeyRule("bench.legacy_mlp", r"^(.*\.mlp)\.linear_1\.(weight)$", r"\1.fc1.\2")
        return {"state_dict": sd}, [rule]
    n = len(target)
    for i, t in enumerate(target):
        if t.name.endswith("num_batches_tracked"):
            continue
        if t.name.startswith("head."):
            sd[t.name] = ref((10,) + tuple(t.shape[1:]))  # a fine-tuned 10-way head
        elif i < n * 0.80:
            sd[t.name] = ref(t.shape)
        elif i < n * 0.90:
            sd[f"encoder.{t.name}"] = ref(t.shape)
        elif i < n * 0.95:
            sd[f"s{i}.{t.name}"] = ref(t.shape)  # a prefix of its own: only the suffix lines up
        elif i < n * 0.99:
            sd[t.name] = ref(t.shape)
        else:
            module, _, leaf = t.name.rpartition(".")
            sd[f"caffe_{module.replace('.', '_')}.{leaf}"] = ref(t.shape)
    return {"model": sd, "optimizer": {"state": {}, "param_groups": []}}, []


def run(name, target, reps):
    root, rules = scenario(name, target)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        flat, _, _ = unwrap(root)
        source = [(k, v.shape, v.dtype) for k, v in flat.items()]
        report = match_keys(source, target, arch="bench", rules=rules)
        times.append(time.perf_counter() - t0)
    return len(flat), report, times


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    target = target_spec()
    print(f"target: {len(target)} keys; best and median of {args.reps} runs; limit {LIMIT_S:.1f} s")
    print(f"{'scenario':<10} {'source keys':>11} {'best s':>8} {'median s':>9}  result")
    worst = 0.0
    for name in ("wrapped", "prefixed", "mixed"):
        n, report, times = run(name, target, args.reps)
        hows = {}
        for m in report.matched:
            hows[m.how] = hows.get(m.how, 0) + 1
        worst = max(worst, min(times))
        print(f"{name:<10} {n:>11} {min(times):>8.3f} {statistics.median(times):>9.3f}  "
              f"coverage {report.coverage:.1%}, " + ", ".join(f"{k} {v}" for k, v in sorted(hows.items()))
              + f", filled {len(report.filled)}, mismatched {len(report.mismatched)}, "
              f"ambiguous {len(report.ambiguous)}, unexpected {len(report.unexpected)}")
    verdict = "OK" if worst < LIMIT_S else "TOO SLOW"
    print(f"{verdict}: slowest scenario {worst:.3f} s (limit {LIMIT_S:.1f} s)")
    return 0 if worst < LIMIT_S else 1


if __name__ == "__main__":
    sys.exit(main())
