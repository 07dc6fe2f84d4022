"""``cupy.ElementwiseKernel`` on the CPU: the kernel body, compiled by the host C++ compiler.

``ElementwiseKernel(in_params, out_params, body, name)`` returns a callable that broadcasts its
operands like a ufunc and runs ``body`` once per element, as CuPy does on a GPU: parameters are
declared as in CuPy (``T x, float32 alpha``), ``T`` takes the dtype of the first array bound to
it, float16 is the compiler's ``_Float16``. The body is the very string minisd gives CuPy, so
its arithmetic (float32 math on float16 data, expf, erff) is tested here without a GPU. What it
cannot check: CuPy's code generation around the body and the CUDA compiler (tests compile the
bodies with nvcc too when one is installed).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import numpy as np

CXX = shutil.which("g++") or shutil.which("c++")
_CTYPES = {"float16": "_Float16", "float32": "float", "float64": "double", "int32": "int"}
_DIR = tempfile.mkdtemp(prefix="minisd-fake-kernels-")
_built: dict = {}


def _params(spec):
    """'T x, float32 alpha' -> [('T', 'x'), ('float32', 'alpha')]."""
    return [tuple(p.split()) for p in spec.split(",")]


def _source(ins, outs, body, tname):
    args = [f"const {_c(t, tname)}* p_{n}" for t, n in ins]
    args += [f"{_c(t, tname)}* p_{n}" for t, n in outs]
    loads = "".join(f"const {_c(t, tname)} {n} = p_{n}[i]; " for t, n in ins)
    decls = "".join(f"{_c(t, tname)} {n}; " for t, n in outs)
    stores = "".join(f"p_{n}[i] = {n}; " for _, n in outs)
    return (
        "#include <math.h>\n"
        f"typedef {_CTYPES[tname]} T;\n"
        f'extern "C" void run(long n_, {", ".join(args)}) {{\n'
        f"  for (long i = 0; i < n_; ++i) {{ {loads}{decls}\n    {body}\n    {stores}}}\n}}\n"
    )


def _c(t, tname):
    return "T" if t == "T" else _CTYPES[t]


def _build(source):
    key = hashlib.sha1(source.encode()).hexdigest()[:16]
    if key not in _built:
        src, lib = os.path.join(_DIR, f"{key}.cpp"), os.path.join(_DIR, f"{key}.so")
        with open(src, "w") as f:
            f.write(source)
        cmd = [CXX, "-O1", "-shared", "-fPIC", "-o", lib, src]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"kernel does not compile:\n{done.stderr}\n{source}")
        _built[key] = ctypes.CDLL(lib).run
    return _built[key]


class ElementwiseKernel:
    """CPU stand-in for cupy.ElementwiseKernel (see the module docstring)."""

    def __init__(self, in_params, out_params, operation, name="kernel"):
        if CXX is None:
            raise RuntimeError("no C++ compiler: fake ElementwiseKernel unavailable")
        self.ins, self.outs, self.body, self.name = (
            _params(in_params),
            _params(out_params),
            operation,
            name,
        )

    def __call__(self, *args):
        """Arrays must have their parameter's dtype (all T-bound ones the same), as CuPy
        requires; scalars are cast."""
        if len(args) != len(self.ins):
            raise TypeError(f"{self.name}: {len(self.ins)} arguments, got {len(args)}")
        bound = [(t, a) for (t, _), a in zip(self.ins, args) if isinstance(a, np.ndarray)]
        tname = next(a.dtype.name for t, a in bound if t == "T")
        for t, a in bound:
            if a.dtype.name != (tname if t == "T" else t):
                raise TypeError(f"{self.name}: {a.dtype} array for a {t} parameter ({tname})")
        arrays = [np.asarray(a.view(np.ndarray) if isinstance(a, np.ndarray) else a) for a in args]
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
        typed = [
            np.ascontiguousarray(np.broadcast_to(a.astype(tname if t == "T" else t), shape))
            for (t, _), a in zip(self.ins, arrays)
        ]
        outs = [np.empty(shape, tname if t == "T" else t) for t, _ in self.outs]
        fn = _build(_source(self.ins, self.outs, self.body, tname))
        ptrs = [ctypes.c_void_p(a.ctypes.data) for a in typed + outs]
        fn(ctypes.c_long(int(np.prod(shape))), *ptrs)
        return outs[0] if len(outs) == 1 else tuple(outs)
