"""Compiles the rating kernels (native/kernels.pyx), the Diameter codec
(native/diameter_codec.pyx) and the OTLP span encoder (native/otlp_spans.pyx) as part of
every build.

Everything else about the package is in pyproject.toml; setuptools has no declarative
form for ext_modules, hence this file. `pip install .` and `pip install -e .` both run it.
"""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [Extension("creditline.native.kernels", ["native/kernels.pyx"]),
         Extension("creditline.native.diameter_codec", ["native/diameter_codec.pyx"]),
         Extension("creditline.native.otlp_spans", ["native/otlp_spans.pyx"])],
        compiler_directives={"language_level": "3"},
    ),
)
