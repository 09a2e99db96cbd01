// The Python module resconv._C: loading it registers the ops' kernels (ops.cpp; their schemas,
// fakes and autograd are Python's, resconv/ops/cuda.py); it also exposes the few facts the
// Python side needs. Plain CPython API (no pybind11 / torch/extension.h, which
// cost a minute of compile time). TORCH_EXTENSION_NAME is `_C` for the ahead-of-time build
// and the (versioned) JIT name otherwise.
#include <Python.h>

#include "conv_backward_plan.h"
#include "conv_walk.h"
#include "filter_cache.h"
#include "hopper.h"
#include "kernels.h"

namespace {

PyObject* compiled_arch_list(PyObject*, PyObject*) { return PyUnicode_FromString(resconv::compiled_arch_list()); }

PyObject* probe_kernel_image(PyObject*, PyObject* arg) {
  const long device = PyLong_AsLong(arg);
  if (device == -1 && PyErr_Occurred()) return nullptr;
  const char* err = resconv::probe_kernel_image(static_cast<int>(device));
  if (err == nullptr) Py_RETURN_NONE;
  return PyUnicode_FromString(err);
}

// The index plans of the conv backward kernels (conv_backward_plan.h), for the CPU tests.
PyObject* dgrad_phases(PyObject*, PyObject* args) {
  int size, pad, stride, dil, taps;
  if (!PyArg_ParseTuple(args, "iiiii", &size, &pad, &stride, &dil, &taps)) return nullptr;
  if (size < 0 || pad < 0 || stride < 1 || dil < 1 || taps < 1) {
    PyErr_SetString(PyExc_ValueError, "dgrad_phases: expected size >= 0, pad >= 0, stride >= 1, dil >= 1, taps >= 1");
    return nullptr;
  }
  const resconv::AxisPhasing pp = resconv::axis_phasing(stride, dil);
  PyObject* out = PyList_New(stride);
  if (out == nullptr) return nullptr;
  for (int a = 0; a < stride; ++a) {
    const resconv::AxisPhase ph = resconv::axis_phase(a, size, pad, stride, dil, taps, pp);
    PyObject* item = Py_BuildValue("(iiiiiii)", ph.first, ph.count, ph.tap0, ph.taps, ph.base, pp.tap_step,
                                   pp.out_step);
    if (item == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, a, item);
  }
  return out;
}

PyObject* wgrad_split(PyObject*, PyObject* args) {
  long long npq, tiles, target, requested;
  if (!PyArg_ParseTuple(args, "LLLL", &npq, &tiles, &target, &requested)) return nullptr;
  if (npq < 1) {
    PyErr_SetString(PyExc_ValueError, "wgrad_split: expected npq >= 1");
    return nullptr;
  }
  const resconv::WgradSplit s = resconv::wgrad_split(npq, tiles, target, requested);
  return Py_BuildValue("(Li)", static_cast<long long>(s.chunk), s.split);
}

// A list of `count` items made by item(i) (a new reference, or nullptr on error), in order.
template <class Item>
PyObject* make_list(int count, Item item) {
  PyObject* out = PyList_New(count);
  if (out == nullptr) return nullptr;
  for (int i = 0; i < count; ++i) {
    PyObject* v = item(i);
    if (v == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, i, v);
  }
  return out;
}

// The division-free walks of the tensor-core kernels' main loops (conv_walk.h), for the CPU
// tests: `count` successive positions, the first decoded, the rest advanced.
PyObject* tap_walk(PyObject*, PyObject* args) {
  int kf, count, Cg, S, dil_h, dil_w, step;
  long long W, C;
  if (!PyArg_ParseTuple(args, "iiiiiiLLi", &kf, &count, &Cg, &S, &dil_h, &dil_w, &W, &C, &step)) return nullptr;
  if (kf < 0 || count < 0 || Cg < 1 || S < 1 || dil_h < 1 || dil_w < 1 || step < 1) {
    PyErr_SetString(PyExc_ValueError, "tap_walk: expected kf, count >= 0 and Cg, S, dilations, step >= 1");
    return nullptr;
  }
  const resconv::TapGeometry g = resconv::tap_geometry(Cg, S, dil_h, dil_w, W, C, step);
  resconv::TapWalk t = resconv::tap_walk_at(kf, g);
  return make_list(count, [&](int) {
    PyObject* v = Py_BuildValue("(iiiiiL)", t.c, t.s, t.r, t.dh, t.dw, static_cast<long long>(t.off));
    resconv::tap_walk_advance(t, g);
    return v;
  });
}

PyObject* phase_walk(PyObject*, PyObject* args) {
  int count;
  resconv::PhaseGeometry g;
  if (!PyArg_ParseTuple(args, "iiiiiiiii", &count, &g.n_kb, &g.taps_w, &g.tap0_h, &g.tap0_w, &g.tap_step_h,
                        &g.tap_step_w, &g.out_step_h, &g.out_step_w))
    return nullptr;
  if (count < 0 || g.n_kb < 1 || g.taps_w < 1) {
    PyErr_SetString(PyExc_ValueError, "phase_walk: expected count >= 0, n_kb >= 1, taps_w >= 1");
    return nullptr;
  }
  resconv::PhaseWalk w = resconv::phase_walk_at(0, g);
  return make_list(count, [&](int) {
    PyObject* v = Py_BuildValue("(iiiiiii)", w.kb, w.js, w.jr, w.dp, w.dq, w.r, w.s);
    resconv::phase_walk_advance(w, g);
    return v;
  });
}

PyObject* pixel_walk(PyObject*, PyObject* args) {
  int npq, count, P, Q, step;
  if (!PyArg_ParseTuple(args, "iiiii", &npq, &count, &P, &Q, &step)) return nullptr;
  if (npq < 0 || count < 0 || P < 1 || Q < 1 || step < 1) {
    PyErr_SetString(PyExc_ValueError, "pixel_walk: expected npq, count >= 0 and P, Q, step >= 1");
    return nullptr;
  }
  const resconv::PixelGeometry g = resconv::pixel_geometry(P, Q, step);
  resconv::PixelWalk w = resconv::pixel_walk_at(npq, g);
  return make_list(count, [&](int) {
    PyObject* v = Py_BuildValue("(iii)", w.n, w.p, w.q);
    resconv::pixel_walk_advance(w, g);
    return v;
  });
}

// The Hopper kernels: the switch, whether they were compiled, and the plan (hopper_plan.h).
PyObject* hopper_compiled(PyObject*, PyObject*) { return PyBool_FromLong(resconv::hopper_compiled()); }
PyObject* hopper_switch(PyObject*, PyObject*) { return PyBool_FromLong(resconv::hopper_switch()); }
PyObject* set_hopper(PyObject*, PyObject* arg) {
  const int on = PyObject_IsTrue(arg);
  if (on < 0) return nullptr;
  resconv::set_hopper_switch(on != 0);
  Py_RETURN_NONE;
}

// hopper_plan(fields): the HopperCall's fields as a tuple of ints in declaration order.
PyObject* hopper_plan(PyObject*, PyObject* args) {
  long long v[29];
  if (!PyArg_ParseTuple(args, "LLLLLLLLLLLLLLLLLLLLLLLLLLLLL", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7],
                        &v[8], &v[9], &v[10], &v[11], &v[12], &v[13], &v[14], &v[15], &v[16], &v[17], &v[18], &v[19],
                        &v[20], &v[21], &v[22], &v[23], &v[24], &v[25], &v[26], &v[27], &v[28]))
    return nullptr;
  if (v[0] < 0 || v[0] > 2) {
    PyErr_SetString(PyExc_ValueError, "hopper_plan: op must be 0 (fprop), 1 (dgrad) or 2 (wgrad)");
    return nullptr;
  }
  resconv::HopperCall c{};
  c.op = static_cast<resconv::HopperOp>(v[0]);
  c.dtype = static_cast<int>(v[1]);
  c.tf32 = v[2] != 0;
  c.N = v[3], c.C = v[4], c.H = v[5], c.W = v[6], c.K = v[7], c.R = v[8], c.S = v[9], c.P = v[10], c.Q = v[11];
  c.groups = v[12];
  c.stride_h = v[13], c.stride_w = v[14], c.pad_t = v[15], c.pad_b = v[16], c.pad_l = v[17], c.pad_r = v[18];
  c.dil_h = v[19], c.dil_w = v[20];
  c.out_channels_last = v[21] != 0;
  c.prologue = v[22] != 0;
  c.stats_with_epilogue = v[23] != 0;
  c.cc_major = static_cast<int>(v[24]), c.cc_minor = static_cast<int>(v[25]);
  c.sm_count = v[26];
  c.compiled = v[27] != 0;
  c.enabled = v[28] != 0;
  const char* why = resconv::hopper_unsupported(c);
  if (why == nullptr) Py_RETURN_NONE;
  return PyUnicode_FromString(why);
}

PyObject* filter_cache_stats(PyObject*, PyObject*) {
  const resconv::FilterCacheStats s = resconv::filter_cache_stats();
  return Py_BuildValue("(LLL)", static_cast<long long>(s.hits), static_cast<long long>(s.misses),
                       static_cast<long long>(s.entries));
}

PyObject* filter_cache_clear(PyObject*, PyObject*) {
  resconv::filter_cache_clear();
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"compiled_arch_list", compiled_arch_list, METH_NOARGS,
     "Architectures nvcc compiled the kernels for (its __CUDA_ARCH_LIST__, e.g. '800,900')."},
    {"probe_kernel_image", probe_kernel_image, METH_O,
     "probe_kernel_image(device: int) -> None if this build has kernels the CUDA device can run, else the "
     "CUDA error string."},
    {"dgrad_phases", dgrad_phases, METH_VARARGS,
     "dgrad_phases(size, pad, stride, dil, taps) -> [(first, count, tap0, taps, base, tap_step, out_step)] per "
     "stride phase of one spatial axis, as the dgrad kernels compute them."},
    {"tap_walk", tap_walk, METH_VARARGS,
     "tap_walk(kf, count, Cg, S, dil_h, dil_w, W, C, step) -> [(c, s, r, dh, dw, off)]: fprop's reduction walk."},
    {"phase_walk", phase_walk, METH_VARARGS,
     "phase_walk(count, n_kb, taps_w, tap0_h, tap0_w, tap_step_h, tap_step_w, out_step_h, out_step_w) -> "
     "[(kb, js, jr, dp, dq, r, s)]: dgrad's reduction walk of one phase."},
    {"pixel_walk", pixel_walk, METH_VARARGS,
     "pixel_walk(npq, count, P, Q, step) -> [(n, p, q)]: wgrad's walk over output pixels."},
    {"hopper_compiled", hopper_compiled, METH_NOARGS, "Whether this build holds the sm_90a (Hopper) kernels."},
    {"hopper_switch", hopper_switch, METH_NOARGS, "Whether the launchers consider the Hopper kernels."},
    {"set_hopper", set_hopper, METH_O, "set_hopper(on): switch the Hopper kernels on or off."},
    {"hopper_plan", hopper_plan, METH_VARARGS,
     "hopper_plan(*fields) -> None if the Hopper kernels serve the call, else the reason (csrc/hopper_plan.h; "
     "resconv.ops.cuda_extension.hopper_plan names the fields)."},
    {"filter_cache_stats", filter_cache_stats, METH_NOARGS,
     "filter_cache_stats() -> (hits, misses, entries) of the repacked-filter cache since the last clear."},
    {"filter_cache_clear", filter_cache_clear, METH_NOARGS,
     "filter_cache_clear(): drop every cached filter copy and zero the counters."},
    {"wgrad_split", wgrad_split, METH_VARARGS,
     "wgrad_split(npq, tiles, target_ctas, requested) -> (chunk, split): the wgrad kernels' split-K plan."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "resconv._C",
                          "resconv's CUDA C++ kernels; the ops are torch.ops.resconv.cuda_*", -1, methods};

}  // namespace

#define RESCONV_CAT2(a, b) a##b
#define RESCONV_CAT(a, b) RESCONV_CAT2(a, b)

PyMODINIT_FUNC RESCONV_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "STATS_TILE_ROWS", resconv::kStatsTileRows) < 0 ||
      PyModule_AddIntConstant(m, "WGRAD_ROWS", resconv::kWgradRows) < 0 ||
      PyModule_AddIntConstant(m, "WGRAD_MIN_CHUNK", resconv::kWgradMinChunk) < 0 ||
      PyModule_AddIntConstant(m, "WGRAD_MAX_SPLIT", resconv::kWgradMaxSplit) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
