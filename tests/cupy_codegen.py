"""The CUDA source CuPy would compile for minisd's kernels, generated without a GPU.

CuPy builds an ``ElementwiseKernel`` / ``ReductionKernel`` at its first call, from the argument
types, with private code generators of ``cupy._core`` that need no device. Calling them here
with the argument kinds minisd passes (arrays of the model dtype, float32 statistics, scalars)
gives the exact kernel source, which the tests compile with nvcc against CuPy's own headers:
what a GPU would build first, checked on a machine without one. ``source()`` raises
``CodegenUnavailable`` when CuPy is missing or its private API changed.
"""

from __future__ import annotations

import os

import numpy as np

# Parameters minisd passes as scalars (besides every int32 one); the others get arrays.
SCALARS = {"alpha", "eps", "inv_n"}
HEADER = "#include <cupy/complex.cuh>\n#include <cupy/carray.cuh>\n#include <cupy/atomics.cuh>\n"


# The reduction template's index type, which CuPy's launcher defines outside the generated
# function (int for 32-bit indexing); given here as the preamble.
INDEX_T = "typedef int IndexT;"


class CodegenUnavailable(RuntimeError):
    pass


def _cupy():
    try:
        import cupy
        import cupy._core._kernel as kernel
        import cupy._core._reduction as reduction
        from cupy._core import _carray, _scalar
    except Exception as err:  # not installed, or internals moved
        raise CodegenUnavailable(f"CuPy's code generators cannot be imported: {err}") from err
    return cupy, kernel, reduction, _carray, _scalar


def include_dir():
    cupy = _cupy()[0]
    return os.path.join(os.path.dirname(cupy.__file__), "_core", "include")


def elementwise_source(name, spec, dtype, ndim=4):
    """CUDA source of ``cupy.ElementwiseKernel(*spec, name)`` with T = ``dtype``."""
    cupy, K, _, carray, scalar = _cupy()
    in_params, out_params, body = spec
    try:
        params = K._get_param_info(in_params, True) + K._get_param_info(out_params, False)
        params += (K.ParameterInfo("CIndexer _ind", False),)
        infos = tuple(_info(K, cupy, scalar, p, dtype, ndim) for p in params[:-1])
        infos += (K._ArgInfo(2, carray.Indexer, None, ndim, True, True),)  # the indexer
        types = K._TypeMap((("T", np.dtype(dtype).type),))
        code = K._get_elementwise_kernel_code(infos, types, params, body, name, "")
    except (AttributeError, TypeError, AssertionError) as err:
        raise CodegenUnavailable(f"CuPy {cupy.__version__}: private API changed ({err})") from err
    return HEADER + code


def reduction_source(name, spec, dtype, block_size=512):
    """CUDA source of ``cupy.ReductionKernel(*spec, name)`` over the last axis of 2-D input,
    T = ``dtype``."""
    cupy, K, R, carray, scalar = _cupy()
    in_params, out_params, map_expr, reduce_expr, post_map, identity = spec
    try:
        ins, outs = K._get_param_info(in_params, True), K._get_param_info(out_params, False)
        params = ins + outs + K._get_param_info("CIndexer _in_ind, CIndexer _out_ind", False)
        params += K._get_param_info("int32 _block_stride", True)
        infos = tuple(_info(K, cupy, scalar, p, dtype, 2) for p in ins)
        infos += tuple(_info(K, cupy, scalar, p, dtype, 1) for p in outs)
        infos += (K._ArgInfo(2, carray.Indexer, None, 2, True, True),)
        infos += (K._ArgInfo(2, carray.Indexer, None, 1, True, True),)
        infos += (K._ArgInfo(3, scalar.CScalar, np.int32, 0, True, True),)
        reduce_type = scalar.get_typename(outs[0].dtype)
        code = R._ReductionKernel_get_cached_function_code(
            len(ins), len(outs), params, infos, K._TypeMap((("T", np.dtype(dtype).type),)),
            name, block_size, reduce_type,
            identity, map_expr, reduce_expr, post_map, INDEX_T, (),
        )  # fmt: skip
    except (AttributeError, TypeError, AssertionError) as err:
        raise CodegenUnavailable(f"CuPy {cupy.__version__}: private API changed ({err})") from err
    return HEADER + code


def _info(K, cupy, scalar, p, dtype, ndim):
    """The argument CuPy would see for parameter ``p``: a scalar, or a (strided) array (a raw
    parameter too: the whole array)."""
    t = np.dtype(dtype).type if p.ctype == "T" else p.dtype
    if p.name in SCALARS or (not p.raw and p.dtype == np.int32):
        return K._ArgInfo(3, scalar.CScalar, t, 0, True, True)
    return K._ArgInfo(1, cupy.ndarray, t, ndim, False, True)
