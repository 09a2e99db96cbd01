"""Without a GPU, run resconv's Triton kernels in the interpreter: the mode must be chosen
before triton is imported, so it is set here, before the benchmark files import resconv. No
CUDA query: the NVIDIA driver library is looked up instead."""
import ctypes.util
import os

if "TRITON_INTERPRET" not in os.environ and ctypes.util.find_library("cuda") is None:
    os.environ["TRITON_INTERPRET"] = "1"
