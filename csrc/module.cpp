// The Python module logo_kernels._C. Importing it runs the static TORCH_LIBRARY registrations in
// ops.cpp; the module itself exposes nothing. (torch must be imported first so libtorch is loaded.)
#include <Python.h>

static struct PyModuleDef logo_kernels_c_module = {PyModuleDef_HEAD_INIT, "_C",
                                                   "CPU kernels registered as torch.ops.logo_kernels", -1,
                                                   nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&logo_kernels_c_module); }
