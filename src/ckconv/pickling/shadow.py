"""The shadow machine of the opcode scan (:mod:`ckconv.pickling.scan`): values, stack, memo, limits, roles.

The C unpickler is fast but trusts its input in ways a file of a few bytes can abuse: a memo index
(``LONG_BINPUT 4294967280``) grows its memo table to tens of gigabytes; hashing a deeply nested tuple used as a
dict key overflows the C stack (a segfault, not an exception); hashing a tuple built from shared references
(``t = (t, t)`` 80 times) takes 2**80 steps; a length field can ask for more bytes than the file holds.

:func:`scan` decodes every opcode straight from the bytes (a table of handlers indexed by the opcode byte, as
CPython's ``pickle._Unpickler.dispatch``) and runs a shadow stack that records, for every value, how deep it nests,
how many nodes it has when expanded and what hashing it costs. It also records the role the pickle gives each
global (:class:`~ckconv.pickling.allowlist.Role`: referenced, instantiated, called, handed to a rebuild function),
which the verdicts follow. Nothing is built and nothing is called. A run of pushes each popped at once (``NONE
POP`` floods) is skipped by one regular-expression match, in C.
"""

from __future__ import annotations

import _compat_pickle
import struct

from ..errors import LimitExceeded, NotACheckpoint
from .allowlist import Role

MAX_SAME_HASH = 64  # dict keys sharing one hash: n of them cost n**2 / 2 comparisons (hash flooding)
SAFE_INT_BITS = 60  # ints below 2**61 - 1 hash to themselves: distinct ones never collide
OBJECT_HASH_COST = 512  # bound on hashing anything a builder returns (ckconv's builders cap what they build)
MAX_GLOBALS = 10_000  # distinct globals recorded for verdicts
KEPT_ITEMS = 8  # tuples up to this long keep their items: the positional roles of a call's arguments
# classes ckconv only ever keeps as inert records (identity hash: one step), never builds: a DCP .metadata holds
# one MetadataIndex dict key per chunk, tens of thousands in a large sharded save
RECORDED_ONLY = ("torch.distributed.checkpoint.",)
BUILDS_HASHABLE = frozenset((("builtins", "tuple"), ("builtins", "frozenset"), ("torch", "Size")))
# roles as plain bits while scanning (an enum.Flag ``|`` costs a microsecond); Role(bits) at the end
R, I, C, F = (r.value for r in (Role.REFERENCED, Role.INSTANTIATED, Role.CALLED, Role.REBUILD))
# callees that only read their arguments as data (ckconv's own builders reproduce them): a global among their
# arguments is referenced, not handed to something that calls it
DATA_CALLEES = frozenset((
    ("collections", "OrderedDict"), ("_codecs", "encode"), ("torch", "Size"), ("torch", "device"),
    *(("builtins", n) for n in ("set", "frozenset", "list", "tuple", "dict", "str", "int", "float", "bool",
                                "bytes", "bytearray", "complex")),
    *(("torch._utils", n) for n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                     "_rebuild_parameter", "_rebuild_parameter_with_state", "_rebuild_qtensor",
                                     "_rebuild_sparse_tensor")),
    ("torch.serialization", "_get_layout"),
))
# callees whose arguments have roles by position: _reconstructor(cls, base, state) makes cls and calls base;
# _rebuild_from_type_v2(func, new_type, args, state) calls func and makes new_type
POSITIONAL = {("copyreg", "_reconstructor"): (I, F), ("torch._tensor", "_rebuild_from_type_v2"): (F, I)}
GETATTR = ("builtins", "getattr")
ONE_BYTE_PUSHES = b"N\x88\x89)](}"  # NONE, NEWTRUE, NEWFALSE, EMPTY_TUPLE/LIST/DICT, MARK: no argument


def skip_popped(data, pos, width, heads):
    """The end of the run of units ``head + (width - 2) argument bytes + POP`` starting at ``pos``: a push popped at
    once changes nothing, so a flood of them (``NONE POP`` x 10**7) is stepped over a chunk at a time, in C, by
    comparing every ``width``-th byte. The caller has checked the first unit."""
    units = 32  # small first: a run of one costs a short slice, a long run grows the step to 8192 units
    while True:
        chunk = data[pos:pos + width * units]
        units = min(units * 8, 8192)
        n = len(chunk) // width
        if n == 0:
            return pos
        run = min(n - len(chunk[0::width][:n].lstrip(heads)), n - len(chunk[width - 1::width][:n].lstrip(b"0")))
        pos += run * width
        if run < n:
            return pos
_U4, _I4, _U8 = (struct.Struct(f).unpack_from for f in ("<I", "<i", "<Q"))
_F8 = struct.Struct(">d").unpack_from


class _Value:
    """What the shadow stack knows about one value: nesting depth, expanded size, cost to hash."""

    __slots__ = ("depth", "weight", "hcost", "keywork", "mutable", "hkey", "collidable", "fn", "items")
    text = None  # only a short string's shadow (_Text) has one

    def __init__(self, depth=0, weight=1, hcost=1, mutable=False, hkey=None, collidable=False, fn=None, items=None):
        self.depth, self.weight, self.hcost, self.keywork = depth, weight, hcost, 0
        self.mutable = mutable
        self.hkey = hkey  # the hash of a number whose hash an attacker can choose (floats, ints past 2**61)
        self.collidable = collidable  # tuples and frozensets: deterministic hashes, collisions can be crafted
        self.fn = fn  # (module, name) of a global
        self.items = items  # a short tuple's items (a call's arguments), for their roles


class _Text(str):
    """The shadow of a string under 200 bytes: the string itself (a global's name for STACK_GLOBAL, an attribute's
    for getattr), measured as a leaf. Built in one C call, where a _Value costs a Python ``__init__``: a state_dict
    holds two for each tensor (its key and its storage's)."""

    __slots__ = ()
    depth, weight, hcost, keywork = 0, 1, 1, 0
    mutable = collidable = False
    hkey = fn = items = None

    @property
    def text(self) -> str:
        return str(self)


class Restart(Exception):
    """The scan starts again without its fast path (:mod:`ckconv.pickling.records`): the pickle reads back a value
    the fast path did not build, or grows one it shares."""


class _Shared(_Value):
    """The value the fast path gives every tensor of one run with the same measures (tensors are never grown in
    what torch.save writes): growing one restarts the scan, where each has its own."""

    __slots__ = ()


class _Malformed(Exception):
    pass


_LEAF = _Value()  # shared by every scalar: leaves are never mutated (only ``mutable`` values grow)
_LEAF_TUPLES = [_Value(1, n + 1, n + 1, collidable=True) for n in range(9)]  # tuples of n scalars, shared alike


def _compat(module, name):
    """Python 2 names as the unpickler maps them (``__builtin__.set`` is ``builtins.set``)."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _measure(items):
    depth, weight, hcost = 0, 0, 0
    for i in items:
        if i.depth > depth:
            depth = i.depth
        weight += i.weight
        hcost += i.hcost
    return depth, weight, hcost


class Scanner:
    """One pickle's scan: the shadow stack, marks, memo and the limits. ``run`` returns the position after STOP."""

    def __init__(self, data, where, max_depth, max_nodes):
        self.data, self.where = data, where
        self.max_depth, self.max_nodes = max_depth, max_nodes
        self.stack: list = []
        self.marks: list = []
        self.fence = 0  # stack items below the innermost MARK are out of reach
        self.memo: list = []  # the memo, capped at max_nodes entries: a pickler memoizes each object once
        self.sparse: dict = {}  # indices that came out of order
        self.hash_work = 0
        self.same_hash: dict = {}
        self.collidable_keys = 0
        self.max_collidable = max(1000, max_nodes // 500)
        self.roles: dict = {}  # (module, qualname) -> Role, in first-seen order
        self.frame_end = 0
        self.table: list = []  # set by ckconv.pickling.scan: a handler per opcode byte
        self.fast = True  # tensor records read whole (ckconv.pickling.records)
        self.plans: dict = {}  # ckconv.pickling.records' measures, by the memo indices they read: cleared when one
        # of those is stored over (immutable values only: nothing else changes them)

    # -- the loop ------------------------------------------------------------------------------------------------
    def run(self, pos):
        data, table = self.data, self.table
        try:
            while pos >= 0:
                start = pos
                pos = table[data[pos]](pos + 1)
        except _Stop as stop:
            return stop.pos
        except LimitExceeded:
            raise
        except (_Malformed, ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError,
                struct.error) as exc:
            if isinstance(exc, IndexError) and start >= len(data) - 1 and not str(exc).startswith("memo"):
                exc = _Malformed("no STOP opcode")
            raise NotACheckpoint(f"{self.where}: not a readable checkpoint (malformed pickle near byte {start}: "
                                 f"{str(exc)[:120]})") from None
        raise _Malformed("no STOP opcode")  # pragma: no cover - the loop only ends by STOP or an error

    # -- limits --------------------------------------------------------------------------------------------------
    def too_big(self, v):
        if v.depth > self.max_depth:
            raise LimitExceeded(f"{self.where}: structure too deep: nesting exceeds {self.max_depth} levels "
                                "(raise CKCONV_MAX_DEPTH if you trust this file)")
        if v.weight > self.max_nodes:
            raise LimitExceeded(
                f"{self.where}: structure too large: more than {self.max_nodes} objects (shared references can "
                "expand exponentially); raise CKCONV_MAX_NODES if you trust this file")
        return v

    def limit(self, message):
        return LimitExceeded(f"{self.where}: {message}")

    def too_many_memos(self):
        return LimitExceeded(f"{self.where}: the pickle stores more than {self.max_nodes} memo entries, more than "
                             "the objects it may hold; the file is malformed or hostile (raise CKCONV_MAX_NODES if "
                             "you trust it)")

    def hashed(self, cost, keys=()):
        self.hash_work += cost
        if self.hash_work > self.max_nodes:
            raise LimitExceeded(f"{self.where}: structure too large: hashing its dictionary keys would take more "
                                f"than {self.max_nodes} steps (shared references can expand exponentially)")
        for k in keys:
            if k is _LEAF or type(k) is _Text:  # str hashes are salted: no crafted collisions
                continue
            if k.hkey is not None:
                n = self.same_hash[k.hkey] = self.same_hash.get(k.hkey, 0) + 1
                if n > MAX_SAME_HASH:
                    raise LimitExceeded(f"{self.where}: more than {MAX_SAME_HASH} dictionary keys share one hash "
                                        "value; crafted collisions would make loading take hours")
            elif k.collidable:
                self.collidable_keys += 1
                if self.collidable_keys > self.max_collidable:
                    raise LimitExceeded(f"{self.where}: more than {self.max_collidable} tuple or frozenset "
                                        "dictionary keys; refusing a possible hash-collision attack (raise "
                                        "CKCONV_MAX_NODES if you trust this file)")

    # -- the shadow stack -------------------------------------------------------------------------------------
    def pop(self, n):
        stack = self.stack
        if len(stack) - n < self.fence:
            raise _Malformed("stack underflow")
        items = stack[-n:]
        del stack[-n:]
        return items

    def pop_mark(self):
        if not self.marks:
            raise _Malformed("no MARK on the stack")
        m = self.marks.pop()
        self.fence = self.marks[-1] if self.marks else 0
        items = self.stack[m:]
        del self.stack[m:]
        return items

    def top(self):
        if len(self.stack) <= self.fence:
            raise _Malformed("stack underflow")
        return self.stack[-1]

    def grow(self, target, items, keycost=0):
        if target.mutable:
            if type(target) is _Shared:
                raise Restart
            depth, weight, _ = _measure(items)
            if depth + 1 > target.depth:
                target.depth = depth + 1
            target.weight += weight
            target.keywork += keycost
            self.too_big(target)

    def tuple_of(self, items):
        if len(items) <= KEPT_ITEMS and all(i is _LEAF for i in items):
            return _LEAF_TUPLES[len(items)]  # shape and stride tuples: never mutated, no roles to keep
        depth, weight, hcost = _measure(items)
        return self.too_big(_Value(depth + 1, weight + 1, hcost + 1, collidable=True,
                                   items=items if len(items) <= KEPT_ITEMS else None))

    def memo_put(self, index, value):
        memo, sparse = self.memo, self.sparse
        if index == len(memo) and not sparse:
            memo.append(value)
        elif index < len(memo):
            memo[index] = value
            self.plans.clear()
        elif index == len(memo):
            memo.append(value)
            sparse.pop(index, None)
            while sparse and len(memo) in sparse:
                memo.append(sparse.pop(len(memo)))
        else:
            sparse[index] = value
        if len(memo) + len(sparse) > self.max_nodes:
            raise self.too_many_memos()

    # -- globals and their roles ---------------------------------------------------------------------------------
    def named(self, module, qualname, role=R):
        key = _compat(module, qualname)
        roles = self.roles
        if key in roles:
            roles[key] |= role
        elif len(roles) < MAX_GLOBALS:
            roles[key] = role
        return key

    def use(self, callee, args, role):
        """``callee`` called (or instantiated) with ``args`` (a tuple value, or None): the roles of both, and the
        result (a getattr on a class record is a reference to its attribute)."""
        fn = callee.fn
        if fn is None:
            return None
        self.roles[fn] = self.roles.get(fn, R) | role
        items = args.items if args is not None else None
        if not items:
            return None
        if fn == GETATTR and len(items) == 2 and items[0].fn and items[1].text is not None:
            return self.named(items[0].fn[0], f"{items[0].fn[1]}.{items[1].text}")
        by_position = POSITIONAL.get(fn, ())
        default = R if fn in DATA_CALLEES else F
        roles = self.roles
        for index, item in enumerate(items):
            if item.fn is not None:
                roles[item.fn] = roles.get(item.fn, R) | (by_position[index] if index < len(by_position) else default)
        return None

    def result_of(self, items, fn=None):
        depth, weight, _ = _measure(items)
        callee = items[0].fn if items else None
        hcost = 1 if callee is not None and callee[0].startswith(RECORDED_ONLY) else OBJECT_HASH_COST
        return self.too_big(_Value(depth, weight + 1, hcost, mutable=True, collidable=callee in BUILDS_HASHABLE,
                                   fn=fn))


class _Stop(Exception):
    def __init__(self, pos):
        super().__init__(pos)
        self.pos = pos


def _line(data, pos):
    """(text, position after the newline) of a protocol-0 argument."""
    end = data.find(b"\n", pos)
    if end < 0:
        raise _Malformed("no newline after a text argument")
    return bytes(data[pos:end]), end + 1
