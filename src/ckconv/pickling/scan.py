"""Reading a pickle's opcodes before the C unpickler runs them, to refuse what would crash or stall it.

The C unpickler is fast but trusts its input in ways a file of a few bytes can abuse: a memo index
(``LONG_BINPUT 4294967280``) grows its memo table to tens of gigabytes; hashing a deeply nested tuple used as a
dict key overflows the C stack (a segfault, not an exception); hashing a tuple built from shared references
(``t = (t, t)`` 80 times) takes 2**80 steps; a length field can ask for more bytes than the file holds.

:func:`scan` decodes every opcode straight from the bytes with a table of handlers indexed by the opcode byte (the
shape of CPython's ``pickle._Unpickler.dispatch``), and runs the shadow machine of :mod:`ckconv.pickling.shadow`:
for every value, how deep it nests, how many nodes it has when expanded and what hashing it costs; for every
global, the roles the pickle gives it. Nothing is built and nothing is called. A run of pushes each popped at once
(a ``NONE POP`` flood) is skipped by one regular-expression match, in C.
"""

from __future__ import annotations

from ..errors import CorruptCheckpoint
from .allowlist import Role
from .records import LAZY, Restart, entries, tensor_record
from .shadow import (_F8, _I4, _LEAF, _U4, _U8, ONE_BYTE_PUSHES, SAFE_INT_BITS, C, I, Scanner, _line, _Malformed,
                     _measure, _Stop, _Text, _Value, skip_popped)

__all__ = ["scan"]

_POP = 0x30  # b"0"
_MARK = 0x28  # b"("
_KEY_HEADS = b"Xhj"  # BINUNICODE, BINGET, LONG_BINGET: a state_dict entry's first opcode


def _number(value):
    """The shadow of a number: ints that hash to themselves are leaves, others carry their hash (collisions)."""
    if type(value) is float:
        return _Value(hkey=hash(value))
    if value.bit_length() <= SAFE_INT_BITS and value != -1:
        return _LEAF
    return _Value(hcost=1 + value.bit_length() // 512, hkey=hash(value))


def _text_int(raw: bytes):
    raw = raw.rstrip(b"L")
    return int(raw) if raw not in (b"00", b"01") else raw == b"01"


def _leaves(s: Scanner, table):
    data, stack = s.data, s.stack
    push = stack.append

    def skip_or_push(width, heads):
        def handler(pos):
            after = pos + width
            if data[after] == _POP:  # this push is popped at once: skip the whole run of such pairs in C
                return skip_popped(data, pos - 1, width + 2, heads)
            push(_LEAF)
            return after
        return handler

    for code, width in ((b"N", 0), (b"\x88", 0), (b"\x89", 0), (b"K", 1), (b"M", 2), (b"J", 4)):
        table[code[0]] = skip_or_push(width, ONE_BYTE_PUSHES if width == 0 else code)

    def sized(head, unpack, kind):
        def handler(pos):
            n = unpack(data, pos)[0] if unpack else data[pos]
            start = pos + head
            end = start + n
            if n < 0 or end > len(data):
                raise _Malformed(f"a length of {n} bytes runs past the end of the data")
            if kind == "str":
                push(_Text(data[start:end], "utf-8", "surrogatepass") if n < 200 else _LEAF)
            elif kind == "long":
                push(_number(int.from_bytes(data[start:end], "little", signed=True)))
            else:
                push(_LEAF)
            return end
        return handler

    for code, head, unpack, kind in (
            (b"U", 1, None, "bytes"), (b"C", 1, None, "bytes"), (b"T", 4, _I4, "bytes"), (b"B", 4, _U4, "bytes"),
            (b"\x8e", 8, _U8, "bytes"), (b"\x96", 8, _U8, "bytes"), (b"\x8c", 1, None, "str"),
            (b"X", 4, _U4, "str"), (b"\x8d", 8, _U8, "str"), (b"\x8a", 1, None, "long"), (b"\x8b", 4, _I4, "long")):
        table[code[0]] = sized(head, unpack, kind)

    def fixed(width):
        def handler(pos):
            push(_LEAF)
            return pos + width
        return handler

    for code, width in ((b"\x82", 1), (b"\x83", 2), (b"\x84", 4), (b"\x97", 0)):
        table[code[0]] = fixed(width)

    def binfloat(pos):
        push(_number(_F8(data, pos)[0]))
        return pos + 8

    def text(kind):
        def handler(pos):
            raw, pos = _line(data, pos)
            if kind == "int":
                push(_number(_text_int(raw)) if raw not in (b"00", b"01") else _LEAF)
            elif kind == "float":
                push(_number(float(raw)))
            elif kind == "unicode":
                value = raw.decode("raw-unicode-escape")
                push(_Text(value) if len(value) < 200 else _LEAF)
            else:
                push(_LEAF)
            return pos
        return handler

    table[ord("G")] = binfloat
    for code, kind in ((b"I", "int"), (b"L", "int"), (b"F", "float"), (b"V", "unicode"), (b"S", "bytes"),
                       (b"P", "bytes")):
        table[code[0]] = text(kind)


def _memo_ops(s: Scanner, table):
    data, stack, memo, sparse = s.data, s.stack, s.memo, s.sparse
    push = stack.append

    def put(index, pos):
        if index < 0 or index > pos:
            raise s.limit(f"pickle memo index {index} is implausible at byte {pos}; the file is malformed or hostile")
        s.memo_put(index, s.top())

    def binput(pos):
        index = data[pos]
        if index == len(memo) and not sparse and len(stack) > s.fence and index < s.max_nodes:
            memo.append(stack[-1])  # the common case: the next index in order
        else:
            put(index, pos)
        return pos + 1

    def long_binput(pos):
        index = _U4(data, pos)[0]
        if index == len(memo) and not sparse and len(stack) > s.fence and index < s.max_nodes:
            memo.append(stack[-1])
        else:
            put(index, pos)
        return pos + 4

    def text_put(pos):
        raw, after = _line(data, pos)
        put(int(raw), pos)
        return after

    def memoize(pos):
        s.memo_put(len(memo) + len(sparse), s.top())
        return pos

    def get(index):
        value = memo[index] if 0 <= index < len(memo) else sparse.get(index)
        if value is None:
            raise _Malformed(f"memo index {index} was never stored")
        if value is LAZY:  # stored by a record the fast path read without building its values
            raise Restart
        push(value)

    def binget(pos):
        get(data[pos])
        return pos + 1

    def long_binget(pos):
        get(_U4(data, pos)[0])
        return pos + 4

    def text_get(pos):
        raw, pos = _line(data, pos)
        get(int(raw))
        return pos

    for code, fn in ((b"q", binput), (b"r", long_binput), (b"p", text_put), (b"\x94", memoize), (b"h", binget),
                     (b"j", long_binget), (b"g", text_get)):
        table[code[0]] = fn


def _containers(s: Scanner, table):
    data, stack = s.data, s.stack
    push = stack.append

    def empty(mutable, flood):
        def handler(pos):
            if flood and data[pos] == _POP:
                return skip_popped(data, pos - 1, 2, ONE_BYTE_PUSHES)
            push(_Value(1, 1, 1, mutable=mutable))
            return pos
        return handler

    def tuple_n(n):
        def handler(pos):
            push(s.tuple_of(s.pop(n)))
            return pos
        return handler

    def tuple_mark(pos):
        push(s.tuple_of(s.pop_mark()))
        return pos

    def list_mark(pos):
        value = _Value(1, 1, 1, mutable=True)
        s.grow(value, s.pop_mark())
        push(value)
        return pos

    def dict_mark(pos):
        items = s.pop_mark()
        keys = items[0::2]
        cost = sum(k.hcost for k in keys)
        s.hashed(cost, keys)
        value = _Value(1, 1, 1, mutable=True)
        s.grow(value, items, cost)
        push(value)
        return pos

    def frozenset_mark(pos):
        items = s.pop_mark()
        s.hashed(sum(k.hcost for k in items), items)
        depth, weight, _ = _measure(items)
        push(s.too_big(_Value(depth + 1, weight + 1, 1 + len(items), collidable=True)))
        return pos

    def append(pos):
        items = s.pop(1)
        s.grow(s.top(), items)
        return pos

    def marked_add(kind):
        def handler(pos):
            items = s.pop_mark()
            keys = items if kind == "set" else items[0::2] if kind == "dict" else ()
            cost = sum(k.hcost for k in keys)
            s.hashed(cost, keys)
            s.grow(s.top(), items, cost)
            return pos
        return handler

    def setitem(pos):
        items = s.pop(2)
        s.hashed(items[0].hcost, items[:1])
        s.grow(s.top(), items, items[0].hcost)
        return pos

    for code, fn in ((b")", empty(False, True)), (b"]", empty(True, True)), (b"}", empty(True, True)),
                     (b"\x8f", empty(True, False)), (b"\x85", tuple_n(1)), (b"\x86", tuple_n(2)),
                     (b"\x87", tuple_n(3)), (b"t", tuple_mark), (b"l", list_mark), (b"d", dict_mark),
                     (b"\x91", frozenset_mark), (b"a", append), (b"e", marked_add("list")),
                     (b"\x90", marked_add("set")), (b"u", marked_add("dict")), (b"s", setitem)):
        table[code[0]] = fn


def _calls(s: Scanner, table):
    data, stack = s.data, s.stack
    push = stack.append

    def global_(pos):
        module, pos = _line(data, pos)
        qualname, pos = _line(data, pos)
        push(_Value(fn=s.named(module.decode("utf-8"), qualname.decode("utf-8"))))
        return pos

    def stack_global(pos):
        module, qualname = s.pop(2)
        if module.text is None or qualname.text is None:
            raise _Malformed("STACK_GLOBAL needs two short strings")
        push(_Value(fn=s.named(module.text, qualname.text)))
        return pos

    def reduce(pos):
        items = s.pop(2)
        push(s.result_of(items, s.use(items[0], items[1], C)))
        return pos

    def newobj(n):
        def handler(pos):
            items = s.pop(n)
            s.use(items[0], items[1], I)
            push(s.result_of(items))
            return pos
        return handler

    def obj(pos):
        items = s.pop_mark()
        if not items:
            raise _Malformed("OBJ without a class")
        s.use(items[0], s.tuple_of(items[1:]), C if len(items) > 1 else I)
        push(s.result_of(items))
        return pos

    def inst(pos):
        module, pos = _line(data, pos)
        qualname, pos = _line(data, pos)
        callee = _Value(fn=s.named(module.decode("utf-8"), qualname.decode("utf-8")))
        items = s.pop_mark()
        s.use(callee, s.tuple_of(items), C if items else I)
        push(s.result_of([callee, *items]))
        return pos

    def build(pos):
        (state,) = s.pop(1)
        target = s.top()
        s.hashed(state.keywork)  # BUILD re-inserts the state's keys into the object's __dict__
        s.grow(target, [state])
        return pos

    def binpersid(pos):
        s.pop(1)
        push(_LEAF)
        return pos

    for code, fn in ((b"c", global_), (b"\x93", stack_global), (b"R", reduce), (b"\x81", newobj(2)),
                     (b"\x92", newobj(3)), (b"o", obj), (b"i", inst), (b"b", build), (b"Q", binpersid)):
        table[code[0]] = fn


def _control(s: Scanner, table):
    data, stack, marks = s.data, s.stack, s.marks

    def mark(pos):
        following = data[pos]
        if following == _POP:
            return skip_popped(data, pos - 1, 2, ONE_BYTE_PUSHES)
        if following == _MARK and s.fast:  # perhaps torch's record of a tensor: read whole, or by the handlers
            end = tensor_record(s, pos - 1)
            if end is not None:
                return entries(s, end)  # and the state_dict entries after it
        marks.append(len(stack))
        s.fence = len(stack)
        if following in _KEY_HEADS and s.fast:  # perhaps a dict's items: a run of state_dict entries
            return entries(s, pos)
        return pos

    def pop(pos):
        if marks and marks[-1] == len(stack):
            marks.pop()
            s.fence = marks[-1] if marks else 0
        else:
            s.pop(1)
        return pos

    def pop_mark(pos):
        s.pop_mark()
        return pos

    def dup(pos):
        stack.append(s.top())
        return pos

    def readonly_buffer(pos):
        s.top()
        return pos

    def proto(pos):
        return pos + 1

    def frame(pos):
        n = _U8(data, pos)[0]
        if n > len(data) - pos - 8:
            raise _Malformed(f"frame of {n} bytes runs past the end of the data")
        s.frame_end = max(s.frame_end, pos + 8 + n)  # a frame may start inside another
        return pos + 8

    def stop(pos):
        if len(stack) <= s.fence:
            raise _Malformed("STOP with an empty stack")
        if s.frame_end > pos:  # read two ways: torch's buffered file stops at STOP, a reader without peek does not
            raise CorruptCheckpoint(
                f"{s.where}: a pickle FRAME holds {s.frame_end - pos} bytes after its STOP, which torch reads as the "
                "next pickle and other readers skip; refusing an ambiguous file (re-save the original with torch.save)")
        raise _Stop(pos)

    for code, fn in ((b"(", mark), (b"0", pop), (b"1", pop_mark), (b"2", dup), (b"\x98", readonly_buffer),
                     (b"\x80", proto), (b"\x95", frame), (b".", stop)):
        table[code[0]] = fn


def _table(s: Scanner) -> list:
    """The handlers, indexed by opcode byte: each takes the position after the opcode and returns the next one."""
    table: list = [None] * 256
    for family in (_leaves, _memo_ops, _containers, _calls, _control):
        family(s, table)
    data = s.data

    def unknown(pos):
        raise _Malformed(f"unexpected opcode {data[pos - 1]:#04x}")

    return [h or unknown for h in table]


def scan(data, start=0, *, where, max_depth, max_nodes):
    """Walk the opcodes of the pickle at ``data[start:]`` (bytes, or a read-only mmap of the file); raise a
    CkconvError for a hostile one (with ``roles``: the globals seen so far, so a caller can name dangerous ones).
    Returns (position after STOP, {(module, qualname): Role} of every global, in first-seen order)."""
    for fast in (True, False):  # without the fast path when a pickle reads back what it skipped building
        s = Scanner(data, where, max_depth, max_nodes)
        s.fast = fast
        s.table = _table(s)
        try:
            end = s.run(start)
            break
        except Restart:
            continue
        except Exception as exc:
            exc.roles = s.roles
            raise
    return end, {key: Role(bits) for key, bits in s.roles.items()}

