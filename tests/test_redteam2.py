"""Second red-team pass on the writing policy (issue 14): attacks the policy already refuses.

Each input is a tiny ``.safetensors`` whose ``ckconv.structure`` metadata is crafted; converting it to ``.pth``
must fail with exit 1, one line naming the problem, and no output file.
"""

from __future__ import annotations

import json
import struct

import pytest
from click.testing import CliRunner

from ckconv.cli import cli


def _safetensors(path, structure):
    header = {"__metadata__": {"ckconv.structure": json.dumps(structure)},
              "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0\0\0\0")


CASES = {
    # bytes.__new__(bytes, n) allocates n zero bytes at load time: past MAX_CALL_INT it is refused
    "bytes-alloc": ({"$object": "builtins:bytes", "new": True, "args": [2**32 + 1]}, "builtins.bytes made with arguments"),
    # a dotted path from an allowed module to torch.load
    "getattr-chain": ({"$object": "torch.nn.modules.module:torch.load", "args": []}, "torch.nn.modules.module.torch.load"),
    # an allowed call given a record it would iterate
    "record-arg": ({"$object": "collections:deque",
                    "args": [{"$object": "torch.nn.modules.linear:Linear", "new": True}]}, "Linear record"),
    # pathlib.Path re-exported by an allowed module, called by REDUCE
    "reexport-call": ({"$object": "omegaconf.nodes:Path", "args": ["/tmp/x"]}, "omegaconf.nodes.Path"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_structure_refused(tmp_path, case):
    record, needle = CASES[case]
    src, dst = tmp_path / "x.safetensors", tmp_path / "out.pth"
    _safetensors(src, {"x": record, "t": {"$tensor": "t"}})
    result = CliRunner().invoke(cli, ["convert", str(src), str(dst)])
    assert result.exit_code == 1, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert not dst.exists()
