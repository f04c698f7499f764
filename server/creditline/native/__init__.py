"""Rating kernels: compiled (kernels.pyx) and the pure-Python twin (kernels_py.py)."""
