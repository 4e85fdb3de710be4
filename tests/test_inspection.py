"""``ckconv inspect``'s one walk (issue 24): the verdict it gives without the pickle writer's dry run is the dry
run's, its rows and counts are one per tensor reference with tied tensors counted once, and ``--summary``'s groups
are the ones the first, one-pass-per-level grouping gave."""

from __future__ import annotations

import argparse
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from ckconv import tree
from ckconv.cli.inspect_cmds import tensor_groups
from ckconv.io import read
from ckconv.model import Checkpoint, Storage, TensorRef, TorchSize, foreign_class
from ckconv.pickling.writer import dry_run
from ckconv.reports import inspection
from ckconv.reports.inspection import _PLAIN, _PLAIN_KEYS, Inspection, TensorInfo, _Survey, verdicts


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Files of every shape inspect meets: plain state_dicts and bundles (no record) and files with records."""
    d = tmp_path_factory.mktemp("inspection")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(64, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt.step()
    w = torch.randn(6, 4)
    made = {
        "flat.safetensors": lambda p: save_file({f"layers.{i // 3}.w{i % 3}": torch.randn(2) for i in range(30)}, p),
        "state_dict.pth": lambda p: torch.save(model.state_dict(), p),  # an OrderedDict with _metadata
        "bundle.pth": lambda p: torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
                                            "lr": 0.5, "tag": ("run", 7), "on": True, "none": None,
                                            "blob": b"\x00\x01", "z": complex(1, 2), "ids": {1, 2}}, p),
        "tied.pth": lambda p: torch.save({"a": w, "b": w, "view": w[1:3], "t": w.t(), "nested": {"x": [w, w[0]]},
                                          7: torch.zeros(2)}, p),
        "kinds.pth": lambda p: torch.save({"q": torch.quantize_per_tensor(w, 0.1, 2, torch.quint8),
                                           "coo": torch.eye(3).to_sparse(), "dense": w}, p),
        "size.pth": lambda p: torch.save({"w": w, "size": w.shape, "dtype": torch.float16}, p),
        "numpy.pth": lambda p: torch.save({"w": w, "np": np.arange(3)}, p),
        "module.pth": lambda p: torch.save(torchvision.models.squeezenet1_0(weights=None), p),
        "namespace.pth": lambda p: torch.save({"w": w, "args": argparse.Namespace(lr=0.1)}, p),
        "tuple_key.pth": lambda p: torch.save({("a", 1): w, "b": {2.5: w}}, p),
    }
    for name, make in made.items():
        make(d / name)
    return {name: read(d / name) for name in made}


def test_a_tree_of_plain_values_gets_the_dry_runs_verdict_without_it(checkpoints):
    plain = set()
    for name, ckpt in checkpoints.items():
        survey = _Survey(ckpt.root)
        if survey.plain:
            plain.add(name)
            written = dry_run(ckpt.root)
            assert written.named == {} and written.problems == [], name
        assert verdicts(ckpt, plain=survey.plain) == verdicts(ckpt), name
    # the shortcut is taken for state_dicts and bundles, and not for records, references, torch.Size, odd keys
    assert plain == {"flat.safetensors", "state_dict.pth", "bundle.pth", "tied.pth"}


def test_every_plain_type_is_written_naming_no_global():
    """One value of each type in _PLAIN (and each plain key type as a key), in every container: the dry run names
    nothing. A type added to _PLAIN without a sample here fails the test."""
    st = Storage("0", "float32", 8, buffer=bytearray(8))
    samples = {TensorRef: TensorRef(st, "float32", (2,)), dict: {"k": 1}, OrderedDict: OrderedDict(a=1), list: [1],
               tuple: (1, "a"), set: {1, 2}, frozenset: frozenset({3}), str: "s", int: 2 ** 70, float: 0.5,
               complex: 1j, bool: True, type(None): None, bytes: b"\x00", bytearray: bytearray(b"ab")}
    values = [samples[kind] for kind in _PLAIN]
    # every value in the OrderedDict too, under keys of each plain key type (zipping with _PLAIN_KEYS kept only the
    # first two of a frozenset whose order follows the types' addresses: the tensor count changed from run to run)
    od = OrderedDict((f"k{i}" if i % 2 else i, v) for i, v in enumerate(values))
    assert {type(k) for k in od} == set(_PLAIN_KEYS)
    od.__dict__["_metadata"] = OrderedDict({"": {"version": 1}})
    root = {"values": values, "tuple": tuple(values), "od": od, 3: {"nested": values}}
    survey = _Survey(root)
    assert survey.plain and len(survey.tensors[1]) == 4  # values, the tuple, od, nested
    written = dry_run(root)
    assert written.named == {} and written.problems == []
    for odd in (TorchSize((1, 2)), foreign_class("somepkg", "Thing"), {(1, 2): 1}, {1.5: 1}):
        assert not _Survey({"x": odd}).plain  # left to the writer


def test_rows_are_one_per_reference_and_tied_tensors_count_once(checkpoints, monkeypatch):
    for name in ("tied.pth", "kinds.pth", "bundle.pth", "flat.safetensors", "state_dict.pth"):
        root = checkpoints[name].root
        found = []
        tree.walk(root, lambda p, n: found.append((tree.format_path(p), n)), kinds=inspection.TENSOR_KINDS)
        count, total, kinds, rows = inspection._tensor_rows(_Survey(root).tensors)
        assert count == len(found) and [r.name for r in rows] == [p for p, _ in found], name
        assert [r.bytes for r in rows] == [n.nbytes for _, n in found]
        assert [r.shape for r in rows] == [list(n.shape) for _, n in found]
        assert total == sum({n.view_key(): n.nbytes for _, n in found}.values()), name
        assert sum(kinds.values()) == count
    rows = inspection._tensor_rows(_Survey(checkpoints["tied.pth"].root).tensors)
    # 7 references; w once for a, b and nested.x.0; each view (w[1:3], w.t(), w[0]) is a tensor of its own
    assert rows[0] == 7 and rows[1] == 24 * 4 + 8 * 4 + 24 * 4 + 4 * 4 + 2 * 4
    kinds = inspection._tensor_rows(_Survey(checkpoints["kinds.pth"].root).tensors)
    assert kinds[2] == {"quint8": 1, "sparse_coo float32": 1, "float32": 1}
    assert [r.dtype for r in kinds[3]][:2] == ["quint8 per_tensor_affine", "sparse_coo float32 nnz 3"]
    monkeypatch.setattr(inspection, "MAX_TENSOR_ROWS", 4)
    count, _, _, rows = inspection._tensor_rows(_Survey(checkpoints["tied.pth"].root).tensors)
    assert count == 7 and [r.name for r in rows] == ["a", "b", "view", "t"]


def _groups_one_pass_per_level(info) -> list:
    """The grouping as first written (one pass over every row per level): the reference for tensor_groups."""
    in_bundle = {k for keys in info.sections.values() for k in keys if k != "<root>"}
    parts = [t.name.split(".") for t in info.tensors]
    depth = [2 if len(p) > 2 and p[0] in in_bundle else 1 for p in parts]
    for _ in range(3):
        branches: dict = {}
        for p, d in zip(parts, depth):
            branches.setdefault(tuple(p[:d]), []).append(tuple(p[: d + 1]) if len(p) > d + 1 else None)
        deeper = {g for g, b in branches.items() if len(b) > 1 and len(set(b)) == 1 and b[0] is not None}
        if not deeper:
            break
        depth = [d + 1 if tuple(p[:d]) in deeper else d for p, d in zip(parts, depth)]
    groups: dict = {}
    for t, p, d in zip(info.tensors, parts, depth):
        g = groups.setdefault(".".join(p[:d]), {"tensors": 0, "bytes": 0, "dtypes": {}})
        g["tensors"] += 1
        g["bytes"] += t.bytes
        g["dtypes"][t.dtype] = g["dtypes"].get(t.dtype, 0) + 1
    return [{"group": name, **g} for name, g in groups.items()]


def test_summary_groups_are_those_of_the_one_pass_per_level_grouping():
    rng = random.Random(24)
    words = ["model", "optimizer", "state", "layers", "0", "1", "w", "", "a.b", "<root>"]
    for _ in range(2000):
        names = [".".join(rng.choice(words) for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(0, 12))]
        if rng.random() < 0.3:  # a single long branch: looked past up to three levels
            names = [f"m.x.y.z.{i}.w" for i in range(3)] + names
        rows = [TensorInfo(n, rng.choice(["float32", "int64"]), [1], rng.randint(0, 9)) for n in names]
        sections = rng.choice([{"model": ["<root>"]}, {"model": ["model"], "optimizer": ["optimizer", "state"]}])
        info = Inspection("x", "torch", sections, len(rows), 0, {}, rows)
        assert tensor_groups(info) == _groups_one_pass_per_level(info), (names, sections)


def test_a_tree_with_records_or_references_is_judged_by_the_dry_run():
    system = foreign_class("os", "system")
    ckpt = Checkpoint(root={"w": {"x": 1}, "ref": system, "call": system("echo")}, format="torch", path="x")
    survey = _Survey(ckpt.root)
    assert not survey.plain and survey.records
    assert survey.values == [{"path": "ref", "kind": "reference", "text": "os.system"}]
    assert verdicts(ckpt, plain=survey.plain)["dangerous"] == ["os.system"]
