"""The opcode scan's fast path for torch's tensor records: a record read by two regular-expression matches.

A state_dict of 100k tensors is 3 million opcodes, 30 per tensor, and the scan's handlers (:mod:`.scan`) pay a
Python call for each. Almost all of them belong to the record torch.save writes for a tensor (protocol 2, once the
first record has put the globals in the memo)::

    BINGET rebuild  MARK MARK BINGET 'storage' BINGET <StorageType> BINUNICODE key PUT (or BINGET key) BINGET location
    <numel> [NONE] TUPLE PUT BINPERSID <offset> <shape> PUT <stride> PUT NEWFALSE BINGET OrderedDict
    EMPTY_TUPLE REDUCE PUT TUPLE PUT REDUCE PUT

:func:`tensor_record`, called at the first MARK, matches such a record and applies its effect on the shadow machine
at once: the value it leaves on the stack (the same depth, size and hashing cost the handlers would compute), the
roles of its two calls, every limit the handlers check on the way (a record that would reach one is left to the
handlers, which refuse it with their own message). Of the values it stores in the memo only the storage's key (views
of one storage repeat it) and the tensor (a tensor saved twice is a BINGET of it) are built; the others (storage
reference, shape, stride, hooks, arguments) are :data:`LAZY`, and a later BINGET of one (which torch.save never writes) restarts the whole scan without the fast path
(:class:`Restart`), so the verdict and every limit are exactly the handlers'. Any other shape of bytes (a memo index
out of order, a GLOBAL where a BINGET was expected, a string that is not UTF-8) returns None: the handlers read it.
"""

from __future__ import annotations

import re

from .shadow import _LEAF, BUILDS_HASHABLE, OBJECT_HASH_COST, RECORDED_ONLY, C, R, _Value

__all__ = ["LAZY", "Restart", "tensor_record"]

LAZY = object()  # a memo entry of a record read by the fast path: its value was never built


class Restart(Exception):
    """A BINGET of a :data:`LAZY` memo entry: the scan starts again without the fast path."""


_GET = rb"(h.|j....)"
_PUT = rb"(q.|r....)?"
_INT = rb"(?:K.|M..|J....)"
# a shape or stride of 0 to 8 dimensions, each an int of 1, 2 or 4 bytes: (), TUPLE1-3, or MARK ints TUPLE
_SIZES = rb"(\)|" + _INT + rb"\x85|" + _INT * 2 + rb"\x86|" + _INT * 3 + rb"\x87|\(" + _INT + rb"{4,8}t)"
# MARK MARK 'storage' <StorageType> and the storage key's opcode with its length
_HEAD = re.compile(rb"\(\(" + _GET + _GET + rb"(?:X(....)|\x8c(.)|" + _GET + rb")", re.DOTALL)  # a key seen before
# after the key's bytes: the rest of the record, up to the PUT after its REDUCE
_TAIL = re.compile(_PUT + _GET + _INT + rb"(N?)t" + _PUT + rb"Q" + _INT + _SIZES + _PUT + _SIZES + _PUT
                   + rb"[\x88\x89]" + _GET + rb"\)R" + _PUT + rb"t" + _PUT + rb"R" + _PUT, re.DOTALL)
_WIDTHS = {0x4B: 2, 0x4D: 3, 0x4A: 5}  # BININT1, BININT2, BININT: opcode and argument bytes


def _tuple_weight(op: bytes) -> int:
    """Expanded size (and hashing cost) of a shape or stride tuple as the handlers measure it: one per item, plus
    one for the tuple (EMPTY_TUPLE's own value and the shared tuples of leaves alike have depth 1)."""
    if op == b")":
        return 1
    last = op[-1]
    if last != 0x74:  # TUPLE1, TUPLE2, TUPLE3
        return last - 0x84 + 1
    n, pos = 0, 1
    while pos < len(op) - 1:
        pos += _WIDTHS[op[pos]]
        n += 1
    return n + 1


def _in_order(puts, expected: int) -> int:
    """The memo index after ``puts`` (PUT opcodes or None) if each stores the next index in order, else -1."""
    for put in puts:
        if put is not None:
            if int.from_bytes(put[1:], "little") != expected:
                return -1
            expected += 1
    return expected


def _hash_cost(callee) -> int:
    """Scanner.result_of: what hashing a call's result may cost."""
    return 1 if callee.fn is not None and callee.fn[0].startswith(RECORDED_ONLY) else OBJECT_HASH_COST


def tensor_record(s, pos: int):
    """Apply the tensor record starting with the MARK at ``pos`` to the scanner ``s``; the position after it, or
    None when the bytes there are not such a record or would reach a limit (nothing has changed then)."""
    data = s.data
    head = _HEAD.match(data, pos)
    if head is None or s.sparse or len(s.stack) <= s.fence:
        return None
    storage, kind, wide, short, again = head.groups()
    start = head.end()
    n = 0 if again is not None else int.from_bytes(wide, "little") if wide is not None else short[0]
    tail = _TAIL.match(data, start + n)
    if tail is None:
        return None
    kput, location, view, pput, shape, sput, stride, tput, od, oput, aput, rput = tail.groups()
    memo = s.memo
    stored = len(memo)
    index = int.from_bytes  # an opcode's argument: one byte (BINGET, BINPUT) or four (LONG_BINGET, LONG_BINPUT)
    gets = [index(op[1:], "little") for op in (storage, kind, location, od, again or storage)]
    if max(gets) >= stored:  # only values stored before the record: none of its own
        return None
    puts = (kput, pput, sput, tput, oput, aput, rput)
    expected = _in_order(puts, stored)
    if expected < 0 or expected > s.max_nodes:  # the handlers refuse the index max_nodes, and say so
        return None
    va, vb, vc, hooks_class, key = (memo[i] for i in gets)
    if LAZY in (va, vb, vc, hooks_class, key):
        return None  # the handlers' BINGET restarts the scan
    if again is None:  # the storage's key, as the handlers push it
        if n < 200:
            try:
                key = _Value(text=str(data[start:start + n], "utf-8", "surrogatepass"))
            except UnicodeDecodeError:
                return None  # the handlers refuse it
        else:
            key = _LEAF
    # the values the handlers would build, measured: (depth, expanded size, hashing cost), each within the limits
    max_depth, max_nodes = s.max_depth, s.max_nodes
    pid_depth = max(va.depth, vb.depth, key.depth, vc.depth) + 1
    pid_weight = va.weight + vb.weight + key.weight + vc.weight + (3 if view else 2)  # + numel, [view], the tuple
    hooks_depth = max(hooks_class.depth, 1)
    hooks_weight = hooks_class.weight + 2
    shape_weight, stride_weight = _tuple_weight(shape), _tuple_weight(stride)
    args_depth = hooks_depth + 1
    args_weight = shape_weight + stride_weight + hooks_weight + 4
    callee = s.stack[-1]
    depth = max(callee.depth, args_depth)
    weight = callee.weight + args_weight + 1
    if (max(pid_depth, hooks_depth, args_depth, depth) > max_depth
            or max(pid_weight, hooks_weight, args_weight, weight) > max_nodes):
        return None
    # from here on, what the handlers leave behind
    roles = s.roles
    for fn in (hooks_class.fn, callee.fn):  # Scanner.use: each called; none of their arguments is a global
        if fn is not None:
            roles[fn] = roles.get(fn, R) | C
    result = _Value(depth, weight, _hash_cost(callee), mutable=True, collidable=callee.fn in BUILDS_HASHABLE)
    s.stack[-1] = result
    # built: the storage's key (views of one storage repeat it) and the tensor (a tensor saved twice is a BINGET)
    built = (key, LAZY, LAZY, LAZY, LAZY, LAZY, result)
    memo.extend([value for put, value in zip(puts, built) if put is not None])
    return tail.end()
