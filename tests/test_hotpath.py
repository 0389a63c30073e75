"""The C++ cache-hit fast path (csrc/hotpath.cpp, torch_r1attn/hotpath.py): it takes repeat calls
of settled signatures and nothing else, gives what the Python path gives, and its absence or a
failed build leaves the Python path serving."""

import logging
import threading

import pytest
import torch

import torch_r1attn as r1
from torch_r1attn import dispatch, functional, hotpath, variants as V
from torch_r1attn.dispatch import Resolved, table_key
from torch_r1attn.spec import AttentionSpec


class _Kernel:
    def __init__(self, fail: bool = False):
        self.calls = 0
        self.fail = fail
        self.kw = []

    def fn(self, q, k, v, out, scale, **tensors):
        self.calls += 1
        self.kw.append(sorted(tensors))
        if self.fail:
            raise RuntimeError("launch failed: too many resources requested")
        out.copy_(torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
                  if v.shape[-1] == q.shape[-1] else out.new_zeros(out.shape))

    def unsupported(self, q, k, v):
        return None


@pytest.fixture
def table():
    def put(q, k, v, var, kern, strided_out=False):
        dispatch._table[table_key(q, k, v, var)] = Resolved(
            spec=AttentionSpec.from_call(q, k, v, var.key), path="sdpa", reason="test", kernel=kern,
            unsupported=None, source="cache-kernel", strided_out=strided_out)

    yield put
    dispatch.reset()


@pytest.fixture
def settled(table):
    """``make(kern)``: a causal signature on (1, 2, 17, 16) CPU tensors whose entry runs ``kern``
    (None: an SDPA fallback verdict), called three times, so it is settled and registered with the
    C++ path; returns (variant, q, k, v)."""

    def make(kern):
        var = V.causal()
        q, k, v = (torch.randn(1, 2, 17, 16) for _ in range(3))
        table(q, k, v, var, kern)
        for _ in range(3):
            r1.attention(q, k, v, variant=var)
        return var, q, k, v

    return make


@pytest.fixture
def python_calls(monkeypatch):
    """Calls that reached the Python front end's slow part (``_attention``)."""
    seen = []
    real = functional._attention
    monkeypatch.setattr(functional, "_attention", lambda *a, **kw: seen.append(1) or real(*a, **kw))
    return seen


def test_repeat_calls_skip_python_and_match_it(cpp_hot, table, python_calls):
    var = V.causal() + V.alibi(4)
    q, k, v = torch.randn(2, 4, 33, 16), torch.randn(2, 2, 33, 16), torch.randn(2, 2, 33, 16)
    kern = _Kernel()
    table(q, k, v, var, kern)
    first = [r1.attention(q, k, v, enable_gqa=True, variant=var) for _ in range(2)]  # settle, then register
    assert cpp_hot.size() == 1 and len(python_calls) == 2
    outs = [r1.attention(q, k, v, enable_gqa=True, variant=var) for _ in range(5)]
    assert len(python_calls) == 2 and kern.calls == 7  # five repeats, none through Python
    for o in outs:
        torch.testing.assert_close(o, first[0], rtol=0, atol=0)
        assert o.is_contiguous() and o.shape == q.shape and o.data_ptr() != first[0].data_ptr()
    assert kern.kw[-1] == sorted(var.tensors())  # the variant's tensors reach the kernel by name
    half = r1.attention(q, k, v, enable_gqa=True, variant=var, scale=0.125)
    torch.testing.assert_close(half, torch.nn.functional.scaled_dot_product_attention(
        q, k, v, scale=0.125, enable_gqa=True))
    assert len(python_calls) == 2


def test_other_shapes_dtypes_flags_and_variants_are_other_keys(cpp_hot, settled, python_calls):
    var, q, k, v = settled(_Kernel())
    n = len(python_calls)
    r1.attention(q[:, :, :16], k, v, variant=var)  # another Sq (same bucket): not this entry
    r1.attention(q, k, v, variant=V.causal())  # an equal variant, another object: the Python memo's rule too
    r1.attention(q, k, v, variant=var, is_causal=False, enable_gqa=True)  # other flags
    r1.attention(q.double(), k.double(), v.double(), variant=var)
    assert len(python_calls) == n + 4 and cpp_hot.size() == 1


def test_calls_it_declines_go_through_python(cpp_hot, settled, python_calls):
    var, q, k, v = settled(_Kernel())
    n = len(python_calls)
    r1.attention(q.clone().requires_grad_(), k, v, variant=var)  # grad: a differentiable fallback
    r1.attention(q, k, v, variant=var, scale=1)  # an int scale
    r1.attention(q, k, v, variant=var, dropout_p=0)  # an int dropout
    r1.attention(q, k, v, variant=var, is_causal=0)  # a flag that is not a bool
    r1.attention(torch.nn.Parameter(q, requires_grad=False), k, v, variant=var)  # a Tensor subclass
    with pytest.raises(ValueError, match="scale"):
        r1.attention(q, k, v, variant=var, scale=float("inf"))
    assert len(python_calls) == n + 6
    assert cpp_hot.size() == 1  # declined calls register nothing


def test_layout_check_of_kernels_not_verified_on_strided_layouts(cpp_hot, settled):
    seen = []

    class _Layout(_Kernel):
        def fn(self, q, k, v, out, scale, **t):
            seen.append(q.is_contiguous())
            super().fn(q, k, v, out, scale, **t)

    var, q, k, v = settled(_Layout())
    qt = torch.randn(1, 17, 2, 16).transpose(1, 2)  # same shape, dtype and device: same key
    out = r1.attention(qt, k, v, variant=var)
    assert seen == [True] * 4  # the strided call got forward's contiguous copy
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(qt, k, v))


@pytest.mark.parametrize("dv,bshd", [(24, False), (16, True)])
def test_output_allocation_modes(cpp_hot, table, dv, bshd):
    """Dv != D gets a (B, H, S, Dv) output; the transformers call a (B, S, H, Dv)-strided one when
    the kernel was verified on strided layouts."""
    var = V.causal()
    q, k, v = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, dv)
    table(q, k, v, var, _Kernel(), strided_out=bshd)
    outs = [functional._attention(q, k, v, variant=var, bshd_out=bshd) for _ in range(4)]
    assert cpp_hot.size() == 1
    o = outs[-1]
    assert o.shape == (2, 3, 9, dv)
    assert o.transpose(1, 2).is_contiguous() if bshd else o.is_contiguous()
    assert o.stride() == outs[0].stride()


def test_fallback_verdicts_run_their_runner(cpp_hot, settled, python_calls):
    var, q, k, v = settled(None)  # a fallback verdict: sdpa
    n = len(python_calls)
    out = r1.attention(q, k, v, variant=var, scale=0.3)
    assert len(python_calls) == n
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                     scale=0.3))


def test_kernel_errors_propagate_and_nothing_is_lost(cpp_hot, settled):
    kern = _Kernel()
    var, q, k, v = settled(kern)
    kern.fail = True
    with pytest.raises(RuntimeError, match="too many resources"):
        r1.attention(q, k, v, variant=var)
    kern.fail = False
    assert r1.attention(q, k, v, variant=var).shape == q.shape and cpp_hot.size() == 1


def test_reset_and_a_clear_during_a_call(cpp_hot, settled):
    """dispatch.reset() empties the C++ table; a clear() while a kernel runs (another thread, or
    the kernel itself) does not free what the running call holds."""

    class _Clears(_Kernel):
        def fn(self, *a, **kw):
            cpp_hot.clear()
            super().fn(*a, **kw)

    var, q, k, v = settled(_Clears())
    assert cpp_hot.size() == 0  # the third call ran from the table and emptied it
    torch.testing.assert_close(r1.attention(q, k, v, variant=var),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v))
    dispatch.reset()
    assert cpp_hot.size() == 0


def test_threads_share_the_table(cpp_hot, settled):
    var, q, k, v = settled(_Kernel())
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    errors = []

    def work():
        try:
            for i in range(200):
                torch.testing.assert_close(r1.attention(q, k, v, variant=var), ref)
                if i % 50 == 0:
                    cpp_hot.clear()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert errors == []


def test_put_rejects_bad_entries(cpp_hot):
    q = torch.randn(1, 1, 4, 8)
    args = (q, q, q, None, False, False, False, 0.5)
    with pytest.raises(ValueError, match="kind"):
        cpp_hot.put(*args, 3, print, None, 0, False, False)
    with pytest.raises(ValueError, match="callable"):
        cpp_hot.put(*args, 0, None, None, 0, False, False)
    with pytest.raises(TypeError, match="dict"):
        cpp_hot.put(*args, 0, print, [1], 0, False, False)
    with pytest.raises(TypeError):
        cpp_hot.put(q, q)
    assert cpp_hot.put(q[0], q, q, None, False, False, False, 0.5, 0, print, None, 0, False, False) is False  # 3-D
    assert cpp_hot.put(q, q, q[:, :, :3], None, False, False, False, 0.5, 0, print, None, 0, False, True) is False
    # bucketed needs Sk == Sv
    assert cpp_hot.size() == 0


def test_a_failed_build_leaves_the_python_path(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(hotpath, "_state", "idle")
    monkeypatch.setattr(hotpath, "_module", None)
    monkeypatch.setattr(hotpath, "_error", None)
    monkeypatch.setattr(hotpath, "find_cxx", lambda: "/bin/false")
    with caplog.at_level(logging.WARNING, logger="torch_r1attn.hotpath"):
        assert hotpath.ensure(block=True, force=True, root=tmp_path) is False
    st = hotpath.status()
    assert st["state"] == "failed" and "exited with" in st["error"]
    assert "C++ fast path unavailable" in caplog.text
    assert hotpath.ensure(block=True, force=True) is False  # not retried in this process
    assert functional._hot_call is None
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    torch.testing.assert_close(r1.attention(q, k, v, is_causal=True),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_off_setting_builds_nothing(monkeypatch):
    from torch_r1attn import config

    monkeypatch.setattr(hotpath, "_state", "idle")
    monkeypatch.setenv("R1ATTN_HOTPATH", "off")
    config.set_settings(None)
    assert hotpath.ensure(block=True) is False and hotpath.status()["state"] == "off"
    monkeypatch.setenv("R1ATTN_HOTPATH", "sometimes")
    config.set_settings(None)
    with pytest.raises(ValueError, match="R1ATTN_HOTPATH"):
        config.settings()
    config.set_settings(None)


def test_a_library_others_could_write_is_not_loaded(monkeypatch, tmp_path):
    """The kernel cache's rule for the built library: ours, not group/other-writable, no links."""
    lib = hotpath._library(hotpath.build_dir(tmp_path))
    lib.parent.mkdir(parents=True, mode=0o700)
    lib.write_bytes(b"not a library")
    lib.chmod(0o664)
    with pytest.raises(RuntimeError, match="writable by group/others"):
        hotpath._load(lib)
    lib.chmod(0o600)
    link = lib.parent / "link.so"
    link.symlink_to(lib)
    with pytest.raises(RuntimeError, match="not a regular file"):
        hotpath._load(link)
    lib.parent.chmod(0o777)
    with pytest.raises(RuntimeError, match="writable by group/others"):
        hotpath._load(lib)
    lib.parent.chmod(0o700)


def test_decode_steps_stay_on_one_bucketed_entry(cpp_hot, table, python_calls):
    """A decode loop (Sk grows by one per step) keeps hitting the C++ path inside a length bucket
    when the variant's checks ignore the lengths; the next bucket is a new entry."""
    var = V.causal(align="bottom_right") + V.softcap(20.0)
    q = torch.randn(2, 4, 1, 16)
    k0, v0 = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    kern = _Kernel()
    table(q, k0[:, :, :33], v0[:, :, :33], var, kern)  # bucket 64 covers Sk 33..64
    for sk in (33, 34):  # settle the runner, then register (bucketed)
        r1.attention(q, k0[:, :, :sk].contiguous(), v0[:, :, :sk].contiguous(), enable_gqa=True, variant=var)
    assert cpp_hot.size() == 1
    n = len(python_calls)
    for sk in range(35, 41):
        k, v = k0[:, :, :sk].contiguous(), v0[:, :, :sk].contiguous()
        out = r1.attention(q, k, v, enable_gqa=True, variant=var)
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    assert len(python_calls) == n and kern.calls == 8  # six steps, none through Python
    k, v = torch.randn(2, 2, 65, 16), torch.randn(2, 2, 65, 16)  # the next bucket: not this entry
    r1.attention(q, k, v, enable_gqa=True, variant=var)
    assert len(python_calls) == n + 1
    with pytest.raises(ValueError, match="length"):  # Sk != Sv: declined, the Python path says what is wrong
        r1.attention(q, k[:, :, :40].contiguous(), v[:, :, :39].contiguous(), enable_gqa=True, variant=var)


def test_variants_whose_checks_read_the_lengths_keep_exact_keys(cpp_hot, table, python_calls):
    """Documents validate doc_ids against Sq and Sk on every new length: never bucketed."""
    var = V.causal() + V.document(torch.zeros(40, dtype=torch.int32))
    q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    table(q, k, v, var, _Kernel())
    for _ in range(3):
        r1.attention(q, k, v, variant=var)
    assert cpp_hot.size() == 1
    n = len(python_calls)
    q2, k2, v2 = (torch.randn(1, 2, 41, 16) for _ in range(3))  # same bucket, doc_ids too short
    with pytest.raises(ValueError, match="doc_ids has length 40"):
        r1.attention(q2, k2, v2, variant=var)
    assert len(python_calls) == n + 1


def _all_parts(cls=V.Part):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_parts(sub)


def test_every_part_that_checks_lengths_says_so():
    """``length_free`` lets the C++ path skip a part's validate_call for new lengths in a bucket:
    a part overriding validate_call must declare it in its own body, and the ones that read Sq /
    Sk must say False."""
    for cls in _all_parts():
        if "validate_call" in cls.__dict__:
            assert "length_free" in cls.__dict__, cls.__name__
    assert not V.Document.length_free and not V.DenseMask.length_free and not V.DenseBias.length_free
    assert V.Alibi.length_free and V.RelativeBias.length_free and V.Causal.length_free
