#!/usr/bin/env python3
"""ckconv benchmark (issue 6): conversion against the naive torch script and `cp`, CLI start-up, peak memory.

    make bench                                   # everything: vgg16 (0.5), synthetic 1.6 GiB and 4 GiB
    BENCH_SIZES=0.5 .venv/bin/python bench/run.py          # quick: vgg16 only
    .venv/bin/python bench/run.py --sizes 0.5,1.6 --reps 5 --keep --only convert,cli
    .venv/bin/python bench/run.py --only many --many 100000,1000000     # many tensors (bench/many_tensors.py)

Every measurement is one child process, timed from spawn to exit, with its peak RSS and CPU time taken from
``os.wait4``. Contenders run alternately (rotating order) and the table shows medians. Inputs are built here
(seeded random weights, never downloaded) under bench/work/ and deleted at the end unless --keep. The latest
table goes to bench/RESULTS.md. What the numbers mean: bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import many_tensors

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
VENV_BIN = Path(sys.executable).parent
PY = str(VENV_BIN / "python")
CKCONV = str(VENV_BIN / "ckconv")
GIB = 1 << 30
MIB = 1 << 20

# --- child scripts ------------------------------------------------------------------------------------------

MAKE_VGG16 = r"""
import sys, torch, torchvision
torch.manual_seed(0)
model = torchvision.models.vgg16(weights=None)   # seeded random init; nothing is downloaded
torch.save(model.state_dict(), sys.argv[1])
"""

MAKE_SYNTHETIC = r"""
import sys, torch
target = int(float(sys.argv[2]) * (1 << 30))
g = torch.Generator().manual_seed(0)
sd, total, i = {}, 0, 0
while total < target:   # a transformer-like state_dict: big fp32 and fp16 matrices plus small vectors
    p = f"layers.{i}."
    for name, shape, dtype in [("attn.qkv.weight", (3072, 1024), torch.float32), ("attn.out.weight", (1024, 1024), torch.float32),
                               ("mlp.up.weight", (4096, 1024), torch.float16), ("mlp.down.weight", (1024, 4096), torch.float32),
                               ("norm.weight", (1024,), torch.float32), ("norm.bias", (1024,), torch.float32)]:
        t = torch.empty(shape, dtype=dtype).uniform_(-0.05, 0.05, generator=g)
        sd[p + name] = t
        total += t.numel() * t.element_size()
    i += 1
sd["step"] = torch.tensor(i, dtype=torch.int64)
torch.save(sd, sys.argv[1])
"""

MAKE_BUNDLE = r"""
import sys, torch
sd = torch.load(sys.argv[2], weights_only=True)   # argv: output, source
params = {k: v.clone().requires_grad_(True) for k, v in sd.items() if v.is_floating_point()}
opt = torch.optim.Adam(params.values(), lr=1e-4)
g = torch.Generator().manual_seed(1)
for p in params.values():
    p.grad = torch.randn(p.shape, generator=g) * 1e-3
opt.step()
torch.save({"model": sd, "optimizer": opt.state_dict(), "epoch": 7, "best_acc": 0.71,
            "args": {"lr": 1e-4, "arch": "vgg16", "batch_size": 64}}, sys.argv[1])
"""

NAIVE_PTH_TO_ST = r"""
import sys, torch
from safetensors.torch import save_file
save_file(torch.load(sys.argv[1], map_location="cpu", weights_only=True), sys.argv[2])
"""

NAIVE_ST_TO_PTH = r"""
import sys, torch
from safetensors.torch import load_file
torch.save(load_file(sys.argv[1]), sys.argv[2])
"""

NAIVE_SHARDED = r"""
import os, sys, torch
from huggingface_hub import save_torch_state_dict
os.makedirs(sys.argv[2], exist_ok=True)
save_torch_state_dict(torch.load(sys.argv[1], map_location="cpu", weights_only=True), sys.argv[2], max_shard_size=sys.argv[3])
"""

NAIVE_BUNDLE = r"""
import sys, torch
from safetensors.torch import save_file
flat = {}
def walk(node, prefix):   # what people write by hand: tensors under dotted keys, everything else dropped
    if isinstance(node, torch.Tensor):
        flat[prefix] = node.contiguous()
    elif isinstance(node, dict):
        for k, v in node.items():
            walk(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            walk(v, f"{prefix}.{i}")
walk(torch.load(sys.argv[1], map_location="cpu", weights_only=True), "")
save_file(flat, sys.argv[2])
"""

TORCH_CHECK = r"""
import sys
sys.argv = ["ckconv", *sys.argv[1:]]
from ckconv.cli import main
try:
    main()
except SystemExit:
    pass
sys.stdout.flush()
sys.stderr.write("\nTORCH_IMPORTED=%d\n" % ("torch" in sys.modules))
"""

MATCH_10K = r"""
import sys, time
from ckconv.architectures import TensorSpec
from ckconv.matching.engine import match_keys
n, kinds = 10_000, ["conv", "bn", "fc", "proj"]
target = [TensorSpec(f"blocks.{i // 4}.{kinds[i % 4]}.weight", (i % 97 + 1, 8), "float32", "parameter",
                     f"blocks.{i // 4}") for i in range(n)]
cases = {"wrapped": [("module." + t.name, t.shape, t.dtype) for t in target],   # DataParallel-style prefix
         "renamed": [(f"backbone.layer{i // 4}.{kinds[i % 4]}_w", t.shape, t.dtype) for i, t in enumerate(target)]}
source = cases[sys.argv[1]]
t0 = time.perf_counter()
report = match_keys(source, target, arch="synthetic")
print(f"{time.perf_counter() - t0:.6f} {len(report.matched)}")
"""

CKCONV_IMPORTS = "import ckconv.cli, ckconv.api; from ckconv.plugins import host; host()"

# The byte-moving core of a .pth -> .safetensors conversion, without ckconv's start-up or parsing: copy the file's
# bytes (argv[1]) to argv[2] with ckconv's fastcopy, with or without the CRC-32 pass, then fsync (as ckconv does).
COPY_CORE = r"""
import os, sys
from ckconv.storage import fastcopy
src, dst, mode = sys.argv[1], sys.argv[2], sys.argv[3]
n = os.path.getsize(src)
s = os.open(src, os.O_RDONLY)
d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
if mode == "crc":
    fastcopy.copy_with_crc(s, 0, d, 0, n)
else:
    fastcopy.kernel_copy(s, 0, d, 0, n)
os.fsync(d)
"""


# --- running and measuring ----------------------------------------------------------------------------------

@dataclass
class Sample:
    wall: float
    cpu: float
    rss: int  # bytes


@dataclass
class Series:
    label: str
    samples: list = field(default_factory=list)
    note: str = ""

    @property
    def wall(self):
        return statistics.median(s.wall for s in self.samples) if self.samples else None

    @property
    def cpu(self):
        return statistics.median(s.cpu for s in self.samples) if self.samples else None

    @property
    def rss(self):
        return max(s.rss for s in self.samples) if self.samples else None

    @property
    def spread(self):
        if len(self.samples) < 2:
            return ""
        w = sorted(s.wall for s in self.samples)
        return f"{w[0]:.2f}-{w[-1]:.2f}"


def child_env():
    env = dict(os.environ)
    env.setdefault("CKCONV_CACHE_DIR", str(BENCH / "work" / "spec-cache"))  # never the user's ~/.cache
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # let the children cache bytecode, as on a user's machine
    env.pop("CKCONV_DEBUG", None)
    return env


TIME = "/usr/bin/time" if os.access("/usr/bin/time", os.X_OK) else None


def measure(cmd, *, env=None, ok=(0,)) -> Sample:
    """Run ``cmd`` once: wall time from spawn to exit, CPU time (wait4) and peak RSS of that child alone.

    The peak RSS comes from /usr/bin/time, which forks the command from its own small process: a child spawned
    straight from this (bigger) Python process inherits its RSS high-water mark through exec on Linux.
    """
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as rss:
        full = [TIME, "-f", "%M", "-o", rss.name, *map(str, cmd)] if TIME else list(map(str, cmd))
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                env=env or child_env())
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode not in ok:
            err.seek(0)
            raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{err.read().decode()[-2000:]}")
        kib = usage.ru_maxrss
        if TIME:
            lines = [ln for ln in rss.read().split() if ln.strip().isdigit()]
            kib = int(lines[-1]) if lines else kib
    return Sample(wall, usage.ru_utime + usage.ru_stime, kib * 1024)


def run_python(code, *args, check=True, env=None, prefix=()):
    proc = subprocess.run([*prefix, PY, "-c", code, *map(str, args)], env=env or child_env(), capture_output=True,
                          text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"child script failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return proc


def remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    for tmp in path.parent.glob(f".{path.name}.ckconv-tmp-*"):
        remove(tmp)


def settle():
    """Flush dirty pages left by the previous run so that its writeback is not charged to the next one."""
    os.sync()


def warm(path: Path):
    """Read a file once so every contender starts from the same warm page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * MIB)
        while f.readinto(buf):
            pass


def alternate(contenders, reps, log, ok=(0,)):
    """contenders: [(Series, make_cmd() -> (cmd, output path or None))]. Rotates the order every repetition."""
    n = len(contenders)
    for rep in range(reps):
        order = contenders[rep % n:] + contenders[:rep % n]
        for series, make in order:
            cmd, out = make()
            if out is not None:
                remove(out)
            settle()
            sample = measure(cmd, ok=ok)
            series.samples.append(sample)
            log(f"    {series.label:<34} {sample.wall:7.2f} s  cpu {sample.cpu:6.2f} s  rss {sample.rss / MIB:7.1f} MiB")
            if out is not None:
                remove(out)


# --- the benchmark ------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.made: list[Path] = []
        self.results: dict = {"convert": [], "other": [], "cli": [], "match": [], "breakdown": [], "targets": [],
                              "notes": [], "many": []}
        self.t0 = time.time()
        probe = run_python("from ckconv.storage.fastcopy import crc32_backend; print(crc32_backend())", check=False)
        self.crc = probe.stdout.strip() or "zlib"

    def log(self, msg):
        print(msg, flush=True)

    # inputs
    def build(self, name, code, *args):
        path = self.work / name
        if path.exists() and self.args.keep:
            self.log(f"  reusing {path.name} ({path.stat().st_size / MIB:,.0f} MiB)")
        else:
            remove(path)
            t0 = time.perf_counter()
            run_python(code, path, *args)
            self.log(f"  built {path.name}: {path.stat().st_size / MIB:,.0f} MiB in {time.perf_counter() - t0:.1f} s")
        self.made.append(path)
        return path

    def build_pair(self, first, second, code, *args):
        """Two inputs one script writes together (``code first second *args``)."""
        if first.exists() and second.exists() and self.args.keep:
            self.log(f"  reusing {first.name}, {second.name}")
        else:
            remove(first)
            remove(second)
            t0 = time.perf_counter()
            run_python(code, first, second, *args)
            self.log(f"  built {first.name}, {second.name} in {time.perf_counter() - t0:.1f} s")
        self.made += [first, second]

    def cleanup(self):
        for tree in getattr(self, "worktrees", []):
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        if self.args.keep:
            return
        for path in self.made:
            remove(path)
        for out in self.work.glob("out*"):
            remove(out)

    def free_disk(self):
        return shutil.disk_usage(self.work).free

    @staticmethod
    def mem_available():
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
        return 0

    # baselines measured once per run
    def baselines(self):
        self.log("baselines")
        reps = max(self.args.reps, 5)
        series = {
            "python": Series("python -c pass"),
            "imports": Series("python + ckconv imports, plugins loaded"),
            "torch": Series("python -c 'import torch'"),
        }
        cmds = {"python": [PY, "-c", "pass"], "imports": [PY, "-c", CKCONV_IMPORTS],
                "torch": [PY, "-c", "import torch"]}
        alternate([(series[k], lambda k=k: (cmds[k], None)) for k in series], reps, self.log)
        self.base = series
        return series

    def convert_case(self, title, src: Path, reps, *, ck_args=(), naive=None, out_suffix=".safetensors",
                     group="convert", size_label=""):
        self.log(f"{title}: {src.name} ({src.stat().st_size / MIB:,.0f} MiB), {reps} rep(s)")
        warm(src)
        ck = Series("ckconv convert")
        cp = Series("cp")
        cps = Series("cp + sync FILE (durable, like ckconv)")
        contenders = [
            (ck, lambda: ([CKCONV, "convert", str(src), str(self.work / f"out_ck{out_suffix}"), *ck_args],
                          self.work / f"out_ck{out_suffix}")),
            (cp, lambda: (["cp", str(src), str(self.work / "out_cp")], self.work / "out_cp")),
            (cps, lambda: (["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", str(src), str(self.work / "out_cps")],
                           self.work / "out_cps")),
        ]
        ckz = None
        if group == "convert" and self.crc != "zlib":  # the same conversion with zlib's CRC-32, side by side
            ckz = Series("ckconv convert, zlib CRC-32")
            contenders.insert(1, (ckz, lambda: (["env", "CKCONV_CRC32=zlib", CKCONV, "convert", str(src),
                                                 str(self.work / f"out_ckz{out_suffix}"), *ck_args],
                                                self.work / f"out_ckz{out_suffix}")))
        nv = None
        if naive is not None:
            code, extra, why_not = naive
            nv = Series("naive torch script")
            if why_not:
                nv.note = why_not
            else:
                contenders.insert(1, (nv, lambda: ([PY, "-c", code, str(src), str(self.work / f"out_naive{out_suffix}"),
                                                    *extra], self.work / f"out_naive{out_suffix}")))
        try:
            alternate(contenders, reps, self.log)
        except RuntimeError as exc:  # one broken contender must not lose the rest of the run
            self.log(f"  FAILED: {exc}")
            self.results["notes"].append(f"{title}: a run failed, its numbers are incomplete: {str(exc).splitlines()[0][:200]}")
            for series, _ in contenders:
                if not series.samples:
                    series.note = "failed"
        row = {"case": title, "size": size_label or f"{src.stat().st_size / MIB:,.0f} MiB",
               "bytes": src.stat().st_size, "ck": ck, "naive": nv, "cp": cp, "cps": cps, "ckz": ckz}
        self.results[group].append(row)
        return row

    def cli_case(self, label, args, reps, torch_check=True):
        s = Series(label)
        alternate([(s, lambda: ([CKCONV, *args], None))], reps, self.log)
        imported = None
        if torch_check:
            proc = run_python(TORCH_CHECK, *args, check=False)
            imported = "TORCH_IMPORTED=1" in proc.stderr
        self.results["cli"].append({"label": label, "series": s, "torch": imported})
        return s

    def breakdown(self, src: Path, reps):
        """Where ckconv's time above `cp + sync` goes, for one .pth: its byte-moving core alone (fastcopy, no start-up,
        no parsing), without and with the CRC-32 pass, beside the whole command."""
        self.log(f"where the time goes: {src.name}")
        warm(src)
        rows = [("cp + sync FILE", lambda: (["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", str(src),
                                             str(self.work / "out_cps")], self.work / "out_cps")),
                ("python: fastcopy kernel copy + fsync (no CRC)",
                 lambda: ([PY, "-c", COPY_CORE, str(src), str(self.work / "out_core"), "copy"], self.work / "out_core")),
                (f"python: fastcopy copy + CRC-32 ({self.crc}) + fsync",
                 lambda: ([PY, "-c", COPY_CORE, str(src), str(self.work / "out_core"), "crc"], self.work / "out_core")),
                ("python: fastcopy copy + CRC-32 (zlib) + fsync",
                 lambda: (["env", "CKCONV_CRC32=zlib", PY, "-c", COPY_CORE, str(src), str(self.work / "out_core"),
                           "crc"], self.work / "out_core")),
                ("ckconv convert (everything)", lambda: ([CKCONV, "convert", str(src), str(self.work / "out_ck.safetensors")],
                                                         self.work / "out_ck.safetensors"))]
        if self.crc == "zlib":
            rows.pop(3)
        series = [(Series(label), make) for label, make in rows]
        alternate(series, reps, self.log)
        self.results["breakdown"] = [s for s, _ in series]

    def match_case(self, label, args, reps, *, cache, ok=(0,), target=None, before=None, fresh_cache=False):
        """A `ckconv match`/`convert --arch` row: CKCONV_CACHE_DIR=cache (a new empty one per run with fresh_cache);
        ``before``: run the code of an earlier commit instead (PYTHONPATH=its src)."""
        s = Series(label)
        runner = [PY, "-m", "ckconv"] if before else [CKCONV]
        extra = [f"PYTHONPATH={before}"] if before else []

        def make():
            where = cache / f"fresh-{len(s.samples)}" if fresh_cache else cache
            return ["env", f"CKCONV_CACHE_DIR={where}", *extra, *runner, *map(str, args)], (where if fresh_cache else None)

        alternate([(s, make)], reps, self.log, ok=ok)
        env = dict(child_env(), CKCONV_CACHE_DIR=str(cache / "probe" if fresh_cache else cache))
        if before:
            env["PYTHONPATH"] = str(before)
        imported = "TORCH_IMPORTED=1" in run_python(TORCH_CHECK, *args, check=False, env=env).stderr
        if fresh_cache:
            remove(cache / "probe")
        self.results["match"].append({"label": label, "series": s, "torch": imported, "target": target})
        return s

    def before_tree(self, rev):
        """A checkout of ``rev`` (BENCH_BEFORE) under the work dir, to time the code before a change side by side."""
        tree = self.work / f"before-{rev}"
        if not tree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), rev], check=True,
                           capture_output=True)
        self.worktrees = getattr(self, "worktrees", []) + [tree]
        return tree / "src"

    def match_section(self, vgg: Path, reps):
        self.log("matching with the spec cache")
        cache = self.work / "spec-cache"
        remove(cache)
        existing = self.work / "out_taken.safetensors"
        existing.write_bytes(b"a file the user already has")
        self.made += [cache, existing]
        quick = max(3, reps)
        self.match_case("match vgg16.pth --arch vgg16, first run (empty cache)", ["match", vgg, "--arch", "vgg16"],
                        quick, cache=cache, fresh_cache=True)
        measure(["env", f"CKCONV_CACHE_DIR={cache}", CKCONV, "match", vgg, "--arch", "vgg16"])  # warm
        self.match_case("match vgg16.pth --arch vgg16, cached", ["match", vgg, "--arch", "vgg16"], reps, cache=cache,
                        target=("<= 1.5 s, no import torch", 1.5, True))
        self.log("  building every architecture's spec once (untimed)")
        measure(["env", f"CKCONV_CACHE_DIR={cache}", CKCONV, "match", vgg, "--arch", "auto"])
        self.match_case("match vgg16.pth --arch auto, cached", ["match", vgg, "--arch", "auto"], quick, cache=cache,
                        target=("<= 2 s, no import torch", 2.0, True))
        # the typo is checked against every namespace's names: the first one lists the plugins' too (timm: untimed)
        measure(["env", f"CKCONV_CACHE_DIR={cache}", CKCONV, "match", vgg, "--arch", "vgg61"], ok=(1,))
        self.match_case("match vgg16.pth --arch vgg61 (a typo), cached", ["match", vgg, "--arch", "vgg61"], reps,
                        cache=cache, ok=(1,), target=("< 0.5 s, no import torch", 0.5, True))
        self.match_case("convert vgg16.pth onto an existing DST --arch vgg16 (refused), empty cache",
                        ["convert", vgg, existing, "--arch", "vgg16"], reps, cache=cache, ok=(1,), fresh_cache=True,
                        target=("refused before any matching: no import torch", None, True))
        self.match_case("convert vgg16.pth out.safetensors --arch vgg16, cached",
                        ["convert", vgg, self.work / "out_arch.safetensors", "--arch", "vgg16", "--force"], quick,
                        cache=cache)
        rev = self.args.before
        if rev:
            src = self.before_tree(rev)
            old = self.work / "spec-cache-before"
            remove(old)
            self.made.append(old)
            measure(["env", f"CKCONV_CACHE_DIR={old}", f"PYTHONPATH={src}", PY, "-m", "ckconv", "match", vgg, "--arch",
                     "auto"], ok=(0, 1))  # warms the old code's own cache
            for label, args, ok in (("match vgg16.pth --arch vgg16", ["match", vgg, "--arch", "vgg16"], (0,)),
                                    ("match vgg16.pth --arch auto", ["match", vgg, "--arch", "auto"], (0,)),
                                    ("match vgg16.pth --arch vgg61 (a typo)", ["match", vgg, "--arch", "vgg61"], (1,))):
                self.match_case(f"{label}, cached, before ({rev})", args, 3, cache=old, ok=ok, before=src)

    def run(self):
        a = self.args
        sizes = a.sizes
        only = set(a.only)
        self.log(f"ckconv bench: sizes {sizes}, {a.reps} rep(s), work dir {self.work}")
        self.log("building inputs")
        vgg = self.build("vgg16.pth", MAKE_VGG16)
        # Warm-up: bytecode caches for ckconv and torch (children may write them), then page cache.
        for cmd in ([CKCONV, "--help"], [PY, "-c", CKCONV_IMPORTS], [PY, "-c", "import torch, torchvision, safetensors.torch"]):
            measure(cmd)
        self.baselines()

        if "convert" in only:
            for size in sizes:
                if size == "vgg16":
                    src, label = vgg, "vgg16 state_dict (0.5)"
                else:
                    gib = float(size)
                    need = gib * GIB * 3.2
                    if self.free_disk() < need:
                        self.results["notes"].append(f"skipped the {gib:g} GiB case: needs {need / GIB:.1f} GiB free disk")
                        continue
                    src = self.build(f"synthetic_{gib:g}g.pth", MAKE_SYNTHETIC, gib)
                    label = f"synthetic {gib:g} GiB state_dict"
                reps = a.reps if src.stat().st_size < 3 * GIB else a.big_reps
                why_not = ""
                if self.mem_available() < 2.5 * src.stat().st_size + 2 * GIB:
                    why_not = "skipped: not enough free memory for torch.load + save_file"
                self.convert_case(f".pth -> .safetensors, {label}", src, reps,
                                  naive=(NAIVE_PTH_TO_ST, (), why_not), size_label=label)
                if src != vgg and not a.keep:
                    remove(src)
                    self.made.remove(src)

        if "convert" in only:
            self.breakdown(vgg, a.reps)

        if "many" in only:
            self.log("many tensors")
            many_tensors.run_section(self, a.reps, sys.modules[__name__])

        if "other" in only:
            st = self.work / "vgg16.safetensors"
            remove(st)
            subprocess.run([CKCONV, "convert", str(vgg), str(st)], check=True, capture_output=True, env=child_env())
            self.made.append(st)
            self.convert_case("safetensors -> .pth (vgg16)", st, a.reps, naive=(NAIVE_ST_TO_PTH, (), ""),
                              out_suffix=".pth", group="other")
            self.convert_case(f"sharded output, --max-shard-size {a.shard} (vgg16)", vgg, a.reps,
                              ck_args=("--max-shard-size", a.shard),
                              naive=(NAIVE_SHARDED, (a.shard,), ""), out_suffix="_shards", group="other")
            bundle = self.build("vgg16_adam_bundle.pth", MAKE_BUNDLE, vgg)
            self.convert_case("bundle: vgg16 + Adam state -> .safetensors", bundle, a.reps,
                              naive=(NAIVE_BUNDLE, (), ""), group="other")
            self.convert_case("bundle: vgg16 + Adam state -> .pth", bundle, a.reps, out_suffix=".pth", group="other")

        if "cli" in only:
            self.log("CLI start-up")
            reps = max(a.reps, 5)
            st = self.work / "vgg16.safetensors"
            if not st.exists():
                subprocess.run([CKCONV, "convert", str(vgg), str(st)], check=True, capture_output=True, env=child_env())
                self.made.append(st)
            self.cli_case("ckconv --help", ["--help"], reps)
            self.cli_case("ckconv plugins", ["plugins"], reps)
            self.cli_case("ckconv inspect vgg16.safetensors", ["inspect", str(st)], reps)
            self.cli_case("ckconv inspect vgg16.pth", ["inspect", str(vgg)], reps)
            tv = Series("python -c 'import torch, torchvision'")
            alternate([(tv, lambda: ([PY, "-c", "import torch, torchvision"], None))], reps, self.log)
            self.results["cli"].append({"label": tv.label, "series": tv, "torch": True})
            self.torchvision = tv
            has_match = subprocess.run([CKCONV, "match", "--help"], capture_output=True, env=child_env()).returncode == 0
            if has_match:
                self.match_section(vgg, reps)
            else:
                self.results["notes"].append("TODO: `ckconv match` does not exist yet; its row is empty")
            self.has_match = has_match
            self.results["match10k"] = []
            probe = run_python("import ckconv.matching.engine", check=False)
            if probe.returncode == 0:
                self.log("matching 10k x 10k keys")
                labels = {"wrapped": "wrapped: 'module.' + every target key",
                          "renamed": "renamed: other names, same shapes (worst case)"}
                for case, label in labels.items():
                    times, matched = [], 0
                    for _ in range(reps):
                        out = run_python(MATCH_10K, case).stdout.split()
                        times.append(float(out[0]))
                        matched = int(out[1])
                    self.log(f"    {label:<50} median {statistics.median(times):.3f} s, {matched} matched")
                    self.results["match10k"].append((label, times, matched))
            else:
                self.results["notes"].append("TODO: ckconv.matching.engine is missing; 10k-key matching not measured")

    # --- reporting ------------------------------------------------------------------------------------------

    def raw(self):
        """Every sample, for a later look (bench/work/last_run.json)."""
        def ser(x):
            if isinstance(x, Series):
                return {"label": x.label, "note": x.note, "samples": [vars(s) for s in x.samples]}
            if isinstance(x, dict):
                return {k: ser(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [ser(v) for v in x]
            return x
        return ser({"base": getattr(self, "base", {}), **self.results})

    def tables(self):
        if not hasattr(self, "base"):
            return "(no measurements)\n"
        base = self.base
        imp_rss = base["imports"].rss
        torch_wall, torch_rss = base["torch"].wall, base["torch"].rss
        lines = []
        targets = []

        def ratio(a, b):
            return f"{a / b:.2f}" if a is not None and b else "-"

        def cells(s: Series, extra_rss):
            if not s.samples:
                return "- | - | - | - | - | " + (s.note or "-")
            return (f"{s.wall:.2f} | {s.spread} | {s.cpu:.2f} | {s.rss / MIB:,.0f} | "
                    f"{extra_rss / MIB:+,.0f} | {s.note}")

        lines.append("### Baselines\n")
        lines.append("| what | median wall s | range s | CPU s | peak RSS MiB |")
        lines.append("|---|---:|---:|---:|---:|")
        for s in base.values():
            lines.append(f"| {s.label} | {s.wall:.2f} | {s.spread} | {s.cpu:.2f} | {s.rss / MIB:,.0f} |")
        lines.append("")

        flat = []
        for group, title in (("convert", "Conversion, .pth -> .safetensors, by size"),
                             ("other", "Other conversions (vgg16)")):
            rows = self.results[group]
            if not rows:
                continue
            lines.append(f"### {title}\n")
            lines.append("| case | contender | median wall s | range s | CPU s | peak RSS MiB | extra RSS MiB | note |")
            lines.append("|---|---|---:|---:|---:|---:|---:|---|")
            for r in rows:
                ck, nv, cp, cps = r["ck"], r["naive"], r["cp"], r["cps"]
                lines.append(f"| {r['case']} | ckconv convert | {cells(ck, (ck.rss or 0) - imp_rss)} |")
                if r.get("ckz") is not None:
                    ckz = r["ckz"]
                    lines.append(f"| | ckconv convert, zlib CRC-32 | {cells(ckz, (ckz.rss or 0) - imp_rss)} |")
                if nv is not None:
                    lines.append(f"| | naive torch script | {cells(nv, (nv.rss - torch_rss) if nv.samples else 0)} |")
                lines.append(f"| | cp | {cells(cp, 0)} |")
                lines.append(f"| | cp + sync FILE | {cells(cps, 0)} |")
            lines.append("")
            lines.append("| case | ckconv / naive (<= 0.6) | (ckconv - import torch) / cp (<= 1.5) | ckconv / cp | "
                         "ckconv / (cp + sync) (<= 1.4) | zlib CRC: ckconv / (cp + sync) | ckconv extra RSS MiB (<= 64) | "
                         "ckconv MB/s |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
            for r in rows:
                ck, nv, cp, cps = r["ck"], r["naive"], r["cp"], r["cps"]
                if not (ck.samples and cp.samples and cps.samples):
                    continue
                extra = (ck.rss - imp_rss) / MIB
                rn = ratio(ck.wall, nv.wall) if nv is not None and nv.samples else "-"
                issue = f"{(ck.wall - torch_wall) / cp.wall:.2f}"
                ckz = r.get("ckz")
                zr = ratio(ckz.wall, cps.wall) if ckz is not None and ckz.samples else "-"
                lines.append(f"| {r['case']} | {rn} | {issue} | {ratio(ck.wall, cp.wall)} | {ratio(ck.wall, cps.wall)} | "
                             f"{zr} | {extra:+.0f} | {r['bytes'] / 1e6 / ck.wall:,.0f} |")
                if nv is not None and nv.samples:
                    targets.append((f"{r['case']}: ckconv / naive", "<= 0.6", f"{ck.wall / nv.wall:.2f}",
                                    ck.wall / nv.wall <= 0.6))
                targets.append((f"{r['case']}: (ckconv - import torch) / cp (issue's formula)", "<= 1.5", issue,
                                (ck.wall - torch_wall) / cp.wall <= 1.5))
                targets.append((f"{r['case']}: ckconv / cp (strict: ckconv has no import torch to subtract)",
                                "<= 1.5", ratio(ck.wall, cp.wall), ck.wall / cp.wall <= 1.5))
                targets.append((f"{r['case']}: ckconv / (cp + sync) (both durable; issue 16)", "<= 1.4",
                                ratio(ck.wall, cps.wall), ck.wall / cps.wall <= 1.4 if group == "convert" else None))
                targets.append((f"{r['case']}: extra peak RSS", "<= 64 MiB", f"{extra:+.0f} MiB", extra <= 64))
                if group == "convert" and "vgg16" in r["case"]:
                    targets.append((f"{r['case']}: ckconv / (cp + sync) (issue 24)", "<= 1.25",
                                    ratio(ck.wall, cps.wall), ck.wall / cps.wall <= 1.25))
                if group == "convert":
                    flat.append(extra)
            lines.append("")
        if len(flat) > 1:
            spread = max(flat) - min(flat)
            targets.append(("extra peak RSS flat across sizes (max - min)", "<= 16 MiB", f"{spread:.1f} MiB",
                            spread <= 16))

        if self.results["cli"]:
            lines.append("### CLI start-up\n")
            lines.append("| command | median wall s | range s | CPU s | peak RSS MiB | imports torch |")
            lines.append("|---|---:|---:|---:|---:|---|")
            for c in self.results["cli"]:
                s = c["series"]
                t = {None: "-", True: "yes", False: "no"}[c["torch"]]
                lines.append(f"| {c['label']} | {s.wall:.3f} | {s.spread} | {s.cpu:.2f} | {s.rss / MIB:,.0f} | {t} |")
                if c["torch"] is not None and c["label"].startswith("ckconv"):
                    targets.append((f"{c['label']}: no import torch", "no", "yes" if c["torch"] else "no", not c["torch"]))
                if c["label"] == "ckconv --help":
                    targets.append(("ckconv --help wall", "<= 0.3 s", f"{s.wall:.3f} s", s.wall <= 0.3))
            if not getattr(self, "has_match", False):
                lines.append("| ckconv match vgg16.pth --arch vgg16 | TODO | | | | |")
            lines.append("")
            tv = getattr(self, "torchvision", None)
            match = next((c["series"] for c in self.results["match"] if c["label"] == "match vgg16.pth --arch vgg16, cached"),
                         None)
            if match is not None and tv is not None:
                d = match.wall - tv.wall
                targets.append(("ckconv match --arch vgg16 - import torch, torchvision", "<= 0.5 s", f"{d:+.2f} s",
                                d <= 0.5))
            else:
                targets.append(("ckconv match --arch vgg16 - import torch, torchvision", "<= 0.5 s",
                                "TODO (no `ckconv match` yet)", None))
        m10k = self.results.get("match10k")
        if m10k:
            lines.append("### Matching 10k source keys against 10k target keys (`matching.match_keys`, in-process)\n")
            lines.append("| source keys | median s | range s | matched |")
            lines.append("|---|---:|---:|---:|")
            for label, times, matched in m10k:
                lines.append(f"| {label} | {statistics.median(times):.3f} | {min(times):.3f}-{max(times):.3f} | {matched:,} |")
                targets.append((f"matching 10k x 10k keys ({label})", "<= 1 s", f"{statistics.median(times):.3f} s",
                                statistics.median(times) <= 1))
            lines.append("")
        else:
            targets.append(("matching 10k keys against 10k keys", "<= 1 s", "TODO (not run)", None))

        bd = self.results.get("breakdown")
        if bd:
            floor = bd[0].wall
            lines.append("### Where the time goes (vgg16 .pth -> .safetensors)\n")
            lines.append("| step | median wall s | range s | CPU s | / (cp + sync) |")
            lines.append("|---|---:|---:|---:|---:|")
            for s in bd:
                lines.append(f"| {s.label} | {s.wall:.2f} | {s.spread} | {s.cpu:.2f} | {ratio(s.wall, floor)} |")
            startup = base["imports"].wall
            lines.append(f"| start-up (python + ckconv imports, plugins loaded; from Baselines) | {startup:.2f} | | "
                         f"{base['imports'].cpu:.2f} | |")
            lines.append("")
        if self.results.get("match"):
            lines.append(f"### Matching with the spec cache (CRC-32 here: {self.crc})\n")
            lines.append("| command | median wall s | range s | CPU s | peak RSS MiB | imports torch | target |")
            lines.append("|---|---:|---:|---:|---:|---|---|")
            for c in self.results["match"]:
                sr, goal = c["series"], c["target"]
                lines.append(f"| ckconv {c['label']} | {sr.wall:.2f} | {sr.spread} | {sr.cpu:.2f} | {sr.rss / MIB:,.0f} | "
                             f"{'yes' if c['torch'] else 'no'} | {goal[0] if goal else ''} |")
                if goal:
                    ok = (goal[1] is None or sr.wall <= goal[1]) and not (goal[2] and c["torch"])
                    targets.append((f"ckconv {c['label']}", goal[0], f"{sr.wall:.2f} s"
                                    + (", imports torch" if c["torch"] else ""), ok))
            lines.append("")

        many_lines, many_targets = many_tensors.table(self, sys.modules[__name__])
        lines += many_lines
        targets += many_targets

        lines.append("### Targets (issues 6, 16 and 24)\n")
        lines.append("| target | goal | measured | met |")
        lines.append("|---|---|---|---|")
        for name, goal, got, ok in targets:
            lines.append(f"| {name} | {goal} | {got} | {'-' if ok is None else ('yes' if ok else 'NO')} |")
        lines.append("")
        return "\n".join(lines)


def machine():
    def first(path, key):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "?"

    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    mem = first("/proc/meminfo", "MemTotal")
    mem_gib = f"{int(mem.split()[0]) / (1 << 20):.1f} GiB" if mem != "?" else "?"
    work = BENCH / "work"
    fstype = dev = "?"
    try:
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            d, mnt, fs = line.split()[:3]
            if str(work.resolve()).startswith(mnt) and len(mnt) > len(best):
                best, dev, fstype = mnt, d, fs
    except OSError:
        pass
    usage = shutil.disk_usage(work if work.exists() else BENCH)
    try:
        cp_version = subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        cp_version = "?"
    return {
        "CPU": first("/proc/cpuinfo", "model name"),
        "cores": str(os.cpu_count()),
        "RAM": mem_gib,
        "disk": f"{dev} ({fstype}), {usage.total / 1e9:,.0f} GB, {usage.free / 1e9:,.0f} GB free",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": platform.python_version(),
        "torch": version("torch"),
        "torchvision": version("torchvision"),
        "safetensors": version("safetensors"),
        "huggingface_hub": version("huggingface_hub"),
        "cp": cp_version,
        "CRC-32": run_python("from ckconv.storage.fastcopy import crc32_backend; print(crc32_backend())",
                             check=False).stdout.strip() + f" (isal {version('isal')})",
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=os.environ.get("BENCH_SIZES", "0.5,1.6,4"),
                   help="comma-separated sizes in GiB for .pth -> .safetensors; 0.5 (or vgg16) is the vgg16 "
                        "state_dict, anything else a synthetic state_dict (env BENCH_SIZES; default 0.5,1.6,4)")
    p.add_argument("--reps", type=int, default=int(os.environ.get("BENCH_REPS", 3)),
                   help="repetitions per contender (env BENCH_REPS; default 3; CLI timings use at least 5)")
    p.add_argument("--big-reps", type=int, default=int(os.environ.get("BENCH_BIG_REPS", 1)),
                   help="repetitions for inputs of 3 GiB and more (env BENCH_BIG_REPS; default 1)")
    p.add_argument("--only", default=os.environ.get("BENCH_ONLY", "convert,other,cli,many"),
                   help="sections to run: convert, other, cli, many (env BENCH_ONLY)")
    p.add_argument("--many", default=os.environ.get("BENCH_MANY", "100000,1000000"),
                   help="tensor counts for the many-tensors section: tiny .pth -> .safetensors and inspect, then "
                        "one-element safetensors -> .pth; 0 skips one (env BENCH_MANY; default 100000,1000000)")
    p.add_argument("--shard", default="200MB", help="--max-shard-size for the sharded case (default 200MB)")
    p.add_argument("--before", default=os.environ.get("BENCH_BEFORE", ""),
                   help="a git revision whose `ckconv match` is timed beside today's (a worktree in the work dir; "
                        "env BENCH_BEFORE)")
    p.add_argument("--keep", action="store_true", default=os.environ.get("BENCH_KEEP", "") not in ("", "0"),
                   help="keep (and reuse) the inputs in the work dir (env BENCH_KEEP=1)")
    p.add_argument("--work", default=str(BENCH / "work"), help="work dir (default bench/work, gitignored)")
    p.add_argument("--results", default=str(BENCH / "RESULTS.md"), help="where to write the table ('' for nowhere)")
    args = p.parse_args(argv)
    sizes = []
    for tok in str(args.sizes).replace(" ", "").split(","):
        if not tok:
            continue
        if tok.lower() in ("vgg16", "vgg") or abs(float(tok) - 0.5) < 1e-9:
            sizes.append("vgg16")
        else:
            sizes.append(f"{float(tok):g}")
    args.sizes = sizes
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    return args


def main(argv=None):
    args = parse_args(argv)
    if not Path(CKCONV).exists():
        sys.exit(f"{CKCONV} not found: run `make install` first")
    bench = Bench(args)
    load_before = os.getloadavg()
    started = _dt.datetime.now().astimezone()
    try:
        bench.run()
    except Exception as exc:  # keep what was measured: the tables below still get written
        import traceback

        traceback.print_exc()
        bench.results["notes"].append(f"the run stopped early: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    finally:
        bench.cleanup()
    load_after = os.getloadavg()
    text = bench.tables()
    info = machine()
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "src", "bench/run.py"],
                           capture_output=True, text=True).stdout.strip()
    header = [
        "# ckconv benchmark results",
        "",
        f"Latest run: {started:%Y-%m-%d %H:%M %Z}, commit {commit}{' (with uncommitted changes)' if dirty else ''}, "
        f"`bench/run.py --sizes {','.join('0.5' if s == 'vgg16' else s for s in args.sizes)} --reps {args.reps}"
        f" --big-reps {args.big_reps}` ({time.time() - bench.t0:,.0f} s). What the numbers mean: [README.md](README.md).",
        "",
        "| machine | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in info.items()],
        f"| load average | {load_before[0]:.2f} at start, {load_after[0]:.2f} at end (shared machine) |",
        "",
        "Medians of alternating runs, warm page cache, each output deleted and `sync` run between runs (untimed).",
        "The machine is shared with other jobs (see the load average): runs are kept short (3 repetitions, 1 at 4 GiB), "
        "so read single ranges with care; CPU seconds are steadier than wall seconds.",
        "`extra RSS` = peak RSS minus the baseline of its kind: for ckconv, a Python process that imported ckconv's "
        "CLI, API and plugins; for the naive script, `import torch`.",
        "",
    ]
    for note in bench.results["notes"]:
        header.append(f"- {note}")
    if bench.results["notes"]:
        header.append("")
    report = "\n".join(header) + text
    print("\n" + report)
    if args.results:
        Path(args.results).write_text(report)
        print(f"\nwrote {args.results}")
    (bench.work / "last_run.json").write_text(json.dumps(
        {"machine": info, "report": report, "raw": bench.raw()}, indent=2))


if __name__ == "__main__":
    main()
