"""Imports the native module ``ferrovlm._core`` (the package's first import of it).

A CUDA build links the CUDA runtime (libcudart.so.13, through candle's kernels; the driver itself is opened only
when a GPU is asked for). When the loader cannot find it, it is looked for in PyPI's nvidia packages
(``nvidia-cuda-runtime``, which torch also installs), loaded, and the import tried again; failing that, the
ImportError says what to install. A CPU build imports directly.
"""

from __future__ import annotations

import ctypes
import glob
import os
import site
import sys


def _load() -> None:
    try:
        from . import _core  # noqa: F401
    except ImportError as e:
        if "libcudart" not in str(e):
            raise
        roots = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
        found = [p for r in roots for p in glob.glob(os.path.join(r, "nvidia", "*", "lib", "libcudart.so.1*"))]
        for lib in found:
            try:
                ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            from . import _core  # noqa: F401, F811

            return
        raise ImportError(
            f"{e}: this ferrovlm was built with CUDA and needs the CUDA 13 runtime: pip install "
            "'nvidia-cuda-runtime==13.0.*' (or put a CUDA toolkit's lib64 on LD_LIBRARY_PATH)"
        ) from e


_load()
