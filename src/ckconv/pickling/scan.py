"""Reading a pickle's opcodes before the C unpickler runs them, to refuse what would crash or stall it.

The C unpickler is fast but trusts its input in ways a file of a few bytes can abuse: a memo index
(``LONG_BINPUT 4294967280``) grows its memo table to tens of gigabytes; hashing a deeply nested tuple used as a
dict key overflows the C stack (a segfault, not an exception); hashing a tuple built from shared references
(``t = (t, t)`` 80 times) takes 2**80 steps; a length field can ask for more bytes than the file holds.

:func:`scan` decodes every opcode with :mod:`pickletools` and runs a shadow stack that records, for every value,
how deep it nests, how many nodes it has when expanded and what hashing it costs. Nothing is built and nothing is
called. Cost: about one microsecond per opcode, a few milliseconds for a typical ``data.pkl``.
"""

from __future__ import annotations

import pickletools

from ..errors import CorruptCheckpoint, LimitExceeded, NotACheckpoint

NUMBERS = frozenset(("INT", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT"))
LEAVES = frozenset((
    "BININT", "BININT1", "BININT2", "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES",
    "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NEXT_BUFFER", "NONE", "NEWTRUE", "NEWFALSE", "PERSID", "EXT1",
    "EXT2", "EXT4"))
STRINGS = frozenset(("UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"))
PUTS = frozenset(("PUT", "BINPUT", "LONG_BINPUT"))
GETS = frozenset(("GET", "BINGET", "LONG_BINGET"))
OBJECT_HASH_COST = 512  # bound on hashing anything a builder returns (ckconv's builders cap what they build)
MAX_SAME_HASH = 64  # dict keys sharing one hash: n of them cost n**2 / 2 comparisons (hash flooding)
SAFE_INT_BITS = 60  # ints below 2**61 - 1 hash to themselves: distinct ones never collide
# classes ckconv only ever keeps as inert records (identity hash: one step), never builds: a DCP .metadata holds
# one MetadataIndex dict key per chunk, tens of thousands in a large sharded save
RECORDED_ONLY = ("torch.distributed.checkpoint.",)
BUILDS_HASHABLE = frozenset((("builtins", "tuple"), ("__builtin__", "tuple"), ("builtins", "frozenset"),
                             ("__builtin__", "frozenset"), ("torch", "Size")))


class _Value:
    """What the shadow stack knows about one value: nesting depth, expanded size, cost to hash."""

    __slots__ = ("depth", "weight", "hcost", "keywork", "mutable", "text", "hkey", "collidable", "fn")

    def __init__(self, depth=0, weight=1, hcost=1, mutable=False, text=None, hkey=None, collidable=False, fn=None):
        self.depth, self.weight, self.hcost, self.keywork = depth, weight, hcost, 0
        self.mutable, self.text = mutable, text
        self.hkey = hkey  # the hash of a number whose hash an attacker can choose (floats, ints past 2**61)
        self.collidable = collidable  # tuples and frozensets: deterministic hashes, collisions can be crafted
        self.fn = fn  # (module, name) of a global


class _Malformed(Exception):
    pass


def _memo_put(dense, sparse, index, value):
    """The shadow memo is a list while indices come in order (8 bytes an entry) and a dict for the rest."""
    if index < len(dense):
        dense[index] = value
    elif index == len(dense):
        dense.append(value)
        sparse.pop(index, None)
        while sparse and len(dense) in sparse:
            dense.append(sparse.pop(len(dense)))
    else:
        sparse[index] = value


_LEAF = _Value()  # shared by every scalar: leaves are never mutated (only ``mutable`` values grow)
_K_LEAF, _K_STR, _K_LONG, _K_GET, _K_PUT, _K_MEMO, _K_MARK, _K_EMPTY_MUT, _K_EMPTY_TUPLE, _K_TUPLE, _K_TUPLEN, \
    _K_LIST, _K_DICT, _K_FROZENSET, _K_APPEND, _K_MARKED_ADD, _K_SETITEM, _K_BUILD, _K_POP, _K_POP_MARK, _K_DUP, \
    _K_GLOBAL, _K_STACK_GLOBAL, _K_CALL2, _K_CALL3, _K_CALL_MARK, _K_BINPERSID, _K_TOP, _K_FRAME, _K_STOP, \
    _K_NOTHING = range(31)
_KINDS = {**{n: _K_LEAF for n in LEAVES}, **{n: _K_STR for n in STRINGS}, **{n: _K_GET for n in GETS},
          **{n: _K_PUT for n in PUTS}, **{n: _K_LONG for n in NUMBERS}, "MEMOIZE": _K_MEMO, "MARK": _K_MARK,
          "EMPTY_LIST": _K_EMPTY_MUT, "EMPTY_DICT": _K_EMPTY_MUT, "EMPTY_SET": _K_EMPTY_MUT,
          "EMPTY_TUPLE": _K_EMPTY_TUPLE, "TUPLE": _K_TUPLE, "TUPLE1": _K_TUPLEN, "TUPLE2": _K_TUPLEN,
          "TUPLE3": _K_TUPLEN, "LIST": _K_LIST, "DICT": _K_DICT, "FROZENSET": _K_FROZENSET, "APPEND": _K_APPEND,
          "APPENDS": _K_MARKED_ADD, "ADDITEMS": _K_MARKED_ADD, "SETITEMS": _K_MARKED_ADD, "SETITEM": _K_SETITEM,
          "BUILD": _K_BUILD, "POP": _K_POP, "POP_MARK": _K_POP_MARK, "DUP": _K_DUP, "GLOBAL": _K_GLOBAL,
          "STACK_GLOBAL": _K_STACK_GLOBAL, "REDUCE": _K_CALL2, "NEWOBJ": _K_CALL2, "NEWOBJ_EX": _K_CALL3,
          "INST": _K_CALL_MARK, "OBJ": _K_CALL_MARK, "BINPERSID": _K_BINPERSID, "READONLY_BUFFER": _K_TOP,
          "FRAME": _K_FRAME, "STOP": _K_STOP, "PROTO": _K_NOTHING}
_TUPLE_N = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}


def scan(source, *, where, max_depth, max_nodes, size=None, seen_globals=None):
    """Walk the opcodes of one pickle (bytes, or a file positioned at it); raise a CkconvError for a hostile one.

    ``seen_globals`` (a list) receives every ``(module, name)`` the pickle refers to, so a caller can name dangerous
    ones even when the rest of the pickle is malformed. The file position is left wherever reading stopped.
    """
    total = len(source) if isinstance(source, (bytes, bytearray)) else size
    stack: list = []
    marks: list = []
    memo: list = []  # the memo, capped at max_nodes entries: a pickler memoizes each object once, so 20 million
    sparse: dict = {}  # one-byte MEMOIZE opcodes are hostile (they would cost gigabytes here and in the C unpickler)
    hash_work = 0
    same_hash: dict = {}
    collidable_keys = 0
    max_collidable = max(1000, max_nodes // 500)
    fence = 0  # stack items below the innermost MARK are out of reach

    def too_big(v):
        if v.depth > max_depth:
            raise LimitExceeded(f"{where}: structure too deep: nesting exceeds {max_depth} levels "
                                "(raise CKCONV_MAX_DEPTH if you trust this file)")
        if v.weight > max_nodes:
            raise LimitExceeded(
                f"{where}: structure too large: more than {max_nodes} objects (shared references can expand "
                "exponentially); raise CKCONV_MAX_NODES if you trust this file")
        return v

    def too_many_memos():
        return LimitExceeded(f"{where}: the pickle stores more than {max_nodes} memo entries, more than the objects "
                             "it may hold; the file is malformed or hostile (raise CKCONV_MAX_NODES if you trust it)")

    def pop(n):
        if len(stack) - n < fence:
            raise _Malformed("stack underflow")
        items = stack[-n:]
        del stack[-n:]
        return items

    def pop_mark():
        nonlocal fence
        if not marks:
            raise _Malformed("no MARK on the stack")
        m = marks.pop()
        fence = marks[-1] if marks else 0
        items = stack[m:]
        del stack[m:]
        return items

    def hashed(cost, keys=()):
        nonlocal hash_work, collidable_keys
        hash_work += cost
        if hash_work > max_nodes:
            raise LimitExceeded(f"{where}: structure too large: hashing its dictionary keys would take more than "
                                f"{max_nodes} steps (shared references can expand exponentially)")
        for k in keys:
            if k is _LEAF or k.text is not None:
                continue
            if k.hkey is not None:
                n = same_hash[k.hkey] = same_hash.get(k.hkey, 0) + 1
                if n > MAX_SAME_HASH:
                    raise LimitExceeded(f"{where}: more than {MAX_SAME_HASH} dictionary keys share one hash value; "
                                        "crafted collisions would make loading take hours")
            elif k.collidable:
                collidable_keys += 1
                if collidable_keys > max_collidable:
                    raise LimitExceeded(f"{where}: more than {max_collidable} tuple or frozenset dictionary keys; "
                                        "refusing a possible hash-collision attack (raise CKCONV_MAX_NODES if you "
                                        "trust this file)")

    def measure(items):
        depth, weight, hcost = 0, 0, 0
        for i in items:
            if i.depth > depth:
                depth = i.depth
            weight += i.weight
            hcost += i.hcost
        return depth, weight, hcost

    def key_cost(keys):
        return sum(k.hcost for k in keys)

    def grow(target, items, keycost=0):
        if target.mutable:
            depth, weight, _ = measure(items)
            if depth + 1 > target.depth:
                target.depth = depth + 1
            target.weight += weight
            target.keywork += keycost
            too_big(target)

    def tuple_of(items):
        depth, weight, hcost = measure(items)
        return too_big(_Value(depth + 1, weight + 1, hcost + 1, collidable=True))

    def result_of(items):
        depth, weight, _ = measure(items)
        fn = items[0].fn if items else None
        hcost = 1 if fn is not None and fn[0].startswith(RECORDED_ONLY) else OBJECT_HASH_COST
        return too_big(_Value(depth, weight + 1, hcost, mutable=True, collidable=fn in BUILDS_HASHABLE))

    pos = 0
    frame_end = 0  # a FRAME past STOP is read two ways: the C unpickler reading a file with peek (torch's
    # buffered file) stops at STOP, one without peek consumes the whole frame (docs/safety.md)
    append = stack.append
    kinds = _KINDS
    try:
        for op, arg, pos in pickletools.genops(source):
            kind = kinds.get(op.name)
            if kind == _K_PUT:
                if arg < 0 or arg > pos:
                    raise LimitExceeded(f"{where}: pickle memo index {arg} is implausible at byte {pos}; "
                                        "the file is malformed or hostile")
                if len(stack) <= fence:
                    raise _Malformed("stack underflow")
                if arg == len(memo) and not sparse:
                    memo.append(stack[-1])
                else:
                    _memo_put(memo, sparse, arg, stack[-1])
                if len(memo) + len(sparse) > max_nodes:
                    raise too_many_memos()
            elif kind == _K_GET:
                value = memo[arg] if 0 <= arg < len(memo) else sparse.get(arg)
                if value is None:
                    raise _Malformed(f"memo index {arg} was never stored")
                append(value)
            elif kind == _K_LEAF:
                append(_LEAF)
            elif kind == _K_STR:
                append(_Value(text=arg) if len(arg) < 200 else _LEAF)
            elif kind == _K_MARK:
                marks.append(len(stack))
                fence = len(stack)
            elif kind == _K_TUPLEN:
                append(tuple_of(pop(_TUPLE_N[op.name])))
            elif kind == _K_TUPLE:
                append(tuple_of(pop_mark()))
            elif kind == _K_CALL2:
                append(result_of(pop(2)))
            elif kind == _K_MARKED_ADD:
                items = pop_mark()
                name = op.name
                keys = items if name == "ADDITEMS" else items[0::2] if name == "SETITEMS" else ()
                cost = key_cost(keys)
                hashed(cost, keys)
                if len(stack) <= fence:
                    raise _Malformed("stack underflow")
                grow(stack[-1], items, cost)
            elif kind == _K_EMPTY_MUT:
                append(_Value(1, 1, 1, mutable=True))
            elif kind == _K_GLOBAL:
                module, _, qualname = arg.partition(" ")
                _record(seen_globals, module, qualname)
                append(_Value(fn=(module, qualname)))
            elif kind == _K_BINPERSID:
                pop(1)
                append(_LEAF)
            elif kind == _K_LONG:  # numbers whose hash the file can choose carry it, to count collisions
                if type(arg) is float:
                    append(_Value(hkey=hash(arg)))
                elif arg.bit_length() <= SAFE_INT_BITS and arg != -1:
                    append(_LEAF)
                else:
                    append(_Value(hcost=1 + arg.bit_length() // 512, hkey=hash(arg)))
            elif kind == _K_MEMO:
                if len(stack) <= fence:
                    raise _Malformed("stack underflow")
                if sparse:
                    _memo_put(memo, sparse, len(memo) + len(sparse), stack[-1])
                else:
                    memo.append(stack[-1])
                if len(memo) + len(sparse) > max_nodes:
                    raise too_many_memos()
            elif kind == _K_EMPTY_TUPLE:
                append(_Value(1, 1, 1))
            elif kind == _K_LIST:
                value = _Value(1, 1, 1, mutable=True)
                grow(value, pop_mark())
                append(value)
            elif kind == _K_DICT:
                items = pop_mark()
                cost = key_cost(items[0::2])
                hashed(cost, items[0::2])
                value = _Value(1, 1, 1, mutable=True)
                grow(value, items, cost)
                append(value)
            elif kind == _K_FROZENSET:
                items = pop_mark()
                hashed(key_cost(items), items)
                depth, weight, _ = measure(items)
                append(too_big(_Value(depth + 1, weight + 1, 1 + len(items), collidable=True)))
            elif kind == _K_APPEND:
                items = pop(1)
                if len(stack) <= fence:
                    raise _Malformed("stack underflow")
                grow(stack[-1], items)
            elif kind == _K_SETITEM:
                items = pop(2)
                cost = items[0].hcost
                hashed(cost, items[:1])
                if len(stack) <= fence:
                    raise _Malformed("stack underflow")
                grow(stack[-1], items, cost)
            elif kind == _K_BUILD:
                (state,) = pop(1)
                if len(stack) <= fence:
                    raise _Malformed("stack underflow")
                hashed(state.keywork)  # BUILD re-inserts the state's keys into the object's __dict__
                grow(stack[-1], [state])
            elif kind == _K_POP:
                if marks and marks[-1] == len(stack):
                    marks.pop()
                    fence = marks[-1] if marks else 0
                else:
                    pop(1)
            elif kind == _K_POP_MARK:
                pop_mark()
            elif kind == _K_DUP:
                if len(stack) <= fence:
                    raise _Malformed("stack underflow")
                append(stack[-1])
            elif kind == _K_STACK_GLOBAL:
                module, qualname = pop(2)
                if module.text is None or qualname.text is None:
                    raise _Malformed("STACK_GLOBAL needs two short strings")
                _record(seen_globals, module.text, qualname.text)
                append(_Value(fn=(module.text, qualname.text)))
            elif kind == _K_CALL3:
                append(result_of(pop(3)))
            elif kind == _K_CALL_MARK:
                append(result_of(pop_mark()))
            elif kind == _K_TOP:
                if len(stack) <= fence:
                    raise _Malformed("stack underflow")
            elif kind == _K_FRAME:
                if total is not None and arg > total - pos:
                    raise _Malformed(f"frame of {arg} bytes runs past the end of the data")
                frame_end = max(frame_end, pos + 9 + arg)  # a frame may start inside another
            elif kind == _K_STOP:
                if len(stack) <= fence:
                    raise _Malformed("STOP with an empty stack")
                if frame_end > pos + 1:
                    raise CorruptCheckpoint(
                        f"{where}: a pickle FRAME holds {frame_end - pos - 1} bytes after its STOP, which torch reads "
                        "as the next pickle and other readers skip; refusing an ambiguous file (re-save the original "
                        "with torch.save)")
                return
            elif kind != _K_NOTHING:
                raise _Malformed(f"unexpected opcode {op.name}")
        raise _Malformed("no STOP opcode")
    except (_Malformed, ValueError, KeyError, IndexError, TypeError, EOFError, OverflowError, MemoryError) as exc:
        raise NotACheckpoint(f"{where}: not a readable checkpoint (malformed pickle near byte {pos}: "
                             f"{str(exc)[:120]})") from None


def _record(seen, module, qualname):
    if seen is not None and (module, qualname) not in seen:
        seen.append((module, qualname))
