"""``cupy.ElementwiseKernel`` on the CPU: the kernel body, compiled by the host C++ compiler.

``ElementwiseKernel(in_params, out_params, body, name)`` returns a callable that broadcasts its
operands like a ufunc and runs ``body`` once per element, as CuPy does on a GPU: parameters are
declared as in CuPy (``T x, float32 alpha``), ``T`` takes the dtype of the first array bound to
it, float16 is the compiler's ``_Float16``. The body is the very string minisd gives CuPy, so
its arithmetic (float32 math on float16 data, expf, erff) is tested here without a GPU. What it
cannot check: CuPy's code generation around the body and the CUDA compiler (tests compile
CuPy's generated source with nvcc when one is installed, see cupy_codegen.py).
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
    """'T x, float32 alpha' -> [('T', 'x'), ('float32', 'alpha')] ("raw" dropped: _raw)."""
    return [tuple(p.split()[-2:]) for p in spec.split(",")]


def _raw(spec):
    """Names of the ``raw`` parameters: whole arrays, indexed by the body with a flat index."""
    return {p.split()[-1] for p in spec.split(",") if p.split()[0] == "raw"}


def _source(ins, outs, body, tname, raw=()):
    args = [f"const {_c(t, tname)}* p_{n}" for t, n in ins]
    args += [f"{_c(t, tname)}* p_{n}" for t, n in outs]
    whole = "".join(f"const {_c(t, tname)}* {n} = p_{n}; " for t, n in ins if n in raw)
    loads = "".join(f"const {_c(t, tname)} {n} = p_{n}[i]; " for t, n in ins if n not in raw)
    decls = "".join(f"{_c(t, tname)} {n}; " for t, n in outs)
    stores = "".join(f"p_{n}[i] = {n}; " for _, n in outs)
    return (
        "#include <math.h>\n"
        f"typedef {_CTYPES[tname]} T;\n"
        f'extern "C" void run(long n_, {", ".join(args)}) {{\n  {whole}\n'
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


def _bind(kernel, params, args):
    """Host arrays for ``args`` and the name of T. Arrays must have their parameter's dtype (all
    T-bound ones the same), as CuPy requires; scalars are cast."""
    if len(args) != len(params):
        raise TypeError(f"{kernel}: {len(params)} arguments, got {len(args)}")
    bound = [(t, a) for (t, _), a in zip(params, args) if isinstance(a, np.ndarray)]
    tname = next((a.dtype.name for t, a in bound if t == "T"), "float32")  # (T unused: any)
    for t, a in bound:
        if a.dtype.name != (tname if t == "T" else t):
            raise TypeError(f"{kernel}: {a.dtype} array for a {t} parameter ({tname})")
    arrays = [np.asarray(a.view(np.ndarray) if isinstance(a, np.ndarray) else a) for a in args]
    return arrays, tname


def _typed(params, arrays, tname, shape, raw=()):
    """Contiguous copies of ``arrays`` broadcast to ``shape`` (raw ones as they are), in their
    parameters' C types."""
    typed = []
    for (t, n), a in zip(params, arrays):
        a = a.astype(tname if t == "T" else t)
        typed.append(np.ascontiguousarray(a if n in raw else np.broadcast_to(a, shape)))
    return typed


def _ptrs(arrays):
    return [ctypes.c_void_p(a.ctypes.data) for a in arrays]


class ElementwiseKernel:
    """CPU stand-in for cupy.ElementwiseKernel (see the module docstring)."""

    def __init__(self, in_params, out_params, operation, name="kernel"):
        if CXX is None:
            raise RuntimeError("no C++ compiler: fake ElementwiseKernel unavailable")
        self.ins, self.outs = _params(in_params), _params(out_params)
        self.body, self.name, self.raw = operation, name, _raw(in_params)

    def __call__(self, *args):
        """Inputs, then optionally the outputs to write (which may bind T), as in CuPy."""
        given = args[len(self.ins) :]
        if given and len(given) != len(self.outs):
            raise TypeError(f"{self.name}: outputs must be given all or none")
        params = self.ins + self.outs[: len(given)]
        arrays, tname = _bind(self.name, params, args)
        shape = np.broadcast_shapes(
            *(a.shape for (_, n), a in zip(params, arrays) if n not in self.raw)
        )
        typed = _typed(self.ins, arrays[: len(self.ins)], tname, shape, self.raw)
        outs = [np.empty(shape, tname if t == "T" else t) for t, _ in self.outs]
        fn = _build(self.source(tname))
        fn(ctypes.c_long(int(np.prod(shape))), *_ptrs(typed + outs))
        if given:
            for dst, src in zip(arrays[len(self.ins) :], outs):
                np.copyto(dst, src)
            outs = list(given)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def source(self, tname):
        """The C++ the body is compiled in, T = ``tname``: one loop over the elements."""
        return _source(self.ins, self.outs, self.body, tname, self.raw)


class ReductionKernel:
    """CPU stand-in for cupy.ReductionKernel, reducing over the last axis (what minisd uses):
    a = identity; a = reduce(a, map(element)) along the axis, as partial results over blocks of
    512 elements then reduced (a GPU block's threads, roughly); then post_map(a). As in CuPy,
    array parameters exist inside the loop only, scalar ones everywhere (post_map too)."""

    def __init__(self, in_params, out_params, map_expr, reduce_expr, post_map, identity, name):
        if CXX is None:
            raise RuntimeError("no C++ compiler: fake ReductionKernel unavailable")
        self.ins, self.outs = _params(in_params), _params(out_params)
        self.exprs, self.name = (map_expr, reduce_expr, post_map, identity), name

    def __call__(self, *args, axis=None, keepdims=False):
        if axis not in (-1,):
            raise NotImplementedError(f"{self.name}: the fake reduces over axis -1 only")
        arrays, tname = _bind(self.name, self.ins, args)
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
        typed = _typed(self.ins, arrays, tname, shape)
        rows, n = int(np.prod(shape[:-1])), shape[-1]
        ((ot, _),) = self.outs
        out = np.empty(shape[:-1] + ((1,) if keepdims else ()), tname if ot == "T" else ot)
        scalars = {n for (_, n), a in zip(self.ins, args) if not isinstance(a, np.ndarray)}
        fn = _build(self.source(tname, scalars))
        fn(ctypes.c_long(rows), ctypes.c_long(n), *_ptrs(typed + [out]))
        return out

    def source(self, tname, scalars=()):
        """The C++ the expressions are compiled in: a loop over rows, one over each row;
        ``scalars``: the parameters given as scalars."""
        ((ot, oname),) = self.outs
        otype = _c(ot, tname)
        map_expr, reduce_expr, post_map, identity = self.exprs
        args = [f"const {_c(t, tname)}* p_{n}" for t, n in self.ins] + [f"{otype}* p_{oname}"]
        ins = [(_c(t, tname), n) for t, n in self.ins]
        consts = "".join(f"const {c} {n} = p_{n}[0]; " for c, n in ins if n in scalars)
        loads = "".join(f"const {c} {n} = p_{n}[i]; " for c, n in ins if n not in scalars)
        return (  # per row: partial results over blocks of 512, then reduced (as a GPU block)
            "#include <math.h>\n"
            f"typedef {_CTYPES[tname]} T;\n#define REDUCE(a, b) ({reduce_expr})\n"
            f'extern "C" void run(long rows, long n_, {", ".join(args)}) {{\n  {consts}\n'
            f"  for (long r = 0; r < rows; ++r) {{\n    {otype} a = ({identity});\n"
            f"    for (long i0 = r * n_; i0 < (r + 1) * n_; i0 += 512) {{\n"
            f"      {otype} part = ({identity});\n"
            f"      for (long i = i0; i < i0 + 512 && i < (r + 1) * n_; ++i) {{ {loads}\n"
            f"        part = REDUCE(part, ({otype})({map_expr})); }}\n"
            f"      a = REDUCE(a, part); }}\n"
            f"    {otype} {oname}; {post_map}; p_{oname}[r] = {oname};\n  }}\n}}\n"
        )
