"""The opcode scan's fast path for torch's tensor records: a record read by regular-expression matches.

A state_dict of 100k tensors is 3 million opcodes, 30 per tensor, and the scan's handlers (:mod:`.scan`) pay a
Python call for each. Almost all of them belong to the record torch.save writes for a tensor (protocol 2, once the
first record has put the globals in the memo)::

    BINGET rebuild  MARK MARK BINGET 'storage' BINGET <StorageType> BINUNICODE key PUT (or BINGET key) BINGET location
    <numel> [NONE] TUPLE PUT BINPERSID <offset> <shape> PUT <stride> PUT NEWFALSE BINGET OrderedDict
    EMPTY_TUPLE REDUCE PUT TUPLE PUT REDUCE PUT

:func:`tensor_record`, called at the first MARK, matches such a record (two matches, around the storage key's
bytes) and applies its effect on the shadow machine at once: the value it leaves on the stack (the same depth, size
and hashing cost the handlers would compute), the roles of its two calls, every limit the handlers check on the way
(a record that would reach one is left to the handlers, which refuse it with their own message). :func:`entries`
then reads the state_dict entries that follow, each ``BINUNICODE key LONG_BINPUT`` (or a BINGET of a key) and the
record, by one match each; what a record's globals, shape and stride make of it is worked out once per run of
entries (:func:`_plan`: the memo values its BINGETs name cannot change while every PUT appends), so an entry costs
a match, its strings decoded, its PUTs compared in one step and the two values it leaves on the stack.

Of the values a record stores in the memo only the keys (views of one storage repeat the storage's) and the tensor
(a tensor saved twice is a BINGET of it) are built; the others (storage reference, shape, stride, hooks, arguments)
are :data:`LAZY`, and a later BINGET of one (which torch.save never writes) restarts the whole scan without the fast
path (:class:`Restart`), so the verdict and every limit are exactly the handlers'. Any other shape of bytes (a memo
index out of order, a GLOBAL where a BINGET was expected, a string that is not UTF-8) is left to the handlers.
"""

from __future__ import annotations

import re

from .shadow import _LEAF, BUILDS_HASHABLE, OBJECT_HASH_COST, RECORDED_ONLY, C, R, Restart, _Shared, _Text, _Value

__all__ = ["LAZY", "Restart", "entries", "tensor_record"]

LAZY = object()  # a memo entry of a record read by the fast path: its value was never built


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
# the rest of a dict entry after its key's bytes (a BINUNICODE key's LONG_BINPUT) or from a BINGET of a key seen
# before: BINGET rebuild, then the record with every PUT a LONG_BINPUT (the memo is past 255 entries after a few
# records) and its storage key a number (torch.save's), then the next key's BINUNICODE and length, if there is one
_ENTRY = re.compile(rb"(?:r(....)|" + _GET + rb")" + _GET + rb"\(\(" + _GET + _GET
                    + rb"(?:X(....)([0-9]{1,199})r(....)|" + _GET + rb")" + _GET + _INT + rb"(N?)tr(....)Q" + _INT
                    + _SIZES + rb"(?:r(....))?" + _SIZES + rb"(?:r(....))?[\x88\x89]" + _GET
                    + rb"\)Rr(....)tr(....)Rr(....)(?:X(....))?", re.DOTALL)  # () is never memoized
_RECORD_END = 20  # the group of the record's last PUT
_LAZIES = ((LAZY,) * 5, (LAZY,) * 4, (LAZY,) * 3)
# n LONG_BINPUT arguments storing e, e+1, ..., e+n-1, read as one little-endian int, equal e * _ONES[n] + _STEPS[n]
# (each index below 2**32, so no field carries into the next)
_ONES = [sum(1 << 32 * i for i in range(n)) for n in range(9)]
_STEPS = [sum(i << 32 * i for i in range(n)) for n in range(9)]
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


def _index(op: bytes) -> int:
    """A BINGET's or a LONG_BINGET's memo index."""
    return int.from_bytes(op[1:], "little")


def _plan(s, callee, storage, kind, location, hooks_class, view, shape, stride):
    """What the handlers make of a record whose storage key is a short string (depth 0, size 1), given the values
    its BINGETs push: (depth and size of the persistent id without its key, depth, size, hashing cost and
    collidability of the tensor), or None when a limit would refuse it. Nothing is changed."""
    if LAZY in (callee, storage, kind, location, hooks_class):
        return None  # the handlers' BINGET restarts the scan
    max_depth, max_nodes = s.max_depth, s.max_nodes
    pid_depth = max(storage.depth, kind.depth, location.depth) + 1
    pid_weight = storage.weight + kind.weight + location.weight + (3 if view else 2)  # + numel, [view], the tuple
    hooks_depth = max(hooks_class.depth, 1)
    hooks_weight = hooks_class.weight + 2
    args_depth = hooks_depth + 1
    args_weight = _tuple_weight(shape) + _tuple_weight(stride) + hooks_weight + 4
    depth = max(callee.depth, args_depth)
    weight = callee.weight + args_weight + 1
    if (max(pid_depth, hooks_depth, args_depth, depth) > max_depth
            or max(pid_weight, hooks_weight, args_weight, weight) > max_nodes):
        return None
    fn = callee.fn
    hcost = 1 if fn is not None and fn[0].startswith(RECORDED_ONLY) else OBJECT_HASH_COST  # Scanner.result_of
    return pid_depth, pid_weight, depth, weight, hcost, fn in BUILDS_HASHABLE


def _called(s, callee, hooks_class):
    """Scanner.use for a record's two calls: each called; none of their arguments is a global."""
    roles = s.roles
    for fn in (hooks_class.fn, callee.fn):
        if fn is not None:
            roles[fn] = roles.get(fn, R) | C


def _key_fits(key, plan, s) -> bool:
    """The persistent id's limits with its storage key (a BINGET may name any value). Checked for the entry that
    makes a plan; a later string key (depth 0, size 1, the least any value measures) then fits too."""
    return key.depth < s.max_depth and plan[1] + key.weight <= s.max_nodes


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
    gets = [_index(op) for op in (storage, kind, location, od, again or storage)]
    if max(gets) >= stored:  # only values stored before the record: none of its own
        return None
    expected = stored
    for put in (kput, pput, sput, tput, oput, aput, rput):
        if put is not None:
            if _index(put) != expected:
                return None
            expected += 1
    if expected > s.max_nodes:  # the handlers refuse the index max_nodes, and say so
        return None
    va, vb, vc, hooks_class, key = (memo[i] for i in gets)
    callee = s.stack[-1]
    plan = _plan(s, callee, va, vb, vc, hooks_class, view, shape, stride)
    if plan is None or key is LAZY:
        return None
    if again is None:  # the storage's key, as the handlers push it
        if n < 200:
            try:
                key = _Text(data[start:start + n], "utf-8", "surrogatepass")
            except UnicodeDecodeError:
                return None  # the handlers refuse it
        else:
            key = _LEAF
    if not _key_fits(key, plan, s):
        return None
    # from here on, what the handlers leave behind
    _called(s, callee, hooks_class)
    _, _, depth, weight, hcost, collidable = plan
    result = _Value(depth, weight, hcost, True, None, collidable)
    s.stack[-1] = result
    # built: the storage's key (views of one storage repeat it) and the tensor (a tensor saved twice is a BINGET)
    for put, value in zip((kput, pput, sput, tput, oput, aput, rput), (key, LAZY, LAZY, LAZY, LAZY, LAZY, result)):
        if put is not None:
            memo.append(value)
    return tail.end()


def entries(s, pos: int) -> int:
    """Apply the run of dict entries (key, then a tensor record) starting at ``pos``; the position after the last
    one read. An entry the fast path cannot read exactly as the handlers would ends the run before it."""
    data, memo, stack = s.data, s.memo, s.stack
    if s.sparse:
        return pos
    match = _ENTRY.match
    room = min(s.max_nodes, 1 << 32)  # the handlers refuse the index max_nodes; the PUT check needs 32-bit indices
    plans = s.plans
    if len(plans) > 4096:  # as many as a file has shapes: keep it small
        plans.clear()
    head = data[pos:pos + 5]
    n = int.from_bytes(head[1:], "little") if head[:1] == b"X" else -1  # a new key's length, or a BINGET of one
    while True:
        m = match(data, pos + 5 + n if n >= 0 else pos)
        if m is None:
            return pos
        (kput, kget, rebuild, storage, kind, sn, sb, sput, sget, location, view, pput, shape, shput, stride, stput,
         od, oput, aput, rput, following) = m.groups()
        e = len(memo)
        if (kput is None) is (n >= 0):  # a new key and its PUT, or a BINGET of a key and no PUT
            return pos
        puts = (kput, sput, pput, shput, stput, oput, aput, rput)
        if n < 0 or sget is not None or shput is None or stput is None:
            puts = tuple(filter(None, puts))
        count = len(puts)
        if e + count > room or int.from_bytes(b"".join(puts), "little") != e * _ONES[count] + _STEPS[count]:
            return pos
        if n >= 0:
            if n < 200:
                try:
                    key = _Text(data[pos + 5:pos + 5 + n], "utf-8", "surrogatepass")
                except UnicodeDecodeError:
                    return pos  # the handlers refuse it
            else:
                key = _LEAF  # as the handlers push it, never decoded
        else:
            i = _index(kget)
            key = memo[i] if i < e else LAZY
            if key is LAZY:
                return pos
        if sget is None:
            if int.from_bytes(sn, "little") != len(sb):
                return pos
            skey = _Text(sb, "ascii")
        else:
            i = _index(sget)
            skey = memo[i] if i < e else LAZY
            if skey is LAZY:
                return pos
        grouped = (rebuild, storage, kind, location, od, view, shape, stride)
        plan = plans.get(grouped)
        if plan is None:
            gets = [_index(op) for op in grouped[:5]]
            if max(gets) >= e:
                return pos
            callee, va, vb, vc, hooks_class = (memo[i] for i in gets)
            plan = _plan(s, callee, va, vb, vc, hooks_class, view, shape, stride)
            if plan is None or not _key_fits(skey, plan, s) or any(
                    v.mutable for v in (callee, va, vb, vc, hooks_class)):  # a value that grows: a stale plan
                return pos
            _called(s, callee, hooks_class)  # the same for every entry of the plan: once is enough
            depth, weight, hcost, collidable = plan[2:]
            plan = plans[grouped] = (*plan[:2], _Shared(depth, weight, hcost, True, None, collidable))
        elif sget is not None and not _key_fits(skey, plan, s):
            return pos
        result = plan[2]
        if n >= 0:
            memo.append(key)
        if sget is None:
            memo.append(skey)
        memo += _LAZIES[(shput is None) + (stput is None)]  # the persistent id, [shape], [stride], hooks, arguments
        memo.append(result)
        stack.append(key)
        stack.append(result)
        pos = m.end(_RECORD_END)
        n = int.from_bytes(following, "little") if following is not None else -1
