"""Which globals a pickle may name: three verdicts for reading, one allowlist for writing.

Reading never calls anything a file names (the unpickler answers every global with a builder of ckconv's own or an
inert record), so reading needs no allowlist: it needs *verdicts* that tell the user what ``torch.load(...,
weights_only=False)`` would do with the same file:

* **safe** -- ckconv implements the global itself (tensor rebuilds, containers) or it is on the writing allowlist
  below: known to be benign when called the way pickle calls it;
* **dangerous** -- known to run commands, import code or touch files (``os.system``, ``builtins.eval``, ``runpy``,
  and the gadgets red teams found: ``pydoc.pipepager``, ``logging.config.dictConfig``...), or a name that is not a
  name (newlines, spaces: opcode injection) or a dotted path that walks through a dangerous module
  (``argparse._os.system``);
* **unknown** -- everything else: ckconv does not call it, but torch would.

Writing is where a deny-list cannot win: what ckconv *writes* as a global in a pickle must be on :data:`CALLS`
(called by REDUCE with the recorded arguments) or :data:`CLASSES` (instantiated without ``__init__`` by NEWOBJ or
``copyreg._reconstructor``, then given its state by BUILD; also written as a plain reference), or allowed by the
user as a whole dotted path or a ``prefix.*`` pattern (``--allow-global``, ``allow_globals=``). Every name is
validated as dotted Python identifiers before anything is written, so a name can never inject opcodes.
"""

from __future__ import annotations

from ..errors import UnsafeCheckpoint, UsageError
from .verdicts import Verdict, worst

SAFE, UNKNOWN, DANGEROUS = Verdict.SAFE, Verdict.UNKNOWN, Verdict.DANGEROUS

DANGEROUS_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "sys", "runpy", "importlib", "pickle", "_pickle", "marshal", "shutil",
    "socket", "ctypes", "code", "codeop", "pty", "webbrowser", "types", "pdb", "bdb", "timeit", "commands",
    "platform", "multiprocessing", "asyncio", "threading", "_thread", "signal", "tempfile", "glob", "pathlib",
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
    "torch.storage._load_from_bytes",
})
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

# What ckconv's own unpickler answers with builders that check their arguments (never calling the named object):
# the read side of "safe", for pickles only (a safetensors ``$object`` record of these names is not checked by a
# builder, so there they count like any other name).
READ_IMPLEMENTED = frozenset({
    "collections.OrderedDict", "_codecs.encode", "copyreg._reconstructor",
    *(f"{m}.{n}" for m in ("builtins", "__builtin__") for n in (
        "set", "frozenset", "complex", "bytearray", "bool", "int", "float", "str", "tuple", "list", "dict", "bytes",
        "object")),
    "torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
    "torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
    "torch._tensor._rebuild_from_type_v2", "torch.nn.parameter.Parameter", "torch.storage.UntypedStorage",
    "torch.storage._UntypedStorage", "torch.Size", "torch.device",
})
BENIGN_BUILTINS = frozenset(n.split(".", 1)[1] for n in READ_IMPLEMENTED if n.startswith("builtins.")) | {
    "range", "slice"}  # builtins that run nothing when called (anything else in builtins is dangerous)

# Called by REDUCE with arguments from the file: constructors of plain data, and numpy's own reconstruction helpers
# (which build arrays, scalars and random states from bytes and never import or run anything else). Loading what
# ckconv writes must cost what its bytes say, so nothing here expands a small argument (``builtins.bytes(10**10)``,
# ``deque(range(10**12))``, ``Fraction('1e99999999')``), and :func:`call_args_problem` checks the arguments.
# builtins are absent: ckconv reads them into native values and writes those with plain opcodes. ckconv's tensor
# rebuilds, ``torch.Size`` and ``copyreg._reconstructor`` are absent too: the writer emits them from its own
# values, never from a record (``_rebuild_from_type_v2(func, ...)`` calls ``func``; ``_reconstructor`` its base).
CALLS = frozenset({
    "collections.OrderedDict", "collections.defaultdict", "collections.Counter", "collections.deque",
    "_codecs.encode", "argparse.Namespace",
    "datetime.datetime", "datetime.date", "datetime.time", "datetime.timedelta", "datetime.timezone",
    "decimal.Decimal",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar", "numpy.dtype",
    "numpy.random._pickle.__randomstate_ctor", "numpy.random._pickle.__bit_generator_ctor",
    "numpy.random._pickle.__generator_ctor",
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # an IntEnum looked up by its value (DeepSpeed's optimizer states)
})
# Records that may be passed *as an argument* to a call (one level deep): anything else could be a lazy iterable
# or an object whose methods the callee runs.
CALL_INSTANCE_ARGS = {
    "numpy.core.multiarray.scalar": ("numpy.dtype",), "numpy._core.multiarray.scalar": ("numpy.dtype",),
    "numpy.random._pickle.__generator_ctor": ("numpy.random.",), "datetime.datetime": ("datetime.timezone",),
    "datetime.time": ("datetime.timezone",), "datetime.timezone": ("datetime.timedelta",),
}
MAX_CALL_INT = (1 << 32) - 1  # integers passed to a call (deque maxlen, timedelta days...): no allocation by argument


def call_args_problem(full, args):
    """Why ckconv will not write the call ``full(*args)``, or None (see :data:`CALLS`)."""
    from ..model import Foreign  # here, not at the top: policy sits below the model

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
    return None


# The only references that may appear *inside the arguments* of a call (or as ``_reconstructor``'s base): some
# allowed calls call what they are given (``defaultdict(factory)`` on a missing key, numpy's generator
# constructors call their ``bit_generator_ctor``), so a reference there must be harmless to call with anything.
ARG_REFERENCES = frozenset({
    *(f"builtins.{n}" for n in ("object", "list", "dict", "set", "frozenset", "tuple", "int", "float", "str",
                                "bytes", "bool", "complex", "bytearray")),
    "collections.OrderedDict", "collections.Counter", "collections.deque", "collections.defaultdict",
    "numpy.ndarray", "numpy.dtype", "numpy.random._pickle.__bit_generator_ctor",
})
# Instantiated without running __init__ (NEWOBJ / copyreg._reconstructor), then BUILD calls the class's own
# __setstate__ (torch's, numpy's, the data classes') or fills its __dict__; also written as plain references
# (``_norm_layer = BatchNorm2d``). A pattern ``prefix.*`` matches every name under the prefix. NEWOBJ refuses
# anything that is not a class, so a function under these prefixes is never called.
CLASSES = frozenset({
    "builtins.object", "argparse.Namespace", "collections.OrderedDict", "collections.defaultdict",
    "collections.Counter", "collections.deque", "builtins.set", "builtins.frozenset", "builtins.list",
    "builtins.dict", "builtins.tuple", "builtins.int", "builtins.float", "builtins.str", "builtins.bool",
    "builtins.bytes", "builtins.complex", "builtins.bytearray", "builtins.type", "builtins.NoneType",
    "numpy.ndarray", "numpy.dtype", "numpy.dtypes.*", "numpy.random.mtrand.RandomState",
    "numpy.random._generator.Generator", "numpy.random._mt19937.MT19937", "numpy.random._pcg64.PCG64",
    "numpy.random._pcg64.PCG64DXSM", "numpy.random._philox.Philox", "numpy.random._sfc64.SFC64",
    *(f"numpy.{t}" for t in ("bool_", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                              "float16", "float32", "float64", "longdouble", "complex64", "complex128", "str_",
                              "bytes_", "void", "datetime64", "timedelta64", "generic", "number", "integer",
                              "floating")),
    "torch.nn.modules.*", "torch.nn.parallel.data_parallel.DataParallel",
    "torch.nn.parallel.distributed.DistributedDataParallel", "torch._dynamo.eval_frame.OptimizedModule",
    "torch.nn.parameter.Parameter", "torch.nn.parameter.Buffer", "torchvision.models.*", "torchvision.ops.*",
    "torch.optim.*", "torch.Size", "torch.device",
    "typing.Any", "typing.Dict", "typing.List", "typing.Tuple", "typing.Optional", "typing.Union",
    "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.base.ContainerMetadata",
    "omegaconf.base.Metadata", "omegaconf.nodes.*",
    "lightning.fabric.utilities.data.AttributeDict", "lightning.pytorch.utilities.parsing.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict", "lightning_fabric.utilities.data.AttributeDict",
    "mmengine.logging.history_buffer.HistoryBuffer", "mmengine.config.config.ConfigDict",
    "timm.utils.model_ema.ModelEmaV2", "timm.utils.model_ema.ModelEmaV3",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


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
    if full in COMPILE_RECORDS:
        return False
    if module in ("builtins", "__builtin__", "__builtins__"):
        return qualname not in BENIGN_BUILTINS
    parts = full.split(".")
    if any(".".join(parts[:i]) in DANGEROUS_MODULES for i in range(1, len(parts) + 1)):
        return True
    # an attribute path through a module: argparse._os.system, numpy.testing._private.utils.runstring
    return any(p.lstrip("_") in _DANGEROUS_COMPONENTS for p in qualname.split(".")[:-1]) or (
        "." in qualname and qualname.split(".")[-1] in ("system", "popen", "exec", "eval", "execv", "spawn"))


def _matches(module, qualname, patterns, classes_only=False) -> bool:
    """Whether a name is one of ``patterns``: an exact dotted name, or ``prefix.*``, which covers the names
    defined at the top of modules under the prefix and nothing else: a dotted qualname walks attributes
    (``torch.nn.modules.module.torch._logging...`` reaches any module torch imports), so patterns never match one.
    ``classes_only``: the pattern also needs a class-style name (``Conv2d``, not a re-exported function)."""
    full = f"{module}.{qualname}"
    for pat in patterns:
        if pat == full:
            return True
        if (pat.endswith(".*") and "." not in qualname and (module + ".").startswith(pat[:-1])
                and (not classes_only or qualname[:1].isupper())):
            return True
    return False


def verdict(module, qualname, allow=(), pickled=True) -> Verdict:
    """safe / unknown / dangerous for one global, as ``torch.load(weights_only=False)`` would meet it.
    ``pickled``: the name comes from pickle opcodes ckconv's unpickler answered (its builders check arguments)."""
    if is_dangerous(module, qualname):
        return DANGEROUS
    full = f"{module}.{qualname}"
    if pickled and full in READ_IMPLEMENTED or may_write(module, qualname, "class", allow):
        return SAFE
    if pickled and module == "torch" and (qualname.endswith("Storage") or qualname[:1].islower() and "." not in qualname):
        return SAFE  # torch.FloatStorage, torch.float32 ...: answered by ckconv's own builders
    return UNKNOWN


def classify(names, allow=(), pickled=True) -> dict:
    """{verdict: [dotted names]} for ``names`` (an iterable of (module, qualname)), in first-seen order."""
    out: dict = {SAFE: [], UNKNOWN: [], DANGEROUS: []}
    for module, qualname in names:
        text = dotted(module, qualname)
        bucket = out[verdict(module, qualname, allow, pickled)]
        if text not in bucket:
            bucket.append(text)
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

def may_write(module, qualname, role, allow=()) -> bool:
    """Whether ckconv may write ``module.qualname`` into a pickle as a ``role``:

    * "call": called by REDUCE with recorded arguments -- exact :data:`CALLS` entries or the user's allowance;
    * "class": the class of a NEWOBJ/_reconstructor record (no ``__init__``), or a reference kept in an object's
      state -- :data:`CALLS`, :data:`CLASSES` (patterns for class names only), a public attribute of an exact
      entry (``HistoryBuffer.min``), or the user's allowance;
    * "arg": a reference inside a call's arguments -- :data:`ARG_REFERENCES` or the user's allowance.
    Dangerous names and invalid names are never allowed, whatever the user says."""
    if not valid_name(module, qualname) or is_dangerous(module, qualname):
        return False
    full = f"{module}.{qualname}"
    if _matches(module, qualname, allow):
        return True
    if role == "call":
        return full in CALLS
    if role == "arg":
        return full in ARG_REFERENCES
    if full in CALLS or _matches(module, qualname, CLASSES, classes_only=True):
        return True
    # a public attribute of an exactly-named class, as a reference (mmengine's ``HistoryBuffer.min``): written as
    # getattr(Class, 'min'), which looks the name up and calls nothing
    parent, _, attr = qualname.rpartition(".")
    return (bool(parent) and "." not in parent and not attr.startswith("_")
            and (f"{module}.{parent}" in CLASSES or f"{module}.{parent}" in allow))


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
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    first = names[0] if names else "x"
    pattern = first.rsplit(".", 1)[0] + ".*" if "." in first else first
    return UnsafeCheckpoint(
        f"refusing to write {where or 'a pickle'}: it would name {shown}, which ckconv does not know to be benign "
        f"(torch.load(weights_only=False) would call them); if you trust them pass --allow-global {first!r} "
        f"(or {pattern!r}), or write safetensors or --model-only instead", globals_=list(names))
