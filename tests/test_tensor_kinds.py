"""Quantized and sparse tensors (ckconv.tensor_kinds): read as torch reads them, written as torch.save writes them,
carried through safetensors bit for bit, never run.

Written by the real writers: torchvision's quantized models, ``quantize_dynamic``, FX static quantization,
quantized embeddings, and sparse tensors of every layout. torch is the oracle: what ckconv writes must load with
``torch.load(weights_only=True)`` and give the same tensors (dtype, qscheme, scales, zero points, axis, integer
representation; layout, indices, values, size).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch

import ckconv
from ckconv import tree
from ckconv.errors import CorruptCheckpoint
from ckconv.tensor_kinds import QuantizedRef, SparseTensor

from helpers import run_cli

warnings.filterwarnings("ignore", message=".*(quantiz|TypedStorage|Sparse|sparse).*")


@pytest.fixture(autouse=True)
def _torch_forgets_refused_sparse_tensors():
    """torch.load keeps a sparse tensor it refused in a global list when the load fails before validating it;
    the next torch.load in the process would validate that garbage (the positive controls here refuse files)."""
    yield
    torch._utils._sparse_tensors_to_validate.clear()


def same(a, b, path="<root>"):
    """Equal as torch sees them: quantized tensors by quantizer and integer representation, sparse ones by layout
    and components, everything else by value (tensors bit for bit)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.layout, a.shape, a.requires_grad) == (b.dtype, b.layout, b.shape, b.requires_grad), path
        if a.is_quantized:
            assert a.qscheme() == b.qscheme(), path
            if a.qscheme() == torch.per_tensor_affine:
                assert (a.q_scale(), a.q_zero_point()) == (b.q_scale(), b.q_zero_point()), path
            else:
                for x, y in ((a.q_per_channel_scales(), b.q_per_channel_scales()),
                             (a.q_per_channel_zero_points(), b.q_per_channel_zero_points())):
                    assert x.dtype == y.dtype and torch.equal(x, y), path
                assert a.q_per_channel_axis() == b.q_per_channel_axis(), path
            assert torch.equal(a.int_repr(), b.int_repr()), path
        elif a.layout == torch.sparse_coo:
            assert a.is_coalesced() == b.is_coalesced(), path
            assert torch.equal(a._indices(), b._indices()) and torch.equal(a._values(), b._values()), path
        elif a.layout != torch.strided:
            for x, y in zip(_compressed(a), _compressed(b)):
                assert x.dtype == y.dtype and torch.equal(x, y), path
        else:
            assert a.stride() == b.stride() or not a.is_contiguous(), path
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _compressed(t):
    if t.layout in (torch.sparse_csr, torch.sparse_bsr):
        return t.crow_indices(), t.col_indices(), t.values()
    return t.ccol_indices(), t.row_indices(), t.values()


def _tensors():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    d = torch.tensor([[0.0, 1, 0, 2], [3, 0, 0, 0], [0, 0, 0, 4], [0, 5, 0, 0]])
    hybrid = torch.zeros(4, 4, 3)
    hybrid[1, 2] = torch.tensor([1.0, 2, 3])
    hybrid[3, 0] = torch.tensor([4.0, 5, 6])
    return {
        "per_tensor_quint8": torch.quantize_per_tensor(x, 0.1, 3, torch.quint8),
        "per_tensor_qint32": torch.quantize_per_tensor(x, 0.013, 0, torch.qint32),
        "per_channel_qint8": torch.quantize_per_channel(x, torch.rand(4, dtype=torch.double) + 0.01,
                                                        torch.arange(4), 0, torch.qint8),
        "float_qparams_axis1": torch.quantize_per_channel(x, torch.rand(6) + 0.01, torch.arange(6).float(), 1,
                                                          torch.quint8),
        "quint4x2": torch.quantize_per_tensor(torch.randn(3, 3), 0.1, 0, torch.quint4x2),
        "view_of_qint8": torch.quantize_per_tensor(x, 0.1, 0, torch.qint8)[1:, ::2],
        "coo": d.to_sparse(),
        "coo_uncoalesced": torch.sparse_coo_tensor([[1, 0, 1], [0, 1, 0]], [1.0, 2.0, 3.0], (2, 2)),
        "coo_hybrid": hybrid.to_sparse(2),
        "csr": d.to_sparse_csr(),
        "csc": d.to_sparse_csc(),
        "bsr": d.to_sparse_bsr((2, 2)),
        "bsc": d.to_sparse_bsc((2, 2)),
        "csr_batched": torch.stack([d, d.t().contiguous()]).to_sparse_csr(),
        "qint8_dtype": torch.qint8,
        "dense": x,
    }


@pytest.fixture(scope="session")
def kinds_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kinds") / "kinds.pth"
    torch.save(_tensors(), path)
    return path


def test_every_kind_is_read_as_a_record(kinds_file):
    root = ckconv.read(kinds_file).root
    assert {k for k, v in root.items() if isinstance(v, QuantizedRef)} == {
        "per_tensor_quint8", "per_tensor_qint32", "per_channel_qint8", "float_qparams_axis1", "quint4x2",
        "view_of_qint8"}
    assert {str(v.layout) for v in root.values() if isinstance(v, SparseTensor)} == {
        "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc"}
    assert root["float_qparams_axis1"].qscheme == "per_channel_affine_float_qparams"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_through_each_format_loads_equal_in_torch(kinds_file, tmp_path, suffix):
    mid = tmp_path / f"mid{suffix}"
    ckconv.convert(kinds_file, mid)
    ckconv.convert(mid, tmp_path / "back.pth")
    same(torch.load(kinds_file, weights_only=True), torch.load(tmp_path / "back.pth", weights_only=True))
    same(torch.load(kinds_file, weights_only=True), ckconv.load(mid))  # ckconv's own materialising agrees


def test_pth_safetensors_pth_is_bit_exact(kinds_file, tmp_path):
    """Once through safetensors, every further trip gives the same files byte for byte (the .pth's random
    serialization id aside); the first trip already loads equal in torch (above)."""
    ckconv.convert(kinds_file, tmp_path / "a.safetensors")
    ckconv.convert(tmp_path / "a.safetensors", tmp_path / "a.pth")
    ckconv.convert(tmp_path / "a.pth", tmp_path / "b.safetensors")
    ckconv.convert(tmp_path / "b.safetensors", tmp_path / "b.pth")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.pth") as a, zipfile.ZipFile(tmp_path / "b.pth") as b:
        names = [n for n in a.namelist() if "serialization_id" not in n]
        assert names == [n for n in b.namelist() if "serialization_id" not in n]
        assert all(a.read(n) == b.read(n) for n in names)
    loaded = torch.load(tmp_path / "b.pth", weights_only=True)
    assert sum(t.is_quantized for t in loaded.values() if isinstance(t, torch.Tensor)) == 6
    assert sum(t.layout != torch.strided for t in loaded.values() if isinstance(t, torch.Tensor)) == 8


def test_safetensors_encoding_is_readable_without_ckconv(kinds_file, tmp_path):
    """The documented encoding: the integer representation under the tensor's name, per-channel scales and zero
    points and sparse components under derived names, the rest in ckconv's structure record."""
    from safetensors import safe_open

    ckconv.convert(kinds_file, tmp_path / "k.safetensors")
    src = torch.load(kinds_file, weights_only=True)
    with safe_open(tmp_path / "k.safetensors", "pt") as f:
        record = json.loads(f.metadata()["ckconv.structure"])
        assert torch.equal(f.get_tensor("per_channel_qint8"), src["per_channel_qint8"].int_repr())
        assert torch.equal(f.get_tensor("per_channel_qint8.q_per_channel_scales"),
                           src["per_channel_qint8"].q_per_channel_scales())
        assert torch.equal(f.get_tensor("csr.crow_indices"), src["csr"].crow_indices())
        assert torch.equal(f.get_tensor("coo.values"), src["coo"]._values())
    assert record["per_tensor_quint8"] == {"$qtensor": "per_tensor_quint8", "dtype": "quint8", "shape": [4, 6],
                                           "qparams": [{"$qscheme": "per_tensor_affine"}, 0.1, 3]}
    assert record["coo"]["$sparse"] == "sparse_coo" and record["coo"]["coalesced"] is True


def test_outputs_never_run_code(kinds_file, quantized_resnet, tmp_path):
    """Everything ckconv writes loads with weights_only=True, and with weights_only=False in a fresh process it
    creates no canary (the positive control shows the canary check works): .pth from .pth, from safetensors and
    from a torch-sharded folder's shards, of every kind and of a quantized model's state_dict."""
    ckconv.convert(kinds_file, tmp_path / "out.safetensors")
    ckconv.convert(tmp_path / "out.safetensors", tmp_path / "out.pth")
    ckconv.convert(kinds_file, tmp_path / "direct.pth")
    ckconv.convert(kinds_file, tmp_path / "shards", to="torch-sharded", max_shard_size=200)
    torch.save({"model": quantized_resnet.state_dict()}, tmp_path / "q.pth")
    ckconv.convert(tmp_path / "q.pth", tmp_path / "q.safetensors", model_only=True)
    ckconv.convert(tmp_path / "q.safetensors", tmp_path / "q_back.pth")
    outputs = [tmp_path / "out.pth", tmp_path / "direct.pth", tmp_path / "q_back.pth",
               *sorted((tmp_path / "shards").glob("*.bin"))]
    assert len(outputs) > 4
    for out in outputs:
        torch.load(out, weights_only=True)
    canary = tmp_path / "CKCONV_PWNED"
    check = ("import sys, torch, os; [torch.load(f, weights_only=False) for f in sys.argv[2:]]; "
             "print('pwned' if os.path.exists(sys.argv[1]) else 'clean')")

    class Payload:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    torch.save({"x": Payload()}, tmp_path / "control.pth")
    control = subprocess.run([sys.executable, "-c", check, str(canary), str(tmp_path / "control.pth")],
                             capture_output=True, text=True, timeout=120)
    assert control.stdout.strip() == "pwned"
    canary.unlink()
    run = subprocess.run([sys.executable, "-c", check, str(canary), *map(str, outputs)],
                         capture_output=True, text=True, timeout=300)
    assert run.stdout.strip() == "clean", run.stderr


def test_scan_verdicts(kinds_file, tmp_path):
    """``scan`` says SAFE (exit 0) for torch.save's files of every kind and for ckconv's outputs of them, because
    each global is one ckconv's unpickler reproduces, in the role torch.save gives it; the same names in another
    role, or their dangerous neighbours, are not safe."""
    from ckconv.pickling import policy
    from ckconv.pickling.allowlist import Role

    ckconv.convert(kinds_file, tmp_path / "out.safetensors")
    ckconv.convert(tmp_path / "out.safetensors", tmp_path / "out.pth")
    for path in (kinds_file, tmp_path / "out.safetensors", tmp_path / "out.pth"):
        proc = run_cli("scan", path)
        assert proc.returncode == 0 and "SAFE" in proc.stdout, (path, proc.stdout, proc.stderr)
    assert policy.verdict("torch.serialization", "_get_layout", roles=Role.CALLED) == "safe"
    assert policy.verdict("torch.serialization", "_get_layout", roles=Role.REBUILD) == "unknown"
    assert policy.verdict("torch.serialization", "_get_layout", pickled=False, roles=Role.CALLED) == "unknown"
    assert policy.verdict("torch.serialization", "load", roles=Role.CALLED) == "dangerous"
    assert policy.verdict("torch.serialization", "_get_layout.__globals__", roles=Role.CALLED) == "dangerous"
    assert policy.verdict("torch._utils", "_rebuild_qtensor", roles=Role.INSTANTIATED) == "unknown"
    assert policy.verdict("torch", "per_channel_affine", roles=Role.CALLED) == "unknown"
    # ckconv never writes these names from a record: only its own writer emits them, from its own values
    for name in ("_rebuild_qtensor", "_rebuild_sparse_tensor"):
        assert not policy.may_write("torch._utils", name, Role.CALLED)
    assert not policy.may_write("torch.serialization", "_get_layout", Role.CALLED)


def test_scan_and_inspect_show_them_sensibly(kinds_file):
    info = ckconv.inspect(kinds_file)
    assert info.verdict == "safe" and not info.globals["unknown"], info.globals
    rows = {t.name: t.dtype for t in info.tensors}
    assert rows["per_channel_qint8"] == "qint8 per_channel_affine axis 0"
    assert rows["float_qparams_axis1"] == "quint8 per_channel_affine_float_qparams axis 1"
    assert rows["csr"] == "sparse_csr float32 nnz 5"
    assert info.dtypes["qint8"] == 2 and info.dtypes["sparse_coo float32"] == 3


def _resave(src, dst, edit):
    obj = torch.load(src, weights_only=True)
    edit(obj)
    torch.save(obj, dst)


@pytest.mark.parametrize("edit, part", [
    (lambda o: o.__setitem__("per_tensor_quint8", torch.quantize_per_tensor(
        o["per_tensor_quint8"].dequantize(), 0.2, 3, torch.quint8)), "per_tensor_quint8"),
    (lambda o: o.__setitem__("per_channel_qint8", torch.quantize_per_channel(
        o["per_channel_qint8"].dequantize(), o["per_channel_qint8"].q_per_channel_scales() * 2,
        o["per_channel_qint8"].q_per_channel_zero_points(), 0, torch.qint8)), "per_channel_qint8.q_per_channel_scales"),
    (lambda o: o.__setitem__("csr", o["csr"].to_sparse_csc()), "csr"),
    (lambda o: o.__setitem__("coo", o["coo"] * 2), "coo.values"),
])
def test_diff_sees_quantizers_and_components(kinds_file, tmp_path, edit, part):
    _resave(kinds_file, tmp_path / "edited.pth", edit)
    report = ckconv.diff(kinds_file, tmp_path / "edited.pth")
    assert not report.equal
    named = [d.name for d in report.tensors_differ] + [v["name"] for v in report.values_differ]
    assert any(n == part or n.startswith(part + ".") for n in named), named
    assert ckconv.diff(kinds_file, kinds_file).equal


# --- real writers: quantized models give the same outputs after the round trip -------------------------------------

def _through_formats(state_dict, tmp_path, name):
    torch.save(state_dict, tmp_path / f"{name}.pth")
    ckconv.convert(tmp_path / f"{name}.pth", tmp_path / f"{name}.safetensors")
    ckconv.convert(tmp_path / f"{name}.safetensors", tmp_path / f"{name}.back.pth")
    back = torch.load(tmp_path / f"{name}.back.pth", weights_only=True)
    same(state_dict, back)
    return back


@pytest.fixture(scope="session")
def quantized_resnet():
    import torchvision

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torchvision.models.quantization.resnet18(quantize=True, weights=None).eval()


def test_torchvision_quantized_model_same_outputs(quantized_resnet, tmp_path):
    import torchvision

    back = _through_formats(quantized_resnet.state_dict(), tmp_path, "resnet18q")
    fresh = torchvision.models.quantization.resnet18(quantize=True, weights=None).eval()
    fresh.load_state_dict(back)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert torch.equal(quantized_resnet(x), fresh(x))
    packed = ckconv.read(tmp_path / "resnet18q.safetensors").root["fc._packed_params._packed_params"]
    assert isinstance(packed, tuple) and isinstance(packed[0], QuantizedRef) and packed[1].parameter


def _small():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).eval()


def test_dynamic_quantization_same_outputs(tmp_path):
    model = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                                                       torch.nn.Linear(16, 4)), {torch.nn.Linear})
    back = _through_formats(model.state_dict(), tmp_path, "dynamic")
    fresh = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                                                       torch.nn.Linear(16, 4)), {torch.nn.Linear})
    fresh.load_state_dict(back)
    x = torch.randn(3, 8)
    assert torch.equal(model(x), fresh(x))


def test_fx_static_quantization_same_outputs(tmp_path):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    def build():
        example = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)),)
        prepared = prepare_fx(_small(), get_default_qconfig_mapping("x86"), example)
        prepared(*example)
        return convert_fx(prepared)

    model = build()
    back = _through_formats(model.state_dict(), tmp_path, "fx")
    fresh = build()
    fresh.load_state_dict(back)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model(x), fresh(x))


def test_quantized_embeddings_same_outputs(tmp_path):
    """float qparams (8-bit Embedding) and packed 4-bit (EmbeddingBag quint4x2)."""
    from torch.ao.quantization import convert, float_qparams_weight_only_qconfig, prepare
    from torch.ao.quantization import float_qparams_weight_only_qconfig_4bit as four_bit

    def build():
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"e": torch.nn.Embedding(10, 8), "b": torch.nn.EmbeddingBag(10, 8, mode="sum")})
        model["e"].qconfig = float_qparams_weight_only_qconfig
        model["b"].qconfig = four_bit
        return convert(prepare(model))

    model = build()
    back = _through_formats(model.state_dict(), tmp_path, "emb")
    fresh = build()
    fresh.load_state_dict(back)
    idx = torch.tensor([1, 4, 9, 2])
    assert torch.equal(model["e"](idx), fresh["e"](idx))
    assert torch.equal(model["b"](idx, torch.tensor([0, 2])), fresh["b"](idx, torch.tensor([0, 2])))


def test_live_objects_through_the_api(tmp_path):
    """ckconv.save of live quantized and sparse tensors writes what torch.save writes."""
    tensors = _tensors()
    ckconv.save(tensors, tmp_path / "live.pth")
    ckconv.save(tensors, tmp_path / "live.safetensors")
    same(tensors, torch.load(tmp_path / "live.pth", weights_only=True))
    same(tensors, ckconv.load(tmp_path / "live.safetensors"))


# --- refused as torch refuses them, with one clear line ------------------------------------------------------------

def _axis_out_of_range(tmp_path):
    q = torch.quantize_per_channel(torch.randn(2, 3), torch.ones(3, dtype=torch.double),
                                   torch.zeros(3, dtype=torch.long), 1, torch.qint8)
    return {"q": q}, b"K\x01t", b"K\x05t"  # the axis, last in the quantizer parameters


def _coo_index_out_of_range(tmp_path):
    s = torch.sparse_coo_tensor([[0, 3]], [1.0, 2.0], (4,))
    return {"s": s}, b"K\x04\x85", b"K\x02\x85"  # size (4,) -> (2,): index 3 out of range


def _csr_unsorted_columns(tmp_path):
    s = torch.sparse_csr_tensor([0, 2], [2, 1], [1.0, 2.0], (1, 3), check_invariants=False)
    return {"s": s}, None, None


@pytest.mark.parametrize("make, message", [
    (_axis_out_of_range, "axis is out of range"),
    (_coo_index_out_of_range, "indices out of range"),
    (_csr_unsorted_columns, "not sorted and distinct within a row"),
])
def test_corrupt_records_are_refused_like_torch(tmp_path, make, message):
    obj, old, new = make(tmp_path)
    torch.save(obj, tmp_path / "src.pth")
    with zipfile.ZipFile(tmp_path / "src.pth") as z, zipfile.ZipFile(tmp_path / "bad.pth", "w") as out:
        for info in z.infolist():
            data = z.read(info)
            if info.filename.endswith("data.pkl") and old is not None:
                assert data.count(old) == 1
                data = data.replace(old, new)
            out.writestr(info, data)
    with pytest.raises(Exception):  # noqa: B017 - positive control: torch refuses the same file
        torch.load(tmp_path / "bad.pth", weights_only=True)
    for dst in ("out.pth", "out.safetensors"):
        proc = run_cli("convert", tmp_path / "bad.pth", tmp_path / dst)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / dst).exists()
    with pytest.raises(CorruptCheckpoint):
        ckconv.load(tmp_path / "bad.pth")


def test_dcp_output_refuses_them_clearly(kinds_file, tmp_path):
    proc = run_cli("convert", kinds_file, tmp_path / "out", "--to", "dcp")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "quantized" in proc.stderr or "sparse" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_materialising_checks_what_torch_checks(kinds_file):
    root = ckconv.read(kinds_file).root
    sparse = root["coo"]
    bad = SparseTensor("sparse_coo", sparse.components, (1, 4), sparse.coalesced)  # rows 1..3 out of range
    with pytest.raises(CorruptCheckpoint, match="cannot load it either"):
        tree.materialize({"s": bad})
    buf = io.BytesIO()
    torch.save(tree.materialize(root), buf)  # the real tensors torch.save accepts


@pytest.mark.parametrize("to", ["safetensors", "torch-sharded"])
def test_sharded_outputs_carry_them(kinds_file, tmp_path, to):
    ckconv.convert(kinds_file, tmp_path / "sharded", to=to, max_shard_size=200)
    assert len(list((tmp_path / "sharded").iterdir())) > 2
    ckconv.convert(tmp_path / "sharded", tmp_path / "back.pth")
    same(torch.load(kinds_file, weights_only=True), torch.load(tmp_path / "back.pth", weights_only=True))


def test_legacy_format_is_read_too(tmp_path):
    torch.save(_tensors(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    ckconv.convert(tmp_path / "legacy.pth", tmp_path / "out.pth")
    same(torch.load(tmp_path / "legacy.pth", weights_only=True), torch.load(tmp_path / "out.pth", weights_only=True))


def test_model_only_keeps_packed_parameters(quantized_resnet, tmp_path):
    """--model-only takes a quantized model's whole state_dict, packed (weight, bias) tuples and dtypes included;
    remapping one onto an architecture is refused with one line, not done half."""
    torch.save({"model": quantized_resnet.state_dict(), "epoch": 3}, tmp_path / "bundle.pth")
    ckconv.convert(tmp_path / "bundle.pth", tmp_path / "model.safetensors", model_only=True)
    ckconv.convert(tmp_path / "model.safetensors", tmp_path / "model.pth")
    same(quantized_resnet.state_dict(), torch.load(tmp_path / "model.pth", weights_only=True))
    proc = run_cli("convert", tmp_path / "bundle.pth", tmp_path / "out.pth", "--arch", "resnet18")
    assert proc.returncode != 0 and "quantized model" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.pth").exists()


def test_legacy_views_inside_them_are_bounds_checked(tmp_path):
    """A legacy file learns its storage sizes after the pickle: the components of a sparse tensor and a quantized
    tensor's per-channel scales are checked then, like any tensor's view."""
    obj = {"s": torch.sparse_coo_tensor([[0, 2]], [1.0, 2.0], (4,))}
    torch.save(obj, tmp_path / "ok.pth", _use_new_zipfile_serialization=False)
    data = (tmp_path / "ok.pth").read_bytes()
    old = b"K\x00K\x02\x85"  # the values view: offset 0, shape (2,)
    assert data.count(old) == 1
    (tmp_path / "bad.pth").write_bytes(data.replace(old, b"K\x01K\x02\x85"))  # offset 1: one past the end
    with pytest.raises(Exception):  # noqa: B017 - positive control: torch refuses it too
        torch.load(tmp_path / "bad.pth", weights_only=True)
    with pytest.raises(CorruptCheckpoint, match="past the end"):
        ckconv.read(tmp_path / "bad.pth")


def test_records_out_of_torch_range_are_refused_before_any_work(kinds_file):
    from ckconv.tensor_kinds import TorchQScheme, check_qtensor, check_sparse

    root = ckconv.read(kinds_file).root
    coo, q = root["coo"], root["per_tensor_quint8"]
    with pytest.raises(CorruptCheckpoint, match="size"):
        check_sparse(SparseTensor("sparse_coo", coo.components, (1 << 64, 4), True))
    with pytest.raises(CorruptCheckpoint, match="values"):
        check_sparse(SparseTensor("sparse_coo", coo.components[::-1], (4, 4), True))
    for qparams in [(TorchQScheme("per_tensor_affine"), 0.1, 1 << 70), (TorchQScheme("per_tensor_symmetric"), 0.1, 0),
                    ("per_tensor_affine", 0.1, 0), (TorchQScheme("per_channel_affine"), [0.1] * 3, [0] * 4, 0)]:
        with pytest.raises(CorruptCheckpoint, match="torch cannot load it either"):
            check_qtensor(QuantizedRef(q.storage, q.dtype, q.shape, qparams=qparams))
