"""Compiles the rating kernels (native/kernels.pyx) as part of every build.

Everything else about the package is in pyproject.toml; setuptools has no declarative
form for ext_modules, hence this file. `pip install .` and `pip install -e .` both run it.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("creditline.native.kernels", ["native/kernels.pyx"])],
        compiler_directives={"language_level": "3"},
    ),
)
