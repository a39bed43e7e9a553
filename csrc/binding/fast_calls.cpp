// The offload step's small C calls as a CPython module (dali_compile/runtime/cpu_extension.py fast_function):
// the same extern "C" entry points as through ctypes, called with the same int arguments (addresses as ints).
//
// Why: a layer step makes two or three of these calls (its active experts, DALI's decision, the prefetch), each
// a microsecond of C. Through ctypes each call converts every argument in libffi's generic path: ~1-5 us warm
// and far more in a decode loop, where the weights streamed between layer steps leave that code cold. Here an
// argument is one PyLong_AsLongLong, and the calls keep the GIL (shorter than releasing it) except the prefetch's
// router, which can take milliseconds over a prefill's tokens.
//
// Built only where Python's headers are found (cpp_extension puts them on the include path); without them the
// module is absent and every call goes through ctypes, as before.
#if defined(__has_include)
#if __has_include(<Python.h>)
#define DALI_FAST_CALLS 1
#endif
#endif

#ifdef DALI_FAST_CALLS
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "../core/planner.h"

namespace {

// The call's arguments as int64 (a Python int each, as ctypes takes them); false with a Python error set.
template <Py_ssize_t N>
bool int_arguments(const char* name, PyObject* const* args, Py_ssize_t nargs, int64_t (&out)[N]) {
  if (nargs != N) {
    PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, N, nargs);
    return false;
  }
  for (Py_ssize_t i = 0; i < N; ++i) {
    if (args[i] == Py_None) {  // ctypes passes None as a NULL pointer
      out[i] = 0;
      continue;
    }
    out[i] = PyLong_AsLongLong(args[i]);
    if (out[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

template <typename T>
T* at(int64_t address) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(address));
}

PyObject* greedy_plan(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[9];
  if (!int_arguments("dali_greedy_plan", args, nargs, a)) return nullptr;
  return PyLong_FromLong(dali_greedy_plan(a[0], at<const int64_t>(a[1]), at<const uint8_t>(a[2]),
                                          at<const double>(a[3]), at<const double>(a[4]), at<const double>(a[5]),
                                          a[6], a[7], at<uint8_t>(a[8])));
}

PyObject* prefetch_choice(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[13];
  if (!int_arguments("dali_prefetch_choice", args, nargs, a)) return nullptr;
  return PyLong_FromLong(dali_prefetch_choice(a[0], at<const int64_t>(a[1]), at<const float>(a[2]), a[3],
                                              at<const int32_t>(a[4]), at<const double>(a[5]),
                                              at<const double>(a[6]), at<const double>(a[7]), a[8], a[9],
                                              at<int64_t>(a[10]), at<double>(a[11]), at<int64_t>(a[12])));
}

PyObject* predict_prefetch(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[23];
  if (!int_arguments("dali_predict_prefetch", args, nargs, a)) return nullptr;
  int taken;
  Py_BEGIN_ALLOW_THREADS  // a router over a prefill's tokens can take milliseconds: other threads run meanwhile
  taken = dali_predict_prefetch(
      a[0], at<const void>(a[1]), static_cast<int>(a[2]), a[3], at<const float>(a[4]), at<const void>(a[5]),
      static_cast<int>(a[6]), at<const float>(a[7]), a[8], a[9], a[10], static_cast<int>(a[11]),
      at<const int32_t>(a[12]), at<const double>(a[13]), at<const double>(a[14]), at<const double>(a[15]), a[16],
      a[17], at<int64_t>(a[18]), at<float>(a[19]), at<int64_t>(a[20]), at<double>(a[21]), at<int64_t>(a[22]));
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(taken);
}

PyObject* workload_update(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[13];
  if (!int_arguments("dali_workload_update", args, nargs, a)) return nullptr;
  return PyLong_FromLongLong(dali_workload_update(a[0], at<const int64_t>(a[1]), at<const int64_t>(a[2]),
                                                  at<int64_t>(a[3]), at<int64_t>(a[4]), a[5], a[6], a[7], a[8],
                                                  at<const int64_t>(a[9]), a[10], a[11], at<int64_t>(a[12])));
}

PyObject* decide_workload(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[7];
  if (!int_arguments("dali_decide_workload", args, nargs, a)) return nullptr;
  return PyLong_FromLongLong(
      dali_decide_workload(at<const int64_t>(a[0]), a[1], a[2], a[3], at<const int64_t>(a[4]), a[5], a[6]));
}

// A 1-D C-contiguous buffer of `itemsize`-byte items whose format is one of `formats` (numpy's int64 is 'l' or
// 'q', its bool '?'), held until the destructor; `ok` false (and no Python error) for any other object.
struct ArrayView {
  Py_buffer view{};
  bool ok = false;
  ArrayView(PyObject* object, Py_ssize_t itemsize, const char* formats, bool any_rank = false) {
    if (PyObject_GetBuffer(object, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
      PyErr_Clear();
      return;
    }
    const char* format = view.format ? view.format : "B";
    if (format[0] == '<' || format[0] == '=' || format[0] == '@') ++format;
    ok = (view.ndim == 1 || any_rank) && view.itemsize == itemsize && format[0] != '\0' && format[1] == '\0' &&
         std::strchr(formats, format[0]) != nullptr;
  }
  ~ArrayView() {
    if (view.obj != nullptr) PyBuffer_Release(&view);
  }
  Py_ssize_t size() const { return view.itemsize ? view.len / view.itemsize : 0; }  // every item, any rank
  template <typename T>
  const T* data() const {
    return static_cast<const T*>(view.buf);
  }
};

// (context, experts, workloads, cached, step, max_uncached, resident, capacity): DaliPolicy's decision read
// straight from the LayerStep's numpy arrays (no copy into the context's buffers). Returns (on_gpu as a
// bytearray of n bools, swaps written), -1 where the greedy does not apply, or None for arrays of another
// dtype, shape or layout (the caller then copies them into the buffers).
PyObject* decide_workload_arrays(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_Format(PyExc_TypeError, "dali_decide_workload_arrays takes 8 arguments, got %zd", nargs);
    return nullptr;
  }
  int64_t context = PyLong_AsLongLong(args[0]), step = PyLong_AsLongLong(args[4]);
  int64_t max_uncached = PyLong_AsLongLong(args[5]), capacity = PyLong_AsLongLong(args[7]);
  if (PyErr_Occurred()) return nullptr;
  ArrayView experts(args[1], 8, "lq"), workloads(args[2], 8, "lq"), cached(args[3], 1, "?"),
      resident(args[6], 8, "lq");
  const Py_ssize_t n = experts.size();
  if (!experts.ok || !workloads.ok || !cached.ok || !resident.ok || workloads.size() != n || cached.size() != n)
    Py_RETURN_NONE;
  PyObject* on_gpu = PyByteArray_FromStringAndSize(nullptr, n);
  if (on_gpu == nullptr) return nullptr;
  const int64_t taken = dali_decide_workload_on(
      at<const int64_t>(context), experts.data<int64_t>(), workloads.data<int64_t>(), cached.data<uint8_t>(),
      reinterpret_cast<uint8_t*>(PyByteArray_AS_STRING(on_gpu)), n, step, max_uncached, resident.data<int64_t>(),
      resident.size(), capacity);
  if (taken < 0) {
    Py_DECREF(on_gpu);
    return PyLong_FromLongLong(-1);
  }
  return Py_BuildValue("(NL)", on_gpu, static_cast<long long>(taken));
}

// (ids, slot_of_expert): a layer step's routed ids (int64, any shape, contiguous) and its cache's slot table
// (int32 [E]) -> (experts, workloads, cached, hits): the active experts ascending and their workloads as
// bytearrays of int64, their cache flags as a bytearray of bools, and how many are cached; -1 for an id outside
// [0, E); None for arrays of another dtype or layout (the caller then takes the address path).
PyObject* step_routing_arrays(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_Format(PyExc_TypeError, "dali_step_routing_arrays takes 2 arguments, got %zd", nargs);
    return nullptr;
  }
  ArrayView ids(args[0], 8, "lq", /*any_rank=*/true), slots(args[1], 4, "i");
  if (!ids.ok || !slots.ok) Py_RETURN_NONE;
  const int64_t E = slots.size();
  thread_local std::vector<int64_t> active;
  active.resize(3 * static_cast<size_t>(E));
  int64_t hits = 0;
  const int64_t n = dali_step_routing(ids.size(), ids.data<int64_t>(), E, slots.data<int32_t>(), active.data(), &hits);
  if (n < 0) return PyLong_FromLongLong(-1);
  thread_local std::vector<uint8_t> flags;
  flags.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) flags[i] = static_cast<uint8_t>(active[2 * E + i]);
  const auto bytes = static_cast<Py_ssize_t>(n * sizeof(int64_t));
  return Py_BuildValue("(NNNL)", PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(active.data()), bytes),
                       PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(active.data() + E), bytes),
                       PyByteArray_FromStringAndSize(reinterpret_cast<const char*>(flags.data()), n),
                       static_cast<long long>(hits));
}

// Named as the C entry points, so that cpu_extension.fast_function(name) finds either (the step routing by
// address has no wrapper: where this module exists, the arrays call takes every input that one would).
using FastFunction = PyObject* (*)(PyObject*, PyObject* const*, Py_ssize_t);

PyMethodDef fast_method(const char* name, FastFunction function) {
  return {name, reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(function)), METH_FASTCALL, nullptr};
}

PyMethodDef methods[] = {
    fast_method("dali_greedy_plan", greedy_plan),
    fast_method("dali_prefetch_choice", prefetch_choice),
    fast_method("dali_predict_prefetch", predict_prefetch),
    fast_method("dali_workload_update", workload_update),
    fast_method("dali_decide_workload", decide_workload),
    fast_method("dali_decide_workload_arrays", decide_workload_arrays),
    fast_method("dali_step_routing_arrays", step_routing_arrays),
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "dali_cpu_experts", "the offload step's C calls without ctypes", -1,
                      methods};

}  // namespace

// The library's name (cpu_extension.LIBRARY_NAME): the import system looks for PyInit_<name>.
extern "C" __attribute__((visibility("default"))) PyObject* PyInit_dali_cpu_experts() {
  return PyModule_Create(&module);
}

#endif  // DALI_FAST_CALLS
