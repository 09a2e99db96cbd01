"""Build script: everything is declared in pyproject.toml; `pip install -e .` is pure Python.

With RESCONV_BUILD_CUDA=1 (and `pip install --no-build-isolation`, so that the installed
torch is used) the CUDA C++ extension resconv._C is compiled ahead of time, for the
architectures in TORCH_CUDA_ARCH_LIST (default "8.0;9.0"). Only then is torch imported.
"""
import importlib.util
import os

from setuptools import setup


def cuda_extension_kwargs() -> dict:
    if os.environ.get("RESCONV_BUILD_CUDA", "0") != "1":
        return {}
    # resconv/build.py loaded as a plain file: importing the package would need its dependencies.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resconv", "build.py")
    spec = importlib.util.spec_from_file_location("_resconv_build", path)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build.setup_kwargs()


setup(**cuda_extension_kwargs())
