"""Builder options the checkpoint's shapes determine (``num_classes`` and the like), found from the architecture's
own parameters: build it with two probe values, see which dimensions follow the option, and read those
dimensions in the checkpoint's matched tensors.

``resnet50`` fine-tuned with ``fc = Linear(2048, 10)``: ``fc.weight`` dim 0 and ``fc.bias`` dim 0 follow
``num_classes``; the checkpoint has 10 there, so the model is ``resnet50(num_classes=10)``.
"""

from __future__ import annotations

from ..errors import UsageError
from ..model import Note
from . import targets

SHAPE_OPTIONS = ("num_classes",)  # builder options whose value is a dimension of some parameters
PROBES = (7, 11)  # two values no real head has by default: a dimension that is 7 then 11 follows the option


def dependent_dims(arch: str, options: dict, option: str) -> dict:
    """-> {target name: [dimension index]} of the tensors whose dimensions equal ``option``'s value, or {} when
    ``arch`` does not take it."""
    try:
        specs = [targets.spec(arch, {**options, option: p}) for p in PROBES]
    except UsageError:
        return {}
    first, second = ({t.name: t.shape for t in s.tensors} for s in specs)
    out: dict = {}
    for name, shape in first.items():
        other = second.get(name)
        if other is None or len(other) != len(shape):
            continue
        dims = [i for i, (a, b) in enumerate(zip(shape, other)) if (a, b) == PROBES]
        if dims:
            out[name] = dims
    return out


def infer_options(report, arch: str, options: dict) -> dict:
    """-> {option: value} that the checkpoint's tensors determine and the user did not set: taken from the
    targets that matched by name but not by shape (``report.mismatched``), when they all agree."""
    if not report.mismatched:
        return {}
    found = {}
    for option in SHAPE_OPTIONS:
        if option in options:
            continue  # the user's choice stands
        dims = dependent_dims(arch, options, option)
        values = {m.source_shape[i] for m in report.mismatched if m.target in dims
                  for i in dims[m.target] if i < len(m.source_shape)}
        if len(values) == 1:
            found[option] = values.pop()
    return found


def inference_note(inferred: dict, report) -> Note:
    where = ", ".join(f"{m.target} {list(m.source_shape)}" for m in report.mismatched[:3])
    chosen = ", ".join(f"{k}={v}" for k, v in inferred.items())
    return Note(f"built {report.arch} with {chosen}, as the checkpoint's {where} say (inferred; "
                f"--arch-option {chosen.split(', ')[0].split('=')[0]}=N chooses)")
