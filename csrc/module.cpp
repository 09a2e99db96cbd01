// The Python module resconv._C: loading it registers the ops (ops.cpp) and, through
// resconv.ops.cuda, their fake implementations and autograd; it also exposes the few facts the
// Python side needs. Plain CPython API (no pybind11 / torch/extension.h, which
// cost a minute of compile time). TORCH_EXTENSION_NAME is `_C` for the ahead-of-time build
// and the (versioned) JIT name otherwise.
#include <Python.h>

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

PyMethodDef methods[] = {
    {"compiled_arch_list", compiled_arch_list, METH_NOARGS,
     "Architectures nvcc compiled the kernels for (its __CUDA_ARCH_LIST__, e.g. '800,900')."},
    {"probe_kernel_image", probe_kernel_image, METH_O,
     "probe_kernel_image(device: int) -> None if this build has kernels the CUDA device can run, else the "
     "CUDA error string."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "resconv._C",
                          "resconv's CUDA C++ kernels; the ops are torch.ops.resconv.cuda_*", -1, methods};

}  // namespace

#define RESCONV_CAT2(a, b) a##b
#define RESCONV_CAT(a, b) RESCONV_CAT2(a, b)

PyMODINIT_FUNC RESCONV_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "STATS_TILE_ROWS", resconv::kStatsTileRows) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  // The ops' fake implementations and autograd live in resconv.ops.cuda (the module ops.cpp
  // names with set_python_module). Registering them here gives them to every way of loading
  // the extension: just in time, ahead of time, or a bare `import resconv._C`.
  PyObject* registrations = PyImport_ImportModule("resconv.ops.cuda");
  PyObject* done =
      registrations == nullptr ? nullptr : PyObject_CallMethod(registrations, "_register_once", "O", m);
  Py_XDECREF(registrations);
  if (done == nullptr) {
    Py_DECREF(m);
    return nullptr;
  }
  Py_DECREF(done);
  return m;
}
