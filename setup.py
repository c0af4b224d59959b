"""The one compiled part of distill: the top-k range coder of layouts 3 and 4
(distill/corpus/_topk_coder.c, loaded by distill/corpus/topk_coder.py through ctypes). Everything
else is declared in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("distill.corpus._topk_coder", ["distill/corpus/_topk_coder.c"], extra_compile_args=["-O2"])])
