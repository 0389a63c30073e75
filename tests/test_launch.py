"""Bound launches (torch_r1attn.launch) on the CPU, against a stand-in for Triton's JITFunction
and CompiledKernel: which launches reuse a compiled kernel, what argument list it gets, and
when the launch must go back through Triton. The real launch path is `test_loader`'s GPU tests
and `benchmarks/launch_probe.py` (outputs equal bit for bit)."""

import types

import pytest
import torch

from torch_r1attn import launch


class _Param:
    def __init__(self, name, constexpr):
        self.name, self.is_constexpr = name, constexpr


class FakeCompiled:
    function = object()

    def __init__(self, key, log):
        self.key, self.log = key, log

    def run(self, *a):  # noqa: D401 - present like Triton's (the launcher calls it)
        raise AssertionError("not called directly")

    def __getitem__(self, grid):
        def runner(*args):
            self.log.append(("bound", grid, args))
        return runner


class FakeJit:
    """fn(Q, O, n, scale, BLOCK: constexpr, FLAG: constexpr = 7): compiles one FakeCompiled per
    distinct argument tuple it sees (more keys than Triton: never fewer)."""

    def __init__(self):
        def fn(Q, O, n, scale, BLOCK, FLAG=7):
            pass
        self.fn = fn
        self.params = [_Param(x, x in ("BLOCK", "FLAG")) for x in ("Q", "O", "n", "scale", "BLOCK", "FLAG")]
        self.pre_run_hooks = []
        self.log, self.compiled = [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            c = FakeCompiled(len(self.compiled), self.log)
            self.compiled.append(c)
            return c
        return run


@pytest.fixture
def bl(monkeypatch):
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setenv("R1ATTN_BOUND_LAUNCH", "1")
    return launch.BoundLauncher(FakeJit())


def _t(n=64, offset=0):
    return torch.empty(n + offset, dtype=torch.float16)[offset:]


def test_second_launch_is_bound_with_every_parameter_in_order(bl):
    q, o = _t(), _t()
    c1 = bl[(4, 2)](q, o, 32, 0.5, BLOCK=64, num_warps=4)
    c2 = bl[(4, 2)](q, o, 48, 0.25, BLOCK=64, num_warps=4)  # 32 and 48: both multiples of 16, not 1
    assert c1 is c2 and bl.jit_launches == 1 and bl.bound_launches == 1
    kind, grid, args = bl.jit.log[-1]
    assert kind == "bound" and grid == (4, 2, 1)
    assert args == (q, o, 48, 0.25, 64, 7)  # the default of FLAG applied, num_warps (an option) left out


@pytest.mark.parametrize("change", ["alignment", "int_is_one", "int_not_mult16", "int64", "constexpr", "dtype",
                                    "device", "option"])
def test_a_change_triton_specialises_on_goes_back_through_triton(bl, monkeypatch, change):
    q, o = _t(), _t()
    bl[(1,)](q, o, 32, 0.5, BLOCK=64, num_warps=4)
    args, kw = [q, o, 32, 0.5], {"BLOCK": 64, "num_warps": 4}
    if change == "alignment":
        args[0] = _t(offset=1)  # 2 bytes off a 16-byte boundary
    elif change == "int_is_one":
        args[2] = 1
    elif change == "int_not_mult16":
        args[2] = 33
    elif change == "int64":
        args[2] = 2**33
    elif change == "constexpr":
        kw["BLOCK"] = 32
    elif change == "dtype":
        args[1] = o.to(torch.float32)
    elif change == "device":
        monkeypatch.setattr(launch, "_current_device", lambda: 1)
    elif change == "option":
        kw["num_warps"] = 8
    bl[(1,)](*args, **kw)
    assert bl.jit_launches == 2 and bl.bound_launches == 0
    bl[(1,)](*args, **kw)  # and that key is bound from now on
    assert bl.bound_launches == 1 and bl.jit.log[-1][0] == "bound"


@pytest.mark.parametrize("why", ["none_arg", "callable_grid", "pre_run_hook", "unknown_keyword", "env_off"])
def test_launches_that_stay_on_triton_s_path(monkeypatch, why):
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setenv("R1ATTN_BOUND_LAUNCH", "1")
    if why == "env_off":
        monkeypatch.setenv("R1ATTN_BOUND_LAUNCH", "0")
    bl = launch.BoundLauncher(FakeJit())
    q, o = _t(), _t()
    args, kw, grid = [q, o, 32, 0.5], {"BLOCK": 64}, (2,)
    if why == "none_arg":
        args[3] = None
    elif why == "callable_grid":
        grid = lambda meta: (2,)  # noqa: E731
    elif why == "pre_run_hook":
        bl.jit.pre_run_hooks.append(lambda *a, **k: None)
    elif why == "unknown_keyword":
        kw["num_consumer_groups"] = 2  # a keyword Triton may know and we do not
    for _ in range(3):
        bl[grid](*args, **kw)
    assert bl.bound_launches == 0 and bl.jit_launches == 3


def test_interpreter_launches_return_nothing_to_bind(bl):
    bl.jit.__class__ = type("InterpretedFake", (FakeJit,), {"__getitem__": lambda self, g: (lambda *a, **k: None)})
    for _ in range(2):
        assert bl[(1,)](_t(), _t(), 32, 0.5, BLOCK=64) is None
    assert bl.bound_launches == 0


def test_grid_is_padded_to_three_dimensions_for_a_compiled_kernel():
    """A CompiledKernel's runner indexes grid[2]; the generated wrappers launch 2-D grids (H200,
    session 7: IndexError before the padding)."""
    assert launch.grid3((4, 2)) == (4, 2, 1) and launch.grid3((3,)) == (3, 1, 1)
    assert launch.grid3((1, 2, 3)) == (1, 2, 3)


@pytest.mark.parametrize("n", [-(2**40), -5, 0, 1, 2, 15, 16, 17, 48, 2**31 - 16, 2**31, 2**33, 2**63 - 1, 2**63, 2**64])
def test_generated_key_equals_the_general_key(bl, n):
    """The generated key function writes _int_code inline: both must give the same key for every
    int class (a mismatch would make every bound launch miss), and the same bound arguments."""
    q, o = _t(), _t()
    bl[(1,)](q, o, 32, 0.5, BLOCK=64, num_warps=4)  # makes the generated function
    for args in ([q, o, n, 0.5], [_t(offset=1), o, n, 0.25]):
        fast_key, fast_bound = bl._fast(tuple(args), {"BLOCK": 64, "num_warps": 4})
        assert fast_key == bl._key(tuple(args), {"BLOCK": 64, "num_warps": 4})
        assert fast_bound == bl._bound_args(tuple(args), {"BLOCK": 64, "num_warps": 4})
    assert bl._fast((q, o, True, 0.5), {"BLOCK": 64, "num_warps": 4}) is None  # another pattern: general path


def _module(src: str) -> dict:
    mod = types.ModuleType("fake_kernel_mod")
    exec(src, mod.__dict__)
    return mod.__dict__


_SRC = """
class _Jit:  # stands for triton.jit objects (their type's module is triton.*)
    def __init__(self, fn):
        self.fn = fn
    def __getitem__(self, grid):
        return lambda *a, **k: None
_Jit.__module__ = "triton.runtime.jit"

def _helper_fn(x):
    return x
_helper = _Jit(_helper_fn)

def _kern_fn(x):
    return _helper(x)
_kern = _Jit(_kern_fn)

def _combine_fn(x):
    return _kern(x)  # a kernel another kernel calls: left alone
_combine = _Jit(_combine_fn)

def forward(x):
    _kern[(1,)](x)
    _combine[(1,)](x)
"""


def test_host_launched_finds_only_what_forward_launches_and_no_kernel_uses():
    g = _module(_SRC)
    assert set(launch.host_launched(g)) == {"_combine"}


@pytest.mark.parametrize("setting,on", [(None, True), ("1", True), ("on", True), ("0", False), ("off", False),
                                        ("false", False)])
def test_install_is_on_by_default_off_by_setting_and_under_the_interpreter(monkeypatch, setting, on):
    # on by default since the H200 measured it 9.3 µs cheaper per call (session 8)
    if setting is None:
        monkeypatch.delenv("R1ATTN_BOUND_LAUNCH", raising=False)
    else:
        monkeypatch.setenv("R1ATTN_BOUND_LAUNCH", setting)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert launch.install(_module(_SRC)) == 0
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = _module(_SRC)
    assert launch.install(g) == int(on) and isinstance(g["_combine"], launch.BoundLauncher) == on


def _bound_counts(kern) -> tuple[int, int]:
    ls = [o for o in kern.fn.__globals__.values() if isinstance(o, launch.BoundLauncher)]
    return sum(b.bound_launches for b in ls), sum(b.jit_launches for b in ls)


@pytest.mark.gpu
@pytest.mark.parametrize("name,cfg,shape", [
    ("sliding_window", {}, (2, 8, 8, 1000, 1000)),
    ("softcap_causal", {"tma": True}, (2, 8, 8, 1000, 1000)),  # a kernel that needs global scratch
    ("alibi_causal", {"BLOCK_M": 128, "num_warps": 8}, (2, 8, 2, 777, 777)),
    ("decode", {}, (4, 32, 8, 1, 4099)),  # split + combine: two kernels per call
])
def test_gpu_bound_launches_match_the_reference_call_after_call(tmp_path, monkeypatch, name, cfg, shape):
    """A real generated kernel through the loader, called again and again with new inputs: every
    repeat after the first is a bound launch, each output is checked against the reference, and
    a misaligned view (2 bytes off) or another length goes back through Triton once, then binds."""
    import math

    monkeypatch.setenv("R1ATTN_BOUND_LAUNCH", "1")

    from tests.helpers import assert_close_to_ref
    from torch_r1attn import variants as V
    from torch_r1attn.loader import load_source_file
    from torch_r1attn.reference import eager_attention, reference_attention
    from torch_r1attn.search.templates import generate_source
    from tests.test_templates import make_problem

    B, Hq, Hkv, Sq, Sk = shape
    D, dt = 128, torch.bfloat16
    var = {"sliding_window": V.sliding_window(256), "softcap_causal": V.causal() + V.softcap(30.0),
           "alibi_causal": V.causal() + V.alibi(Hq), "decode": V.causal("bottom_right")}[name].to("cuda")
    path = tmp_path / f"{name}.py"
    path.write_text(generate_source(make_problem(var, B, Hq, Hkv, Sq, Sk, D, D, dt, "cuda"), cfg))
    kern = load_source_file(path, name_hint=name)
    g = torch.Generator(device="cuda").manual_seed(0)
    scale = 1 / math.sqrt(D)

    def fresh(sq, sk, misalign=False):
        def mk(h, s):
            n = B * h * s * D
            buf = torch.randn(n + 1, device="cuda", dtype=dt, generator=g)
            return (buf[1:] if misalign else buf[:n]).view(B, h, s, D)
        return mk(Hq, sq), mk(Hkv, sk), mk(Hkv, sk)

    plan = [(Sq, Sk, False)] * 3 + [(Sq, Sk, True)] * 2 + [(Sq, Sk - 5, False)] * 2 + [(Sq, Sk, False)]
    for sq, sk, mis in plan:
        q, k, v = fresh(sq, sk, mis)
        assert (q.data_ptr() % 16 != 0) == mis
        out = torch.full((B, Hq, sq, D), float("nan"), device="cuda", dtype=dt)
        kern(q, k, v, out, scale, **var.tensors())
        ref = reference_attention(q, k, v, var, scale, dtype=torch.float32)
        base = eager_attention(q, k, v, var, scale, compute_dtype=dt)
        assert_close_to_ref(out, ref, baseline=base, name=f"{name} {cfg} sq={sq} sk={sk} misaligned={mis}")
    bound, jit = _bound_counts(kern)
    per_call = 2 if name == "decode" else 1
    assert bound >= 4 * per_call, (bound, jit)  # at least the repeats of the aligned first shape
    assert jit <= 3 * per_call, (bound, jit)  # first call, the misaligned key, the other length (if its key differs)
