// The cache-hit fast path of torch_r1attn.attention, in C++ (torch_r1attn/hotpath.py builds and
// loads it; nothing else includes this file).
//
// A repeat call with the same tensors' shapes, dtypes and devices, the same variant object and the
// same flags as an earlier call that ran a settled kernel (or fallback) costs, in Python, a
// 12-field memo key (~1 us of attribute reads on a fast host), the grad and layout checks, the
// output allocation and two call layers. Here the key is read straight from the TensorImpls, and
// the checks and the allocation are C++:
//
//   call(q, k, v, variant, is_causal, enable_gqa, scale, dropout_p, bshd_out)
//     -> out          the entry's kernel ran: fn(q, k, v, out, scale, **tensors)  (or its runner);
//                      a kernel that returns a tensor (a composed module) gives that instead
//     -> None         no entry for this key: the caller registers one after the Python path ran
//     -> Ellipsis     an entry, but this call needs the Python path (grad, layout, an unusual
//                      scale / dropout / flag value): run it, do not register
//   put(q, k, v, variant, is_causal, enable_gqa, bshd_out, default_scale, kind, fn, tensors,
//       alloc, check_layout, bucketed)
//       kind 0: a loaded kernel; alloc 0 = empty_like(q) contiguous, 1 = (B, H, Sq, Dv),
//               2 = (B, Sq, H, Dv) viewed as (B, H, Sq, Dv)
//       kind 1: a Python runner fn(q, k, v, scale) -> out or None (fallback verdicts)
//       bucketed: key the entry by the length *buckets* of Sq and Sk (the dispatch table's key)
//                 instead of the exact lengths, for variants whose checks ignore the lengths:
//                 a decode loop, whose Sk grows by one per step, stays on one entry. call() looks
//                 for the exact key first, then the bucketed one (which also needs Sk == Sv >= 1
//                 and Sq >= 1, the checks the Python path's length memo makes).
//   clear(), size()
//
// Every field the Python memo key holds is in the key here, and variants are compared by
// identity, as in Python (Variant has no __eq__). Everything runs under the GIL; an entry's
// objects are held (INCREF) across the call into Python, so a clear() from that call, or from
// another thread while the GIL is released, cannot free them under us.

#include <Python.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>  // not included by ATen.h in every release (torch 2.11's is not)
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <unordered_map>

namespace {

constexpr int kTensorFields = 7;  // 4 sizes, dtype, device type, device index

struct Key {
  PyObject* variant;  // borrowed for lookups; the table's copy holds a reference
  int64_t f[3 * kTensorFields];
  uint8_t flags;  // is_causal | enable_gqa << 1 | bshd_out << 2 | bucketed << 3

  bool operator==(const Key& o) const {
    return variant == o.variant && flags == o.flags && std::memcmp(f, o.f, sizeof(f)) == 0;
  }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    uint64_t h = reinterpret_cast<uintptr_t>(k.variant) * 0x9E3779B97F4A7C15ull ^ k.flags;
    for (int64_t x : k.f) h = (h ^ static_cast<uint64_t>(x)) * 0x100000001B3ull;
    return static_cast<size_t>(h ^ (h >> 29));
  }
};

struct Entry {
  PyObject* fn = nullptr;       // kernel forward (kind 0) or runner (kind 1); owned
  PyObject* tensors = nullptr;  // kwargs dict of the variant's tensors, or nullptr; owned
  double default_scale = 1.0;
  int kind = 0;
  int alloc = 0;
  bool check_layout = false;
};

std::unordered_map<Key, Entry, KeyHash> g_table;
constexpr size_t kMaxEntries = 512;

// 1 = filled, 0 = not a plain 4-D tensor (the Python path decides)
int fill(Key& key, PyObject* const* ts) {
  int n = 0;
  for (int i = 0; i < 3; ++i) {
    // exactly torch.Tensor: not Parameter, not subclasses with __torch_function__ (as the Python memo)
    if (Py_TYPE(ts[i]) != reinterpret_cast<PyTypeObject*>(THPVariableClass)) return 0;
    const at::Tensor& t = THPVariable_Unpack(ts[i]);
    if (t.dim() != 4) return 0;
    auto s = t.sizes();
    key.f[n++] = s[0];
    key.f[n++] = s[1];
    key.f[n++] = s[2];
    key.f[n++] = s[3];
    key.f[n++] = static_cast<int64_t>(t.scalar_type());
    const auto d = t.device();
    key.f[n++] = static_cast<int64_t>(d.type());
    key.f[n++] = d.index();
  }
  return 1;
}

// Py_True / Py_False only; anything else (1, numpy bools) takes the Python path
int flag(PyObject* o, int bit, uint8_t& flags) {
  if (o == Py_True) {
    flags |= static_cast<uint8_t>(1u << bit);
    return 1;
  }
  return o == Py_False;
}

void release(Entry& e) {
  Py_XDECREF(e.fn);
  Py_XDECREF(e.tensors);
  e.fn = e.tensors = nullptr;
}

void clear_table() {
  // move out first: a DECREF can run arbitrary Python (a finalizer calling clear())
  std::unordered_map<Key, Entry, KeyHash> old;
  old.swap(g_table);
  for (auto& kv : old) {
    Py_DECREF(kv.first.variant);
    release(kv.second);
  }
}

// the key of call()'s / put()'s arguments: tensors at 0-2, the variant at 3, is_causal and
// enable_gqa at 4-5, bshd_out at ``bshd_at``; false when the fast path cannot key them
bool make_key(Key& key, PyObject* const* args, int bshd_at) {
  key.variant = args[3];
  key.flags = 0;
  return flag(args[4], 0, key.flags) && flag(args[5], 1, key.flags) && flag(args[bshd_at], 2, key.flags) &&
         fill(key, args);
}

// smallest power of two >= n (spec.length_bucket); n >= 1
int64_t bucket(int64_t n) {
  int64_t b = 1;
  while (b < n) b <<= 1;
  return b;
}

// the bucketed form of a filled key: Sq, Sk, Sv (fields 2, 9, 16) by their buckets
void to_buckets(Key& key) {
  for (int i = 0; i < 3; ++i) key.f[i * kTensorFields + 2] = bucket(key.f[i * kTensorFields + 2]);
  key.flags |= 1u << 3;
}

PyObject* declined() {
  Py_INCREF(Py_Ellipsis);
  return Py_Ellipsis;
}

PyObject* hot_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 9) {
    PyErr_SetString(PyExc_TypeError, "call(q, k, v, variant, is_causal, enable_gqa, scale, dropout_p, bshd_out)");
    return nullptr;
  }
  Key key;
  if (!make_key(key, args, 8)) return declined();
  auto it = g_table.find(key);
  if (it == g_table.end()) {
    const int64_t sq = key.f[2], sk = key.f[kTensorFields + 2], sv = key.f[2 * kTensorFields + 2];
    if (sq < 1 || sk < 1 || sv != sk) return declined();  // the Python path says what is wrong
    to_buckets(key);
    it = g_table.find(key);
    if (it == g_table.end()) Py_RETURN_NONE;
  }

  PyObject* dropout = args[7];
  if (!(PyFloat_CheckExact(dropout) && PyFloat_AS_DOUBLE(dropout) == 0.0)) return declined();
  double scale;
  if (args[6] == Py_None) {
    scale = it->second.default_scale;
  } else if (PyFloat_CheckExact(args[6]) && std::isfinite(PyFloat_AS_DOUBLE(args[6]))) {
    scale = PyFloat_AS_DOUBLE(args[6]);
  } else {
    return declined();  // ints, NaN, inf: the Python path validates and says what is wrong
  }
  const at::Tensor& q = THPVariable_Unpack(args[0]);
  const at::Tensor& k = THPVariable_Unpack(args[1]);
  const at::Tensor& v = THPVariable_Unpack(args[2]);
  if (c10::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad() || v.requires_grad())) {
    return declined();
  }
  Entry e = it->second;  // copy, then hold its objects: the table may change during the call
  Py_INCREF(e.fn);
  Py_XINCREF(e.tensors);
  PyObject* result = nullptr;
  PyObject* py_scale = PyFloat_FromDouble(scale);
  if (py_scale == nullptr) goto done;
  if (e.kind == 1) {
    PyObject* a[4] = {args[0], args[1], args[2], py_scale};
    result = PyObject_Vectorcall(e.fn, a, 4, nullptr);
    if (result == Py_None) {  // the runner declined (it re-checks what forward would)
      Py_DECREF(result);
      result = declined();
    }
    goto done;
  }
  if (e.check_layout && !(q.is_contiguous() && k.is_contiguous() && v.is_contiguous())) {
    result = declined();
    goto done;
  }
  {
    at::Tensor out;
    try {
      const auto dv = v.size(3);
      if (e.alloc == 0) {
        out = at::empty_like(q, at::MemoryFormat::Contiguous);
      } else if (e.alloc == 1) {
        out = at::empty({q.size(0), q.size(1), q.size(2), dv}, q.options());
      } else {
        out = at::empty({q.size(0), q.size(2), q.size(1), dv}, q.options()).transpose(1, 2);
      }
    } catch (const std::exception& ex) {
      PyErr_SetString(PyExc_RuntimeError, ex.what());
      goto done;
    }
    PyObject* py_out = THPVariable_Wrap(std::move(out));
    if (py_out == nullptr) goto done;
    PyObject* a[5] = {args[0], args[1], args[2], py_out, py_scale};
    PyObject* r = PyObject_VectorcallDict(e.fn, a, 5, e.tensors);
    if (r == nullptr) {
      Py_DECREF(py_out);
      goto done;
    }
    if (r == Py_None) {  // wrote out
      Py_DECREF(r);
      result = py_out;
    } else if (THPVariable_Check(r)) {  // a composed module returns its own output (loader's contract)
      Py_DECREF(py_out);
      result = r;
    } else {
      Py_DECREF(r);
      Py_DECREF(py_out);
      PyErr_SetString(PyExc_TypeError, "r1attn fast path: kernel forward returned neither None nor a tensor");
    }
  }
done:
  Py_XDECREF(py_scale);
  Py_DECREF(e.fn);
  Py_XDECREF(e.tensors);
  return result;
}

PyObject* hot_put(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 14) {
    PyErr_SetString(PyExc_TypeError,
                    "put(q, k, v, variant, is_causal, enable_gqa, bshd_out, default_scale, kind, fn, tensors, "
                    "alloc, check_layout, bucketed)");
    return nullptr;
  }
  Key key;
  if (!make_key(key, args, 6)) Py_RETURN_FALSE;  // not a key the fast path can compute: nothing registered
  const int bucketed = PyObject_IsTrue(args[13]);
  if (bucketed < 0) return nullptr;
  if (bucketed) {
    if (key.f[2] < 1 || key.f[kTensorFields + 2] < 1 || key.f[2 * kTensorFields + 2] != key.f[kTensorFields + 2]) {
      Py_RETURN_FALSE;
    }
    to_buckets(key);
  }
  Entry e;
  e.default_scale = PyFloat_AsDouble(args[7]);
  e.kind = static_cast<int>(PyLong_AsLong(args[8]));
  e.alloc = static_cast<int>(PyLong_AsLong(args[11]));
  int cl = PyObject_IsTrue(args[12]);
  if (PyErr_Occurred() || cl < 0) return nullptr;
  e.check_layout = cl != 0;
  if ((e.kind != 0 && e.kind != 1) || e.alloc < 0 || e.alloc > 2 || !PyCallable_Check(args[9])) {
    PyErr_SetString(PyExc_ValueError, "put: kind must be 0 or 1, alloc 0-2, fn callable");
    return nullptr;
  }
  PyObject* tensors = args[10];
  if (tensors != Py_None && !PyDict_Check(tensors)) {
    PyErr_SetString(PyExc_TypeError, "put: tensors must be a dict or None");
    return nullptr;
  }
  if (g_table.size() >= kMaxEntries) clear_table();
  Py_INCREF(args[9]);
  e.fn = args[9];
  if (tensors != Py_None && PyDict_GET_SIZE(tensors) > 0) {
    Py_INCREF(tensors);
    e.tensors = tensors;
  }
  auto it = g_table.find(key);
  if (it != g_table.end()) {
    Entry old = it->second;
    it->second = e;
    release(old);
  } else {
    Py_INCREF(key.variant);
    g_table.emplace(key, e);
  }
  Py_RETURN_TRUE;
}

PyObject* hot_clear(PyObject*, PyObject*) {
  clear_table();
  Py_RETURN_NONE;
}

PyObject* hot_size(PyObject*, PyObject*) { return PyLong_FromSize_t(g_table.size()); }

PyMethodDef kMethods[] = {
    {"call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(hot_call)), METH_FASTCALL,
     "the cache-hit fast path; see the file's header"},
    {"put", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(hot_put)), METH_FASTCALL,
     "register a settled entry for the key of these tensors and flags"},
    {"clear", hot_clear, METH_NOARGS, "drop every entry"},
    {"size", hot_size, METH_NOARGS, "number of entries"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_r1attn_hot", "torch_r1attn's cache-hit fast path", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__r1attn_hot() { return PyModule_Create(&kModule); }
