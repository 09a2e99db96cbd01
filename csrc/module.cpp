// The Python module resconv._C: loading it registers the ops' kernels (ops.cpp; their schemas,
// fakes and autograd are Python's, resconv/ops/cuda.py); it also exposes the few facts the
// Python side needs. Plain CPython API (no pybind11 / torch/extension.h, which
// cost a minute of compile time). TORCH_EXTENSION_NAME is `_C` for the ahead-of-time build
// and the (versioned) JIT name otherwise.
#include <Python.h>

#include "conv_backward_plan.h"
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

PyMethodDef methods[] = {
    {"compiled_arch_list", compiled_arch_list, METH_NOARGS,
     "Architectures nvcc compiled the kernels for (its __CUDA_ARCH_LIST__, e.g. '800,900')."},
    {"probe_kernel_image", probe_kernel_image, METH_O,
     "probe_kernel_image(device: int) -> None if this build has kernels the CUDA device can run, else the "
     "CUDA error string."},
    {"dgrad_phases", dgrad_phases, METH_VARARGS,
     "dgrad_phases(size, pad, stride, dil, taps) -> [(first, count, tap0, taps, base, tap_step, out_step)] per "
     "stride phase of one spatial axis, as the dgrad kernels compute them."},
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
