"""Built-in format plugin: TorchScript archives (``torch.jit.save``), read for the module's state_dict.

A TorchScript archive is a torch.save-style zip: ``data.pkl`` pickles the module as objects of the archive's own
classes (``__torch__.<...>.Conv2d``, built with NEWOBJ and a dict of attributes), tensors are ``data/<key>`` records,
and ``code/__torch__/...py`` holds each class's TorchScript source, deflated. Which attributes are parameters and
buffers is declared in that source (``__parameters__ = ["weight", "bias", ]``, ``__buffers__ = [...]``), so ckconv
reads those two lines of each class, never compiling or running anything: the pickle goes through the restricted
unpickler (its classes become inert records; TorchScript's list builders are answered by checked stand-ins), and
the state_dict is derived as ``torch.jit.load(path).state_dict()`` gives it: each module's parameters, then its
buffers (non-persistent ones included, as TorchScript keeps them), then its submodules, ``None`` left out.
The code is reported (``Checkpoint.code``): ``scan`` gives such a file the verdict ``code``. Checked against
torch 2.14.1 (``torch.jit.script`` and ``torch.jit.trace``).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

from ..errors import CorruptCheckpoint, LimitExceeded, UnsupportedContent
from ..hookspecs import hookimpl
from ..model import Checkpoint, Foreign
from ..pickling.unpickler import RestrictedUnpickler, unpickle
from ..storage.zipdir import sniffed_names
from ..storage.zipio import ZipRecords
from .base import ReadOnlyFormat, guarded
from .torch_archive import ZIP_MAGIC, storage_loader, top_folder

MAX_CODE = 64 << 20  # bytes of TorchScript source inflated in all, to read the declarations
JIT_LISTS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "build_complexlist")
CLASS_LINE = re.compile(r"class ([A-Za-z_][A-Za-z0-9_]*)\(([A-Za-z_][A-Za-z0-9_.]*)\):")
DECLARATION = re.compile(r"  (__parameters__|__buffers__) = \[((?:\"[A-Za-z_][A-Za-z0-9_]*\", )*)\]")
NAME = re.compile(r"\"([A-Za-z_][A-Za-z0-9_]*)\"")


def is_torchscript(names) -> bool:
    """torch's own test (``serialization._is_torchscript_zip``): a ``constants.pkl`` record; torch.load hands such a
    file to torch.jit.load and reads any other zip's data.pkl as a plain pickle."""
    top = top_folder(names)
    return top is not None and top + "data.pkl" in names and top + "constants.pkl" in names


def sniff(path: Path, head: bytes) -> bool:
    if path.is_dir() or not head.startswith(ZIP_MAGIC):
        return False
    try:
        return is_torchscript(sniffed_names(path))
    except Exception:  # noqa: BLE001 - not a zip this plugin reads; the torch plugin says what is wrong
        return False


class ScriptUnpickler(RestrictedUnpickler):
    """The restricted unpickler plus TorchScript's list builders (``torch.jit._pickle.build_intlist(list)`` is
    the list itself): checked stand-ins that return their one list argument, nothing imported."""

    def find_class(self, module, name):
        if module == "torch.jit._pickle" and name in JIT_LISTS:
            return self._builder(_one_list, f"{module}.{name}")
        return super().find_class(module, name)


def _one_list(items):
    if type(items) is not list:
        raise CorruptCheckpoint("a TorchScript list builder was given something other than a list")
    return items


def read(path: Path) -> Checkpoint:
    records = ZipRecords(path, deflated=lambda name: "/code/" in name)
    names = list(records.records)
    top = top_folder(names)
    if top is None or not is_torchscript(names):
        raise CorruptCheckpoint(f"{path}: not a TorchScript archive with one top folder")
    code = [n for n in names if n.startswith(top + "code/") and n.endswith(".py")]
    classes = _declarations(records, top, code, path)
    load = storage_loader(path, records.records, top, str(path))
    root, _ = unpickle(records.read(top + "data.pkl"), storage_loader=load, where=str(path),
                       unpickler_class=ScriptUnpickler)
    if not _is_module(root, classes):
        raise UnsupportedContent(f"{path}: the TorchScript archive holds no module at its root")
    state = OrderedDict()
    _state_dict(root, classes, "", state, set(), path)
    return Checkpoint(root=state, format="torchscript", path=str(path), code=[n[len(top):] for n in code],
                      notes=[f"read the state_dict of a TorchScript module; its {len(code)} code files were not run"])


def _declarations(records, top, code, path) -> dict:
    """{class: (parameters, buffers, is a module)} from each class's first lines in the archive's source."""
    budget = MAX_CODE
    out = {}
    for name in code:
        text = records.read_deflated(name, limit=budget)
        budget -= len(text)
        module = name[len(top) + len("code/"):-len(".py")].replace("/", ".")
        current = None
        for line in text.decode("utf-8", "replace").splitlines():
            if m := CLASS_LINE.fullmatch(line):
                current = f"{module}.{m.group(1)}"
                out[current] = ([], [], m.group(2) == "Module")
            elif current is not None and (m := DECLARATION.fullmatch(line)):
                out[current][0 if m.group(1) == "__parameters__" else 1].extend(NAME.findall(m.group(2)))
    if budget <= 0:
        raise LimitExceeded(f"{path}: the TorchScript source inflates past {MAX_CODE} bytes")
    return out


def _is_module(obj, classes) -> bool:
    return isinstance(obj, Foreign) and classes.get(f"{obj.module}.{obj.qualname}", ((), (), False))[2]


def _state_dict(obj, classes, prefix, out, active, path):
    if id(obj) in active:
        raise CorruptCheckpoint(f"{path}: module {prefix[:-1]!r:.80} contains itself")
    params, buffers, _ = classes[f"{obj.module}.{obj.qualname}"]
    state = obj.state
    if not isinstance(state, dict) or obj.args or obj.listitems or obj.dictitems:
        raise CorruptCheckpoint(f"{path}: module {prefix[:-1] or '<root>'!r:.80} is not a TorchScript module record")
    for declared in (set(params), set(buffers)):  # each in slot order: the attribute dict's order
        for name, value in state.items():
            if name in declared and value is not None:
                out[prefix + name] = value
    active.add(id(obj))
    for name, value in state.items():
        if _is_module(value, classes):
            _state_dict(value, classes, f"{prefix}{name}.", out, active, path)
    active.discard(id(obj))


class TorchScriptFormat(ReadOnlyFormat):
    name = "torchscript"
    description = "torch.jit.save archives, read for the module's state_dict; the code is never run"
    what = "TorchScript archives"

    def sniff(self, path: Path, head: bytes) -> bool:
        return sniff(path, head)

    def read(self, path: Path) -> Checkpoint:
        return guarded(read, path)


@hookimpl
def ckconv_register_formats(register):
    register(TorchScriptFormat())
