"""Which globals a pickle may name, in which role: the verdicts for reading, the allowlist for writing.

Reading never calls anything a file names (the unpickler answers every global with a builder of ckconv's own or an
inert record), so reading needs no allowlist: it needs *verdicts* that tell the user what ``torch.load(...,
weights_only=False)`` would do with the same file. The opcode scan records the role the pickle gives each name
(:class:`~ckconv.pickling.allowlist.Role`: referenced, instantiated, called, handed to a rebuild), and the verdict
follows that use:

* **safe** -- in every role the file gives it, the name is one ckconv reproduces itself (:data:`IMPLEMENTED`: tensor
  rebuilds, containers, dtypes, storages) or on the exact allowlist (:mod:`ckconv.pickling.allowlist`) in that role;
* **dangerous** -- known to run commands, import code, touch files or change the loading process's state
  (``os.system``, ``builtins.eval``, ``runpy``, ``torch.set_default_dtype``, and the gadgets red teams found:
  ``pydoc.pipepager``, ``logging.config.dictConfig``...), or a name that is not a name (newlines, spaces: opcode
  injection) or a dotted path that walks through a dangerous module (``argparse._os.system``);
* **unknown** -- everything else, a class allowed to be instantiated but *called* with chosen arguments included:
  ckconv does not call it, but torch would.

Writing is where a deny-list cannot win: what ckconv *writes* as a global must be allowed in the role it is written
in (:func:`may_write`), or allowed by the user as a whole dotted path or a ``prefix.*`` pattern (``--allow-global``,
``allow_globals=``). Every name is validated as dotted Python identifiers before anything is written, so a name can
never inject opcodes.
"""

from __future__ import annotations

from .. import dtypes
from ..errors import UnsafeCheckpoint, UsageError
from ..model import Foreign
from ..tensor_kinds import QSCHEMES
from .allowlist import PATH_CLASSES, Role, roles_of
from .verdicts import FINDINGS, Verdict, unknown_globals, worst

SAFE, UNKNOWN, DANGEROUS = Verdict.SAFE, Verdict.UNKNOWN, Verdict.DANGEROUS

DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "runpy", "importlib", "pickle", "_pickle", "marshal", "shutil",
    "socket", "ctypes", "code", "codeop", "pty", "webbrowser", "types", "pdb", "bdb", "timeit", "commands",
    "platform", "multiprocessing", "asyncio", "threading", "_thread", "signal", "tempfile", "glob", "pathlib",
    "torch._C", "torch._ops", "torch.library", "torch.cuda.memory", "torch.backends",
    "io", "_io", "urllib", "http", "ftplib", "smtplib", "telnetlib", "requests", "httplib", "pip", "setuptools",
    "distutils", "venv", "zipimport", "pkgutil", "inspect", "gc", "operator", "functools", "numpy.testing",
    "dill", "joblib", "cloudpickle", "torch.hub", "torch.serialization", "torch.jit", "torch.package",
    "torch.utils.cpp_extension", "torch._dynamo", "torch._inductor", "torch.ops", "torch.classes", "cProfile",
    "profile", "trace", "imp", "builtins", "__builtin__", "__builtins__", "exec", "site", "sysconfig", "compileall",
    "py_compile", "ensurepip", "idlelib", "tkinter", "turtle", "xmlrpc", "asyncore", "sqlite3", "dbm", "shelve",
    "pydoc", "imaplib", "poplib", "nntplib", "_osx_support", "_aix_support", "logging.config", "codecs",
    "torch.utils.collect_env", "torch.fx", "torch.utils.data.datapipes", "torch._export", "torch.export",
    "torch.testing", "torch.utils.bottleneck", "torch.utils.benchmark", "numpy.distutils", "numpy.f2py",
    "_posixsubprocess", "_winapi", "msvcrt", "winreg", "mailcap", "cgi", "cgitb", "zipfile", "tarfile", "lzma",
    "bz2", "gzip", "fileinput", "linecache", "tokenize", "ast", "dis",  "_bootlocale",
    "_sitebuiltins", "antigravity", "this", "doctest", "unittest", "lib2to3", "configparser",
})
DANGEROUS_NAMES = frozenset({
    "numpy.load", "numpy.lib.npyio.load", "numpy.savetxt", "numpy.lib.npyio.savetxt", "numpy.save", "numpy.savez",
    "numpy.loadtxt", "numpy.genfromtxt", "numpy.fromfile", "numpy.memmap", "numpy.lib.npyio.loadtxt",
    "numpy.ctypeslib.load_library", "torch.load", "torch.save", "torch.compile", "torch.from_file",
    "torch.storage._load_from_bytes", "torch.manual_seed", "torch.seed", "torch.use_deterministic_algorithms",
    "torch.autograd.set_detect_anomaly", "torch.random.manual_seed", "torch.random.set_rng_state",
})
# torch functions that change the loading process's global state (torch.set_default_dtype, set_num_threads...)
TORCH_STATE_PREFIXES = ("set_", "_set_")
SAFE_PATHS = frozenset(f"pathlib.{n}" for n in PATH_CLASSES)  # in a dangerous module, but only build paths
# What ``torch.save(torch.compile(model))`` pickles around the model: dynamo's wrapper and its callback objects,
# plus ``getattr`` on one of them (a bound method). torch runs its own dynamo machinery when it loads them, so they
# are *unknown*, not safe; but they are not an attacker's gadget, so reading them is allowed: the model's tensors
# come out (``--model-only``, ``--arch``, ``--plain``, safetensors), and a pickle output needs --allow-global.
COMPILE_RECORDS = frozenset({
    "torch._dynamo.eval_frame.OptimizedModule", "torch._dynamo.eval_frame.OptimizeContext",
    "torch._dynamo.convert_frame.CatchErrorsWrapper", "torch._dynamo.convert_frame.ConvertFrame",
    "torch._dynamo.convert_frame.ConvertFrameAssert", "torch._dynamo.convert_frame.ConvertFrameBox",
    "torch._dynamo.repro.after_dynamo.WrapBackendDebug", "torch._dynamo.hooks.Hooks",
    "torch._TorchCompileInductorWrapper", "contextlib.nullcontext",
})
# Module names that, met anywhere in a dotted path, mean the path walks into a dangerous module
# (``argparse._os.system``: the C unpickler resolves attributes one by one).
_DANGEROUS_COMPONENTS = frozenset(m for m in DANGEROUS_MODULES if "." not in m) | {"os", "sys", "subprocess"}

R, I, C, F = Role.REFERENCED, Role.INSTANTIATED, Role.CALLED, Role.REBUILD
_PLAIN = ("set", "frozenset", "complex", "bytearray", "bool", "int", "float", "str", "tuple", "list", "dict", "bytes")
# What ckconv's own unpickler reproduces (builders that check their arguments and never call the named object), in
# the roles it reproduces them: the read side of "safe", for pickles only (a safetensors ``$object`` record of these
# names is not checked by a builder, so there they count like any other name). Lowercase ``torch.<name>`` globals
# are here by exact name (dtypes, storages, layouts, Size, device) or nowhere.
IMPLEMENTED = {
    "collections.OrderedDict": C | R | F, "_codecs.encode": C, "copyreg._reconstructor": C,
    **{f"{m}.{n}": C | R | F for m in ("builtins", "__builtin__") for n in _PLAIN},
    "builtins.object": R | F, "__builtin__.object": R | F,
    **{f"torch._utils.{n}": C | F for n in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                             "_rebuild_parameter", "_rebuild_parameter_with_state")},
    "torch._tensor._rebuild_from_type_v2": C, "torch.nn.parameter.Parameter": R | I,
    "torch.storage.UntypedStorage": R, "torch.storage._UntypedStorage": R, "torch.Size": C | R, "torch.device": C | R,
    **{f"torch.{n}": R for n in (*dtypes.DTYPES, *dtypes.ALIASES, *dtypes.QUANTIZED)},
    **{f"{m}.{n}": R for m in ("torch", "torch.cuda") for n in dtypes.STORAGE_TO_DTYPE},
    **{f"torch.{n}": R for n in ("strided", "sparse_coo", "sparse_csr", "_mkldnn")},
    # quantized and sparse tensors (ckconv.tensor_kinds): their rebuilds, typed storages, qschemes and layouts
    **{f"torch._utils.{n}": C | F for n in ("_rebuild_qtensor", "_rebuild_sparse_tensor")},
    "torch.serialization._get_layout": C, **{f"torch.{n}": R for n in dtypes.QUANTIZED_STORAGES},
    **{f"torch.{n}": R for n in QSCHEMES},
}
# Exact names inside a dangerous module that ckconv's unpickler answers itself in the roles above (a layout by name:
# ``torch.save`` pickles ``torch.sparse_coo`` as ``_get_layout('torch.sparse_coo')``).
IMPLEMENTED_DATA = frozenset({"torch.serialization._get_layout"})
# builtins that run nothing when called (anything else in builtins is dangerous)
BENIGN_BUILTINS = frozenset(_PLAIN) | {"object", "range", "slice"}

# Called by REDUCE with arguments from the file (the allowlist's "called" role): loading what ckconv writes must
# cost what its bytes say, so nothing allowed expands a small argument (``builtins.bytes(10**10)``,
# ``deque(range(10**12))``, ``Fraction('1e99999999')``), and :func:`call_args_problem` checks the arguments.
# Records that may be passed *as an argument* to a call (one level deep): anything else could be a lazy iterable
# or an object whose methods the callee runs.
CALL_INSTANCE_ARGS = {
    "numpy.core.multiarray.scalar": ("numpy.dtype",), "numpy._core.multiarray.scalar": ("numpy.dtype",),
    "numpy.random._pickle.__generator_ctor": ("numpy.random.",), "datetime.datetime": ("datetime.timezone",),
    "datetime.time": ("datetime.timezone",), "datetime.timezone": ("datetime.timedelta",),
}
MAX_CALL_INT = (1 << 32) - 1  # integers passed to a call (deque maxlen, timedelta days...): no allocation by argument


def call_args_problem(full, args):
    """Why ckconv will not write the call ``full(*args)``, or None (see the "called" role)."""
    allowed = CALL_INSTANCE_ARGS.get(full, ())
    items = list(args)
    for a in args:
        if type(a) in (list, tuple):
            items.extend(a)
    for a in items:
        if isinstance(a, Foreign) and not a.class_name.startswith(allowed or ("\0",)):
            return f"passes a {a.class_name} record to {full}"
        if type(a) is int and abs(a) >= MAX_CALL_INT:
            return f"passes {a.bit_length()}-bit integer to {full}"
    if full.endswith("multiarray._reconstruct") and (len(args) != 3 or args[1] != (0,)):
        return f"{full} with arguments numpy never writes"
    if full == "_codecs.encode" and not (len(args) == 2 and type(args[0]) is str
                                        and args[1] in ("latin1", "latin-1", "utf-8", "utf8")):
        return f"{full} with a codec pickle never uses"  # a codec name imports an encodings module
    if full == "numpy.dtype" and not (args and type(args[0]) is str and len(args[0]) <= 12):
        return f"{full} with arguments numpy never writes"
    if full in SAFE_PATHS and not all(type(a) is str and len(a) <= 4096 for a in args):
        return f"{full} with arguments other than the path's parts"
    return None


def valid_name(module, qualname) -> bool:
    """Whether ``module``/``qualname`` are dotted Python identifiers (nothing else may reach a GLOBAL opcode)."""
    if type(module) is not str or type(qualname) is not str or len(module) + len(qualname) > 500:
        return False
    return all(part.isidentifier() for part in module.split(".")) and all(
        part.isidentifier() for part in qualname.split("."))


def dotted(module, qualname) -> str:
    """``module.qualname`` for messages, with anything unprintable escaped (names come from untrusted files)."""
    text = f"{module}.{qualname}"
    return text if text.isprintable() and len(text) <= 200 else ascii(text[:200])


def is_dangerous(module, qualname) -> bool:
    if not valid_name(module, qualname):
        return True  # a name with newlines or spaces is an opcode injection, not a name
    full = f"{module}.{qualname}"
    if full in DANGEROUS_NAMES:
        return True
    if full in COMPILE_RECORDS or full in SAFE_PATHS or full in IMPLEMENTED_DATA:
        return False
    if module in ("builtins", "__builtin__", "__builtins__"):
        return qualname not in BENIGN_BUILTINS
    if module == "torch" and qualname.startswith(TORCH_STATE_PREFIXES):
        return True
    parts = full.split(".")
    if any(".".join(parts[:i]) in DANGEROUS_MODULES for i in range(1, len(parts) + 1)):
        return True
    # an attribute path through a module: argparse._os.system, numpy.testing._private.utils.runstring
    return any(p.lstrip("_") in _DANGEROUS_COMPONENTS for p in qualname.split(".")[:-1]) or (
        "." in qualname and qualname.split(".")[-1] in ("system", "popen", "exec", "eval", "execv", "spawn"))


def _matches(module, qualname, patterns) -> bool:
    """Whether a name is one of the user's ``patterns``: an exact dotted name, or ``prefix.*``, which covers the
    names defined at the top of modules under the prefix and nothing else: a dotted qualname walks attributes
    (``torch.nn.modules.module.torch._logging...`` reaches any module torch imports), so patterns never match one."""
    full = f"{module}.{qualname}"
    for pat in patterns:
        if pat == full:
            return True
        if pat.endswith(".*") and "." not in qualname and (module + ".").startswith(pat[:-1]):
            return True
    return False


def allowed_roles(module, qualname, pickled=False) -> Role:
    """The roles ckconv knows ``module.qualname`` to be benign in: the exact allowlist's, plus (``pickled``) the
    roles ckconv's unpickler reproduces itself (:data:`IMPLEMENTED`); a public attribute of an allowed class
    (mmengine's ``HistoryBuffer.min``, pickled as ``getattr(HistoryBuffer, 'min')``) may be referenced."""
    full = f"{module}.{qualname}"
    roles = roles_of(full)
    if pickled:
        roles |= IMPLEMENTED.get(full, Role(0))
    if not roles:
        parent, _, attr = qualname.rpartition(".")
        if parent and "." not in parent and not attr.startswith("_") and roles_of(f"{module}.{parent}"):
            roles = R
    return roles | R if roles else roles  # whatever may be used in some role may be referenced


def verdict(module, qualname, allow=(), pickled=True, roles=R) -> Verdict:
    """safe / unknown / dangerous for one global used in ``roles``, as ``torch.load(weights_only=False)`` would meet
    it. ``pickled``: the name comes from pickle opcodes ckconv's unpickler answered (its builders check arguments).
    Safe only when every role the file gives the name is one ckconv knows it in."""
    if is_dangerous(module, qualname):
        return Verdict.DANGEROUS
    if _matches(module, qualname, allow):
        return Verdict.SAFE
    known = allowed_roles(module, qualname, pickled)
    return Verdict.SAFE if known and (roles | R) in known else Verdict.UNKNOWN


def classify(names, allow=(), pickled=True) -> dict:
    """{verdict: [dotted names]} for ``names``, an iterable of (module, qualname) or (module, qualname, Role), in
    first-seen order; a name without a role counts as referenced."""
    out: dict = {v: [] for v in FINDINGS}
    for item in names:
        module, qualname = item[0], item[1]
        roles = item[2] if len(item) > 2 else R
        text = dotted(module, qualname)
        bucket = out[verdict(module, qualname, allow, pickled, roles)]
        if text not in bucket:
            bucket.append(text)
    for v in (Verdict.SAFE, Verdict.UNKNOWN):  # a name used two ways is judged by its worst use
        out[v] = [n for n in out[v] if not any(n in out[w] for w in FINDINGS if w > v)]
    return out


def check_patterns(patterns) -> tuple:
    """Validate ``--allow-global`` values: a whole dotted path (``mmengine.logging.HistoryBuffer``) or a
    ``prefix.*`` pattern (``mmengine.*``). Returns them as a tuple."""
    out = []
    for pat in patterns or ():
        base = pat[:-2] if isinstance(pat, str) and pat.endswith(".*") else pat
        if not isinstance(base, str) or not base or not all(p.isidentifier() for p in base.split(".")):
            raise UsageError(f"invalid --allow-global {pat!r}: give a dotted name (mmengine.config.ConfigDict) or "
                             "a prefix pattern (mmengine.*)")
        out.append(pat)
    return tuple(out)


# --- writing ----------------------------------------------------------------------------------------------------

ROLE_NAMES = {"call": C, "class": I, "arg": F, "ref": R}


def may_write(module, qualname, role, allow=()) -> bool:
    """Whether ckconv may write ``module.qualname`` into a pickle in ``role`` (a :class:`Role`, or "call",
    "class", "arg", "ref"): allowed in that role by the exact allowlist, or by the user's allowance. The names
    ckconv's own builders reproduce are never written from a record (the writer emits tensors, sizes and dtypes from
    its own values), so :data:`IMPLEMENTED` does not count here. Dangerous and invalid names are never allowed,
    whatever the user says."""
    if not valid_name(module, qualname) or is_dangerous(module, qualname):
        return False
    if _matches(module, qualname, allow):
        return True
    role = ROLE_NAMES.get(role, role)
    known = allowed_roles(module, qualname)
    return bool(known) and role in known


RNN_CLASSES = frozenset(f"torch.nn.modules.rnn.{n}" for n in ("RNNBase", "RNN", "LSTM", "GRU"))


def state_problem(full, state):
    """Why ckconv will not write ``state`` as the BUILD state of an allowlisted class, or None. torch's own
    ``__setstate__`` is trusted with what torch writes: an RNN whose ``_all_weights`` are not names makes
    ``RNNBase.__setstate__`` loop ``num_layers`` times (a 300-byte file, an endless load)."""
    if full in RNN_CLASSES and isinstance(state, dict):
        names = state.get("_all_weights")
        layers = state.get("num_layers", 1)
        if not (isinstance(names, list) and names and all(isinstance(w, list) and w and all(type(n) is str for n in w)
                                                          for w in names)) or not (type(layers) is int and
                                                                                   0 <= layers <= len(names)):
            return f"{full} state that torch never writes (_all_weights must name its {layers!r:.20} layers)"
    return None


def refuse_records(problems, where="") -> UnsafeCheckpoint:
    shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
    return UnsafeCheckpoint(
        f"refusing to write {where or 'a pickle'}: {shown}; loading such a record makes torch do work the file's "
        "size does not bound, so ckconv does not carry it into a pickle (write safetensors or --model-only, or "
        "--allow-global the class by name if you trust the file)")


def allowed_by_user(module, qualname, allow) -> bool:
    return valid_name(module, qualname) and not is_dangerous(module, qualname) and _matches(module, qualname, allow)


def refuse_write(names, where="") -> UnsafeCheckpoint:
    first = names[0] if names else "x"
    pattern = first.rsplit(".", 1)[0] + ".*" if "." in first else first
    return UnsafeCheckpoint(
        f"refusing to write {where or 'a pickle'}: it {unknown_globals(names)}; if you trust them pass "
        f"--allow-global {first!r} "
        f"(or {pattern!r}), or write safetensors or --model-only instead", globals_=list(names))
