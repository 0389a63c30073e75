"""Static checks: refuse cheating or dangerous candidates before anything runs.

A candidate must compute attention *in a kernel*. It may use ``torch`` only to allocate scratch
(``empty``/``zeros``/``full`` and their ``_like`` forms), read shapes/strides/dtypes and query the
device; ``triton`` / ``triton.language`` for the kernel; ``math`` for constants. Everything else
is refused with a readable reason, because each of these has been seen in LLM-written "kernels"
(KernelBench's adversarial suite, and our own logs):

* torch compute ops on the inputs (``F.scaled_dot_product_attention``, ``torch.matmul``,
  ``softmax``, ``einsum``, ``flex_attention``, the ``@`` operator, tensor methods like
  ``.softmax()``) — returns the reference instead of a kernel;
* ``try``/``except`` — a silent fallback when the kernel fails;
* side streams, threads, processes (``torch.cuda.Stream``, ``threading``, ``multiprocessing``,
  ``subprocess``, ``concurrent``) — work the timer never sees;
* ``exec``/``eval``/``compile``/``__import__``/``importlib`` and dunder introspection — any of
  the above, hidden;
* file/OS/network access (``open``, ``os``, ``sys``, ``socket``, ``pathlib``, ``shutil``,
  ``ctypes``);
* hidden state: module-level mutable containers that are empty, built by a call, or mutated
  anywhere (result caches), ``global``/``nonlocal``, mutable default arguments, attributes set on
  module-level objects, ``functools.cache``/``lru_cache``;
* ``data_ptr()`` / ``id()`` — output caches keyed by the input's address.

One exemption: the library's own composed candidates (:mod:`torch_r1attn.search.compose`, e.g.
prefix-LM as cuDNN's causal kernel plus the prefix square), recognised only when the source is
that module's output verbatim. Python (Triton) sources are checked on their AST; CUDA sources by tokens after comments and
string literals are stripped. The dynamic checks (:mod:`.check`) back all of this up: a
candidate that slips past here still has to produce the right bits, deterministically, without
touching its inputs.
"""

from __future__ import annotations

import ast
import re

from ..search.compose import is_composed_source

ALLOWED_IMPORTS = ("torch", "triton", "math", "typing", "__future__")
# Submodules of triton that kernels legitimately use (language, libdevice, TMA descriptors).
_ALLOWED_TRITON_PREFIXES = ("triton", "triton.language", "triton.tools", "triton.runtime")

ALLOWED_TORCH = frozenset({
    # scratch allocation
    "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "full", "full_like",
    # dtypes and type objects
    "float16", "bfloat16", "float32", "float64", "float", "half", "double", "int8", "int16", "int32",
    "int64", "uint8", "bool", "long", "int", "float8_e4m3fn", "float8_e5m2", "dtype", "device",
    "Size", "Tensor", "is_tensor", "finfo", "iinfo",
    # device queries (current_stream: a CUDA launcher needs the current stream's handle)
    "cuda.current_device", "cuda.device", "cuda.get_device_capability", "cuda.get_device_properties",
    "cuda.is_available", "cuda.device_count", "cuda.current_stream",
})

_BANNED_MODULES = {
    "os": "OS access", "sys": "interpreter access", "socket": "network access",
    "pathlib": "file access", "shutil": "file access", "ctypes": "raw memory access",
    "subprocess": "processes", "multiprocessing": "processes", "threading": "threads",
    "concurrent": "threads/processes", "importlib": "dynamic import", "functools": "result caching",
    "io": "file access", "tempfile": "file access", "pickle": "code loading", "builtins": "builtins",
    "signal": "process control", "time": "timing tricks", "random": "nondeterminism",
    "numpy": "host compute", "asyncio": "concurrency", "inspect": "introspection",
}
_BANNED_BUILTINS = {
    "exec": "exec", "eval": "eval", "compile": "compile", "__import__": "__import__",
    "open": "file access", "globals": "introspection", "locals": "introspection", "vars": "introspection",
    "breakpoint": "debugger", "input": "stdin", "exit": "process control", "quit": "process control",
    "id": "object-address keyed tricks (id())", "memoryview": "raw memory access",
}
# Tensor methods that compute (the reference, in disguise) or write outside a kernel.
_COMPUTE_METHODS = frozenset({
    "softmax", "log_softmax", "matmul", "bmm", "mm", "einsum", "baddbmm", "addmm", "addbmm", "mv",
    "exp", "exp2", "log", "sum", "amax", "logsumexp", "mean", "masked_fill", "masked_fill_",
    "copy_", "zero_", "fill_", "add_", "mul_", "div_", "sub_", "clamp_", "index_put_", "scatter_",
    "scaled_dot_product_attention", "flex_attention", "where", "cumsum", "tril", "triu",
    "__matmul__", "__rmatmul__", "set_", "resize_", "cpu", "numpy", "record_stream",
})
_MUTATING_CONTAINER_METHODS = frozenset({
    "append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear", "add", "remove",
    "discard", "__setitem__",
})
_CACHE_DECORATORS = frozenset({"cache", "lru_cache", "cached_property"})
_DUNDER_OK = frozenset({"__name__", "__init__", "__doc__"})


def check_source(source: str, language: str = "triton") -> list[str]:
    """Reasons to refuse ``source`` without running it; an empty list means it may run.

    Raises:
        TypeError: ``source`` is not a string.
        ValueError: ``language`` is not ``"triton"`` or ``"cuda"``.
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    if language == "triton":
        if is_composed_source(source):
            return []  # the library's own SDPA composition, verbatim (see search.compose)
        return _check_python(source)
    if language == "cuda":
        return _check_cuda(source)
    raise ValueError(f"unknown kernel language {language!r} (expected 'triton' or 'cuda')")


# ----------------------------------------------------------------------------------- Python
class _Checker(ast.NodeVisitor):
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.torch_names: dict[str, str] = {}  # names bound to torch (or a submodule) -> module path
        self.triton_names: set[str] = set()  # names bound to triton or its submodules/members
        self.module_containers: dict[str, int] = {}  # module-level list/dict/set names -> line
        self.module_defs: set[str] = set()  # module-level functions/classes
        self.jit_depth = 0

    def bad(self, node: ast.AST, why: str) -> None:
        line = getattr(node, "lineno", "?")
        msg = f"line {line}: {why}"
        if msg not in self.reasons:
            self.reasons.append(msg)

    # ---- imports
    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self._check_module(node, a.name)
            bound = a.asname or a.name.split(".")[0]
            if a.name.split(".")[0] == "torch":
                if a.name != "torch":
                    self.bad(node, f"import of {a.name}: only the torch module itself may be imported "
                                   "(for scratch allocation), not its compute submodules")
                self.torch_names[bound] = a.name if a.asname else "torch"
            elif a.name.split(".")[0] == "triton":
                self.triton_names.add(bound)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        mod = node.module or ""
        if node.level:
            self.bad(node, "relative import (candidates are standalone files)")
            return
        self._check_module(node, mod)
        for a in node.names:
            bound = a.asname or a.name
            if a.name == "*":
                self.bad(node, f"star import from {mod} (say what you use)")
            elif mod.split(".")[0] == "triton":
                self.triton_names.add(bound)
            elif mod == "torch":
                if a.name not in ALLOWED_TORCH:
                    self.bad(node, f"from torch import {a.name}: {_torch_why(a.name)}")
            elif mod.split(".")[0] == "torch":
                self.bad(node, f"import from {mod}: only the torch module itself may be imported")

    def _check_module(self, node: ast.AST, name: str) -> None:
        top = name.split(".")[0]
        if top in _BANNED_MODULES:
            self.bad(node, f"import of {name} ({_BANNED_MODULES[top]} is not allowed in a kernel)")
        elif top not in ALLOWED_IMPORTS:
            self.bad(node, f"import of {name}: allowed imports are {', '.join(ALLOWED_IMPORTS[:3])}")
        elif top == "triton" and not name.startswith(_ALLOWED_TRITON_PREFIXES):
            self.bad(node, f"import of {name} (not a kernel-language module)")

    # ---- statements
    def visit_Try(self, node: ast.AST) -> None:
        self.bad(node, "try/except: a candidate may not hide kernel failures behind a fallback")
        self.generic_visit(node)

    visit_TryStar = visit_Try

    def visit_Global(self, node: ast.Global) -> None:
        self.bad(node, f"global statement ({', '.join(node.names)}): hidden state across calls")

    def visit_Nonlocal(self, node: ast.Nonlocal) -> None:
        self.bad(node, f"nonlocal statement ({', '.join(node.names)}): hidden state across calls")

    def _visit_func(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if isinstance(node, ast.AsyncFunctionDef):
            self.bad(node, f"async function {node.name}: concurrency is not allowed")
        is_jit = False
        for d in node.decorator_list:
            target = d.func if isinstance(d, ast.Call) else d
            name = _dotted(target)
            last = name.split(".")[-1] if name else ""
            if last in _CACHE_DECORATORS:
                self.bad(d, f"@{name} on {node.name}: cached results (every call must run the kernel)")
            if name and name.split(".")[0] in self.triton_names:
                is_jit = True
        for dflt in list(node.args.defaults) + [x for x in node.args.kw_defaults if x is not None]:
            if isinstance(dflt, (ast.List, ast.Dict, ast.Set, ast.ListComp, ast.DictComp, ast.SetComp)) or (
                isinstance(dflt, ast.Call) and _dotted(dflt.func) in ("list", "dict", "set")
            ):
                self.bad(dflt, f"mutable default argument in {node.name}: hidden state across calls")
        self.jit_depth += is_jit
        self.generic_visit(node)
        self.jit_depth -= is_jit

    visit_FunctionDef = _visit_func
    visit_AsyncFunctionDef = _visit_func

    def visit_Lambda(self, node: ast.Lambda) -> None:
        for dflt in node.args.defaults:
            if isinstance(dflt, (ast.List, ast.Dict, ast.Set)):
                self.bad(dflt, "mutable default argument in lambda: hidden state across calls")
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        for t in node.targets:
            self._check_target(t)
        self.generic_visit(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> None:
        self._check_target(node.target)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        self._check_target(node.target)
        self.generic_visit(node)

    def _check_target(self, t: ast.AST) -> None:
        if isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                self._check_target(e)
            return
        root = t
        while isinstance(root, (ast.Attribute, ast.Subscript)):
            root = root.value
        if not isinstance(root, ast.Name) or root is t:
            return
        if root.id in self.module_containers:
            self.bad(t, f"writes into module-level container {root.id}: a cache across calls")
        elif isinstance(t, ast.Attribute) and (root.id in self.module_defs or root.id in self.torch_names
                                               or root.id in self.triton_names):
            self.bad(t, f"sets an attribute on module-level object {root.id}: hidden state across calls")

    # ---- expressions
    def visit_BinOp(self, node: ast.BinOp) -> None:
        if isinstance(node.op, ast.MatMult) and not self.jit_depth:
            self.bad(node, "the @ operator on tensors outside a kernel (a torch matmul, not a kernel)")
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if node.id in _BANNED_BUILTINS:
            self.bad(node, f"{node.id}: {_BANNED_BUILTINS[node.id]} is not allowed in a kernel")
        elif node.id in _BANNED_MODULES and node.id not in self.torch_names:
            self.bad(node, f"{node.id}: {_BANNED_MODULES[node.id]} is not allowed in a kernel")
        elif node.id == "__builtins__":
            self.bad(node, "__builtins__ access")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        attr = node.attr
        if attr.startswith("__") and attr.endswith("__") and attr not in _DUNDER_OK:
            self.bad(node, f"dunder attribute {attr} (introspection can reach anything)")
        if attr == "data_ptr":
            self.bad(node, "data_ptr(): Triton launches take tensors; address-keyed tricks are not allowed")
        dotted = _dotted(node)
        if dotted:
            root, _, rest = dotted.partition(".")
            if root in self.torch_names:
                full = f"{self.torch_names[root]}.{rest}"[len("torch."):]
                if full not in ALLOWED_TORCH:
                    self.bad(node, f"torch.{full}: {_torch_why(full)}")
                return  # do not re-report the inner prefixes of this chain
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        f = node.func
        if isinstance(f, ast.Attribute):
            root = f.value
            while isinstance(root, (ast.Attribute, ast.Subscript, ast.Call)):
                root = root.func if isinstance(root, ast.Call) else root.value
            rname = root.id if isinstance(root, ast.Name) else None
            if rname not in self.triton_names and rname not in self.torch_names:
                if f.attr in _COMPUTE_METHODS and not self.jit_depth:
                    self.bad(node, f".{f.attr}() outside a kernel: compute attention in the kernel, "
                                   "and write only through it")
                if rname in self.module_containers and f.attr in _MUTATING_CONTAINER_METHODS:
                    self.bad(node, f"{rname}.{f.attr}(): mutates module-level container {rname} (a cache)")
        elif isinstance(f, ast.Name) and f.id in ("getattr", "setattr", "delattr"):
            args = node.args
            first = args[0] if args else None
            if f.id != "getattr":
                self.bad(node, f"{f.id}(): dynamic attribute writes are not allowed")
            elif first is not None and isinstance(first, ast.Name) and first.id in self.torch_names:
                self.bad(node, "getattr(torch, ...): dynamic access to torch ops")
            elif len(args) < 2 or not isinstance(args[1], ast.Constant):
                if not (first is not None and isinstance(first, ast.Name) and first.id in self.triton_names):
                    self.bad(node, "getattr() with a computed name: dynamic access is not allowed")
        self.generic_visit(node)


def _torch_why(rest: str) -> str:
    top = rest.split(".")[0]
    if rest in ("cuda.Stream", "cuda.stream", "cuda.set_stream", "cuda.StreamContext", "Stream", "cuda.Event",
                "cuda.ExternalStream"):
        return "side streams/events are not allowed (work the timer and the caller's stream never see)"
    if top in ("nn", "_C", "ops", "library", "compile", "_dynamo", "_inductor", "func", "fx", "jit"):
        return f"torch.{top} compute is not allowed: compute attention in the kernel"
    if rest in ("cuda.synchronize", "cuda.graph", "cuda.CUDAGraph"):
        return "synchronization/graph tricks are not allowed in a kernel"
    return ("not an allowed torch API: candidates may use torch only for scratch allocation "
            "(empty/zeros/full[_like]), dtypes and device queries — compute ops must be in the kernel")


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _is_mutable_value(v: ast.AST | None) -> tuple[bool, bool]:
    """(is a container, is suspicious: empty / built by a call / comprehension)."""
    if v is None:
        return False, False
    if isinstance(v, (ast.ListComp, ast.DictComp, ast.SetComp)):
        return True, True
    if isinstance(v, ast.Call) and _dotted(v.func) in ("list", "dict", "set", "bytearray", "collections.defaultdict",
                                                       "collections.OrderedDict", "defaultdict", "OrderedDict"):
        return True, True
    if isinstance(v, ast.Dict):
        return True, not v.keys
    if isinstance(v, (ast.List, ast.Set)):
        return True, not v.elts
    return False, False


def _check_python(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return [f"line {e.lineno}: syntax error: {e.msg}"]
    c = _Checker()
    # Module-level pass first: which names are imports, definitions, and mutable containers.
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            c.module_defs.add(node.name)
        targets, value = [], None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        is_container, suspicious = _is_mutable_value(value)
        for t in targets:
            if isinstance(t, ast.Name) and is_container:
                if suspicious:
                    c.bad(node, f"module-level mutable container {t.id} (empty or computed): "
                                "result caches across calls are not allowed")
                c.module_containers[t.id] = node.lineno
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top == "torch":
                    c.torch_names[a.asname or top] = a.name if a.asname else "torch"
                elif top == "triton":
                    c.triton_names.add(a.asname or top)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "triton":
            c.triton_names.update(a.asname or a.name for a in node.names)
    # Module-level assignment of a literal table is fine; the visitor flags writes into it.
    saved = dict(c.module_containers)
    c.module_containers = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            c.visit(node.value)
            c.module_containers = saved
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if not isinstance(t, ast.Name):
                    c._check_target(t)
            c.module_containers = {}
            continue
        c.module_containers = saved
        c.visit(node)
    c.module_containers = saved
    return c.reasons


# ------------------------------------------------------------------------------------- CUDA
_CUDA_BANNED = [
    (r"\btry\b|\bcatch\s*\(", "try/catch: a candidate may not hide kernel failures behind a fallback"),
    (r"\b(?:torch|at)::(?:matmul|bmm|mm|einsum|softmax|log_softmax|baddbmm|addmm|scaled_dot_product_attention|"
     r"_scaled_dot_product\w*|_flash_attention\w*|_efficient_attention\w*|exp|sum|where|masked_fill)\b",
     "calls a torch/ATen compute op instead of a kernel"),
    (r"\.\s*(?:matmul|bmm|softmax|einsum|masked_fill|exp|sum)\s*\(", "calls a tensor compute method instead of a kernel"),
    (r"\bscaled_dot_product_attention\b|\bflex_attention\b", "calls PyTorch attention instead of a kernel"),
    (r"\bcublas\w*|\bcudnn\w*|\bcutlass::gemm::device\b", "calls a library GEMM/attention instead of a kernel"),
    (r"\bcudaStreamCreate\w*|\bgetStreamFromPool\b|\bcudaStreamFork\b|\bcuStreamCreate\b",
     "creates a side stream (work the timer and the caller's stream never see)"),
    (r"std::thread\b|\bpthread_\w+|std::async\b|\bfork\s*\(|#\s*include\s*<thread>|\bomp\b",
     "threads/processes are not allowed"),
    (r"\b(?:system|popen|execv\w*|execl\w*|dlopen|dlsym)\s*\(", "process/dynamic-loading access is not allowed"),
    (r"\b(?:fopen|freopen|open|ofstream|ifstream|fstream)\s*\(|#\s*include\s*<fstream>", "file access is not allowed"),
    (r"\bsocket\s*\(|#\s*include\s*<sys/socket\.h>", "network access is not allowed"),
    (r"\bstatic\s+(?:std::)?(?:unordered_map|map|vector|set|unordered_set)\b|\bstatic\s+(?:torch::|at::)?Tensor\b",
     "static mutable container: result caches across calls are not allowed"),
    (r"\bdata_ptr\b\s*\(\s*\)\s*(?:==|!=)|\bstd::(?:unordered_)?map\s*<\s*(?:void\s*\*|uintptr_t|int64_t)",
     "address-keyed tricks are not allowed"),
]


def _strip_c_comments_and_strings(src: str) -> str:
    out, i, n = [], 0, len(src)
    while i < n:
        ch = src[i]
        if src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            out.append(" ")
            i = n if j < 0 else j + 2
        elif ch in "\"'":
            j = i + 1
            while j < n and src[j] != ch:
                j += 2 if src[j] == "\\" else 1
            out.append(ch + ch)
            i = j + 1
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _check_cuda(source: str) -> list[str]:
    code = _strip_c_comments_and_strings(source)
    reasons = []
    for pat, why in _CUDA_BANNED:
        m = re.search(pat, code)
        if m:
            line = code.count("\n", 0, m.start()) + 1
            reasons.append(f"line {line}: {m.group(0).strip()!s}: {why}")
    return reasons
