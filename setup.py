"""Build script: everything is declared in pyproject.toml; `pip install -e .` is pure Python."""
from setuptools import setup

setup()
