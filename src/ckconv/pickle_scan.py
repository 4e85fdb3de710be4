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

from .errors import LimitExceeded, NotACheckpoint

LEAVES = frozenset((
    "INT", "BININT", "BININT1", "BININT2", "LONG", "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES",
    "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NEXT_BUFFER", "NONE", "NEWTRUE", "NEWFALSE", "FLOAT", "BINFLOAT",
    "PERSID", "EXT1", "EXT2", "EXT4"))
STRINGS = frozenset(("UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"))
PUTS = frozenset(("PUT", "BINPUT", "LONG_BINPUT"))
GETS = frozenset(("GET", "BINGET", "LONG_BINGET"))
OBJECT_HASH_COST = 512  # bound on hashing anything a builder returns (ckconv's builders cap what they build)


class _Value:
    """What the shadow stack knows about one value: nesting depth, expanded size, cost to hash."""

    __slots__ = ("depth", "weight", "hcost", "keywork", "mutable", "text")

    def __init__(self, depth=0, weight=1, hcost=1, mutable=False, text=None):
        self.depth, self.weight, self.hcost, self.keywork = depth, weight, hcost, 0
        self.mutable, self.text = mutable, text


class _Malformed(Exception):
    pass


def scan(source, *, where, max_depth, max_nodes, size=None, seen_globals=None):
    """Walk the opcodes of one pickle (bytes, or a file positioned at it); raise a CkconvError for a hostile one.

    ``seen_globals`` (a list) receives every ``(module, name)`` the pickle refers to, so a caller can name dangerous
    ones even when the rest of the pickle is malformed. The file position is left wherever reading stopped.
    """
    total = len(source) if isinstance(source, (bytes, bytearray)) else size
    stack: list = []
    marks: list = []
    memo: dict = {}
    hash_work = 0

    def too_big(v):
        if v.depth > max_depth:
            raise LimitExceeded(f"{where}: structure too deep: nesting exceeds {max_depth} levels "
                                "(raise CKCONV_MAX_DEPTH if you trust this file)")
        if v.weight > max_nodes:
            raise LimitExceeded(
                f"{where}: structure too large: more than {max_nodes} objects (shared references can expand "
                "exponentially); raise CKCONV_MAX_NODES if you trust this file")
        return v

    def pop(n=1):
        fence = marks[-1] if marks else 0
        if len(stack) - n < fence:
            raise _Malformed("stack underflow")
        items = stack[len(stack) - n:]
        del stack[len(stack) - n:]
        return items

    def pop_mark():
        if not marks:
            raise _Malformed("no MARK on the stack")
        m = marks.pop()
        items = stack[m:]
        del stack[m:]
        return items

    def top():
        if len(stack) <= (marks[-1] if marks else 0):
            raise _Malformed("stack underflow")
        return stack[-1]

    def hashed(keys):
        nonlocal hash_work
        hash_work += sum(k.hcost for k in keys)
        if hash_work > max_nodes:
            raise LimitExceeded(f"{where}: structure too large: hashing its dictionary keys would take more than "
                                f"{max_nodes} steps (shared references can expand exponentially)")

    def grow(target, items, keys=()):
        if target.mutable:
            target.depth = max(target.depth, 1 + max((i.depth for i in items), default=0))
            target.weight += sum(i.weight for i in items)
            target.keywork += sum(k.hcost for k in keys)
            too_big(target)

    def tuple_of(items):
        return too_big(_Value(1 + max((i.depth for i in items), default=0), 1 + sum(i.weight for i in items),
                              1 + sum(i.hcost for i in items)))

    def result_of(items):
        return too_big(_Value(max((i.depth for i in items), default=0), 1 + sum(i.weight for i in items),
                              OBJECT_HASH_COST, mutable=True))

    ops = pickletools.genops(source)
    pos = 0
    try:
        for op, arg, pos in ops:
            name = op.name
            if name in LEAVES:
                stack.append(_Value())
            elif name in STRINGS:
                stack.append(_Value(text=arg if len(arg) < 200 else None))
            elif name in ("LONG1", "LONG4"):
                stack.append(_Value(hcost=1 + arg.bit_length() // 512))
            elif name in GETS:
                if arg not in memo:
                    raise _Malformed(f"memo index {arg} was never stored")
                stack.append(memo[arg])
            elif name in PUTS:
                if arg < 0 or arg > pos:
                    raise LimitExceeded(f"{where}: pickle memo index {arg} is implausible at byte {pos}; "
                                        "the file is malformed or hostile")
                memo[arg] = top()
            elif name == "MEMOIZE":
                memo[len(memo)] = top()
            elif name == "MARK":
                marks.append(len(stack))
            elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
                stack.append(_Value(1, 1, 1, mutable=True))
            elif name == "EMPTY_TUPLE":
                stack.append(_Value(1, 1, 1))
            elif name == "TUPLE":
                stack.append(tuple_of(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                stack.append(tuple_of(pop(int(name[-1]))))
            elif name == "LIST":
                v = _Value(1, 1, 1, mutable=True)
                grow(v, pop_mark())
                stack.append(v)
            elif name == "DICT":
                items = pop_mark()
                hashed(items[0::2])
                v = _Value(1, 1, 1, mutable=True)
                grow(v, items, items[0::2])
                stack.append(v)
            elif name == "FROZENSET":
                items = pop_mark()
                hashed(items)
                stack.append(too_big(_Value(1 + max((i.depth for i in items), default=0),
                                            1 + sum(i.weight for i in items), 1 + len(items))))
            elif name == "APPEND":
                item = pop()
                grow(top(), item)
            elif name in ("APPENDS", "ADDITEMS", "SETITEMS"):
                items = pop_mark()
                keys = items if name == "ADDITEMS" else items[0::2] if name == "SETITEMS" else ()
                hashed(keys)
                grow(top(), items, keys)
            elif name == "SETITEM":
                items = pop(2)
                hashed(items[:1])
                grow(top(), items, items[:1])
            elif name == "BUILD":
                (state,) = pop()
                target = top()
                hashed([_Value(hcost=state.keywork)])  # BUILD re-inserts the state's keys into __dict__
                grow(target, [state])
            elif name == "POP":
                if marks and marks[-1] == len(stack):
                    marks.pop()
                else:
                    pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(top())
            elif name == "GLOBAL":
                module, _, qualname = arg.partition(" ")
                _record(seen_globals, module, qualname)
                stack.append(_Value())
            elif name == "STACK_GLOBAL":
                module, qualname = pop(2)
                if module.text is None or qualname.text is None:
                    raise _Malformed("STACK_GLOBAL needs two short strings")
                _record(seen_globals, module.text, qualname.text)
                stack.append(_Value())
            elif name in ("REDUCE", "NEWOBJ"):
                stack.append(result_of(pop(2)))
            elif name == "NEWOBJ_EX":
                stack.append(result_of(pop(3)))
            elif name in ("INST", "OBJ"):
                stack.append(result_of(pop_mark()))
            elif name == "BINPERSID":
                pop()
                stack.append(_Value())
            elif name == "READONLY_BUFFER":
                top()
            elif name == "FRAME":
                if total is not None and arg > total - pos:
                    raise _Malformed(f"frame of {arg} bytes runs past the end of the data")
            elif name == "STOP":
                top()
                return
            elif name != "PROTO":
                raise _Malformed(f"unexpected opcode {name}")
        raise _Malformed("no STOP opcode")
    except (_Malformed, ValueError, KeyError, TypeError, EOFError, OverflowError, MemoryError) as exc:
        raise NotACheckpoint(f"{where}: not a readable checkpoint (malformed pickle near byte {pos}: "
                             f"{str(exc)[:120]})") from None


def _record(seen, module, qualname):
    if seen is not None and (module, qualname) not in seen:
        seen.append((module, qualname))
