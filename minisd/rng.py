"""Seeded noise: a NumPy-only, bit-exact copy of PyTorch's CPU random generator.

``TorchGenerator(s).standard_normal(shape)`` returns exactly the bits of
``torch.randn(shape, generator=torch.Generator().manual_seed(s))`` on the CPU (float32, float64
and float16), and the generator state carries over between draws as torch's does, so a pipeline
that draws latents, then a VAE posterior sample, then forward noise, then one tensor per scheduler
step from one generator sees the same numbers as diffusers on the CPU. ``rand`` matches
``torch.rand``. ``get_state``/``set_state`` use torch's own 5056-byte state layout.

The algorithm, as in ATen (checked against torch 2.13, x86-64, bit for bit):

1. **Engine** (``aten/src/ATen/core/MT19937RNGEngine.h``): the standard 32-bit Mersenne Twister.
   ``manual_seed(s)`` keeps ``s mod 2**64`` as the seed and initialises the 624-word state from
   its low 32 bits only: ``x[0] = s & 0xffffffff``,
   ``x[j] = (1812433253 * (x[j-1] ^ (x[j-1] >> 30)) + j) mod 2**32``; the first draw twists.
   NumPy's ``MT19937`` bit generator implements the same twist and tempering, so we load that
   key with ``pos = 624`` and read 32-bit words with ``random_raw`` (vectorised C).
   ``random64()`` joins two words as ``(first << 32) | second``.
2. **Uniforms** (``core/TransformationHelper.h``, ``uniform_real``): float32 takes one word,
   ``u = (w & (2**24 - 1)) * 2**-24``; float64 takes ``random64()``,
   ``u = (w & (2**53 - 1)) * 2**-53``. Both lie in [0, 1).
3. **Normals, numel >= 16** (``native/cpu/DistributionTemplates.h``, ``normal_fill``): draw
   ``numel`` uniforms, then Box-Muller on each full chunk of 16 in place: for j < 8,
   ``u1 = 1 - d[j]``, ``u2 = d[j + 8]``, ``r = sqrt(-2 log u1)``, ``theta = 2 pi u2``,
   ``d[j] = r cos theta``, ``d[j + 8] = r sin theta``. When ``numel % 16 != 0`` the last 16
   outputs are *recomputed* from 16 fresh uniforms (overwriting part of the last full chunk);
   the leftover uniforms of the first pass are wasted. float16 keeps the float math but draws
   16 uniforms per chunk only (no waste), then casts.
   - float32/float16 on x86 run the AVX2 kernel (torch never registers an AVX-512 one for
     ``normal``): ``log256_ps``/``sincos256_ps`` of ``avx_mathfun.h`` (Cephes polynomials), as
     compiled by GCC with ``-mfma``, i.e. with every ``y * x + c`` of the source contracted into
     one fused multiply-add. We replay those float32 operations one by one, with an exact
     float32 FMA emulated in float64 (:func:`_fma32`); dropping the fusion changes ~1 % of the
     outputs by one ulp.
   - float64 calls libm ``log``, ``sin``, ``cos``; we call the same libm through ``math``
     (NumPy's own SIMD ``log`` differs from glibc in the last bit for ~0.3 % of inputs).
4. **Normals, numel < 16** (``core/DistributionsHelper.h``, ``normal_distribution<double>``):
   one element at a time in float64 whatever the tensor dtype: ``u1, u2`` uniform doubles,
   ``r = sqrt(-2 log1p(-u2))``, ``theta = 2 pi u1``, return ``r cos theta`` and *cache*
   ``r sin theta`` in the generator; the next small-path element uses the cache instead of
   drawing. The cache survives large draws (they neither use nor clear it) and is cleared by
   ``manual_seed``. Results are cast to the tensor dtype (float16 via float32, as c10::Half).

Not reproduced: ARM/PowerPC builds (their float32 kernel uses other log/sin/cos), x86 CPUs
without AVX2, non-unit mean/std, and torch's CUDA (Philox) generator: its layout depends on the
GPU's launch configuration and could not be checked against torch without a GPU.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from .errors import InputError

DEFAULT_SEED = 67280421310721  # torch.Generator().initial_seed() before any manual_seed
_N = 624  # Mersenne Twister state words
_STATE_BYTES = 5056  # sizeof(CPUGeneratorImplState): torch.Generator().get_state().numel()
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16))
_F = np.float32  # literals below are float32, as the _PS256_CONST tables of avx_mathfun.h
_LOG_P = [_F(v) for v in (7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1,
                          1.4249322787e-1, -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1,
                          3.3333331174e-1)]  # fmt: skip
_LOG_Q1, _LOG_Q2 = _F(-2.12194440e-4), _F(0.693359375)  # ln 2 = Q2 + Q1, split for accuracy
_SQRTHF = _F(0.707106781186547524)
_FOPI = _F(1.27323954473516)  # 4 / pi
_DP1, _DP2, _DP3 = _F(-0.78515625), _F(-2.4187564849853515625e-4), _F(-3.77489497744594108e-8)
_SIN_P = [_F(-1.9515295891e-4), _F(8.3321608736e-3), _F(-1.6666654611e-1)]
_COS_P = [_F(2.443315711809948e-005), _F(-1.388731625493765e-003), _F(4.166664568298827e-002)]
_TWO_PI = _F(2.0 * math.pi)  # _mm256_set1_ps(2.0f * c10::pi<double>)


def _check_seed(seed) -> int:
    """torch accepts Python ints in [-2**63, 2**64); negatives wrap modulo 2**64."""
    if isinstance(seed, bool | float):
        raise InputError(f"seed: expected an integer, got {type(seed).__name__} {seed!r}")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise InputError(f"seed: expected an integer, got {type(seed).__name__}") from None
    if not -(2**63) <= seed < 2**64:
        raise InputError(f"seed: {seed} is outside torch's range [-2**63, 2**64)")
    return seed % 2**64


def _mt_key(seed: int) -> np.ndarray:
    """MT19937 init_genrand on the low 32 bits of the seed (sequential, 623 steps)."""
    key = [seed & 0xFFFFFFFF]
    for j in range(1, _N):
        prev = key[-1]
        key.append((1812433253 * (prev ^ (prev >> 30)) + j) & 0xFFFFFFFF)
    return np.array(key, dtype=np.uint32)  # (624,)


def _check_size(size) -> tuple:
    shape = (size,) if isinstance(size, int | np.integer) else tuple(size)
    try:
        shape = tuple(operator.index(n) for n in shape)
    except TypeError:
        raise InputError(f"size: expected an int or a tuple of ints, got {size!r}") from None
    if any(n < 0 for n in shape):
        raise InputError(f"size: negative dimension in {shape}")
    return shape


def _check_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype) if dtype is not None else None  # np.dtype(None) is float64
    except TypeError:
        dt = None
    if dt is None or dt not in _DTYPES:
        raise InputError(f"dtype: {dtype!r} is not one of float32, float64, float16")
    return dt


def _fma32(a, b, c):
    """Fused multiply-add a * b + c with one float32 rounding, emulated in float64.

    a * b is exact in float64 (24 + 24 bits). s = fl64(a * b + c) can be a float32 midpoint
    while the exact sum is not; then round-to-even could go the wrong way (double rounding), so
    such s are first nudged one float64 ulp towards the exact sum (error term from TwoSum).
    """
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)  # exact
    c = np.asarray(c, np.float64)
    s = p + c
    t = s - p
    err = (p - (s - t)) + (c - t)  # TwoSum: s + err == p + c exactly
    # float32 midpoint: the 29 float64 mantissa bits below float32's 23 are exactly 100..0
    mid = (s.view(np.uint64) & np.uint64((1 << 29) - 1)) == np.uint64(1 << 28)
    bad = mid & (err != 0)
    if np.any(bad):
        s = np.where(bad, np.nextafter(s, np.copysign(np.inf, err)), s)
    return s.astype(np.float32)


def _log256_ps(x):
    """avx_mathfun.h ``log256_ps`` for x in (0, 1] (float32), FMA-contracted as compiled."""
    bits = x.view(np.int32)
    e = ((bits >> 23) - 127).astype(np.float32) + _F(1)  # exponent + 1
    m = ((bits & ~0x7F800000) | 0x3F000000).view(np.float32)  # mantissa in [0.5, 1)
    small = m < _SQRTHF  # if m < sqrt(1/2): e -= 1, x = 2m - 1, else x = m - 1
    e = e - np.where(small, _F(1), _F(0))
    x = (m + _F(-1)) + np.where(small, m, _F(0))
    z = x * x
    y = np.full_like(x, _LOG_P[0])
    for p in _LOG_P[1:]:  # Horner: y = y * x + p, fused
        y = _fma32(y, x, p)
    y = _fma32(y * x, z, e * _LOG_Q1)  # y = x^3 P(x) + e * q1
    y = _fma32(-z, _F(0.5), y)  # y -= z / 2
    return _fma32(e, _LOG_Q2, x + y)  # log = x + y + e * q2


def _sincos256_ps(x):
    """avx_mathfun.h ``sincos256_ps`` (Cephes sinf/cosf) for float32 x >= 0, FMA-contracted."""
    j = ((x * _FOPI).astype(np.int32) + 1) & ~1  # even octant index
    y = j.astype(np.float32)
    sign_sin = ((j & 4) << 29).astype(np.uint32)
    sign_cos = ((~(j - 2) & 4) << 29).astype(np.uint32)
    use_sin_poly = (j & 2) == 0  # for the sine; the cosine takes the other polynomial
    x = _fma32(y, _DP1, x)  # x - y pi/4 in three parts ("extended precision modular arith.")
    x = _fma32(y, _DP2, x)
    x = _fma32(y, _DP3, x)
    z = x * x
    yc = z * _fma32(_fma32(np.full_like(z, _COS_P[0]), z, _COS_P[1]), z, _COS_P[2])
    yc = _fma32(z, yc, -(z * _F(0.5))) + _F(1)  # cos x = 1 - z/2 + z^2 Q(z)
    ys = z * _fma32(_fma32(np.full_like(z, _SIN_P[0]), z, _SIN_P[1]), z, _SIN_P[2])
    ys = _fma32(x, ys, x)  # sin x = x + x z P(z)
    sin_part = np.where(use_sin_poly, ys, _F(0))  # the masked and/sub/add blend of the source
    cos_part = np.where(use_sin_poly, _F(0), yc)
    s = cos_part + sin_part
    c = (ys - sin_part) + (yc - cos_part)
    s = (s.view(np.uint32) ^ sign_sin).view(np.float32)
    c = (c.view(np.uint32) ^ sign_cos).view(np.float32)
    return s, c


def _box_muller16_f32(u):
    """AVX2 ``normal_fill_16`` on chunks of 16 float32 uniforms: (K, 16) -> (K, 16)."""
    u1 = _F(1) - u[:, :8]  # (K, 8)  [0, 1) -> (0, 1]
    radius = np.sqrt(_F(-2) * _log256_ps(u1))  # (K, 8)
    sin_t, cos_t = _sincos256_ps(_TWO_PI * u[:, 8:])  # (K, 8) each
    return np.concatenate([radius * cos_t + _F(0), radius * sin_t + _F(0)], axis=1)  # (K, 16)


def _box_muller16_f64(u):
    """Scalar ``normal_fill_16`` in float64 with libm: (K, 16) -> (K, 16)."""
    log_u1 = np.array([math.log(v) for v in (1.0 - u[:, :8]).ravel().tolist()])  # (8K,)
    radius = np.sqrt(-2.0 * log_u1).reshape(-1, 8)  # (K, 8)
    theta = ((2.0 * math.pi) * u[:, 8:]).ravel().tolist()  # 8K floats
    cos_t = np.array([math.cos(v) for v in theta]).reshape(-1, 8)  # (K, 8)
    sin_t = np.array([math.sin(v) for v in theta]).reshape(-1, 8)  # (K, 8)
    return np.concatenate([radius * cos_t + 0.0, radius * sin_t + 0.0], axis=1)  # (K, 16)


class TorchGenerator:
    """Bit-exact NumPy copy of ``torch.Generator()`` (CPU) for randn / rand.

    Draw methods follow NumPy's Generator (``standard_normal(size, dtype)``, ``random``) so
    callers can take either; ``randn(*shape)`` / ``rand`` follow torch.
    """

    def __init__(self, seed=DEFAULT_SEED):
        self._bits = np.random.MT19937()
        self.manual_seed(seed)

    def manual_seed(self, seed) -> TorchGenerator:
        """Reseed as ``torch.Generator.manual_seed``: new state, normal cache cleared."""
        self._seed = _check_seed(seed)
        self._bits.state = {
            "bit_generator": "MT19937",
            "state": {"key": _mt_key(self._seed), "pos": _N},
        }
        self._fresh = True  # torch writes next=0 (not 624) before the first draw
        self._next_double = None  # Box-Muller value cached by the small path
        self._next_float = None  # torch's float cache: unused by CPU randn, kept for state
        return self

    def initial_seed(self) -> int:
        return self._seed

    def __repr__(self):
        return f"TorchGenerator(seed={self._seed})"

    # ---- raw words and uniforms -------------------------------------------------------------

    def _words(self, n: int) -> np.ndarray:
        """n tempered 32-bit Mersenne Twister outputs (uint64 array)."""
        if n:
            self._fresh = False
        return self._bits.random_raw(n)  # (n,)

    def _uniform_f32(self, n: int) -> np.ndarray:
        w = self._words(n) & np.uint64((1 << 24) - 1)
        return w.astype(np.float32) * _F(2.0**-24)  # (n,) in [0, 1)

    def _uniform_f64(self, n: int) -> np.ndarray:
        w = self._words(2 * n).reshape(n, 2)  # (n, 2): random64 = (first << 32) | second
        w = ((w[:, 0] << np.uint64(32)) | w[:, 1]) & np.uint64((1 << 53) - 1)  # (n,)
        return w.astype(np.float64) * 2.0**-53  # (n,) in [0, 1)

    def rand(self, size=None, dtype=np.float32):
        """``torch.rand(size, generator=g, dtype=...)``: uniforms in [0, 1)."""
        shape, dt = _check_size(() if size is None else size), _check_dtype(dtype)
        n = math.prod(shape)
        if dt == np.float64:
            out = self._uniform_f64(n)
        else:
            out = self._uniform_f32(n).astype(dt)
            if dt == np.float16:  # a float rounded up to 1.0 becomes `from` (0) in torch
                out[out == 1] = 0
        out = out.reshape(shape)
        return out[()] if size is None else out

    random = rand  # numpy.random.Generator.random(size, dtype)

    # ---- normals -----------------------------------------------------------------------------

    def _normal_small(self, n: int) -> np.ndarray:
        """normal_distribution<double>, element by element, with the sin-value cache."""
        out = []
        while len(out) < n:
            if self._next_double is not None:
                out.append(self._next_double)
                self._next_double = None
                continue
            u1, u2 = self._uniform_f64(2).tolist()
            r = math.sqrt(-2.0 * math.log1p(-u2))
            theta = 2.0 * math.pi * u1
            self._next_double = r * math.sin(theta)
            out.append(r * math.cos(theta))
        return np.array(out, dtype=np.float64)  # (n,)

    def _normal_fill(self, n: int, dt: np.dtype) -> np.ndarray:
        """normal_fill for n >= 16: full chunks of 16, then the recomputed last 16."""
        k = n // 16
        if dt == np.float64:
            uniform, box_muller = self._uniform_f64, _box_muller16_f64
        else:
            uniform, box_muller = self._uniform_f32, _box_muller16_f32
        out = np.empty(n, dtype=np.float64 if dt == np.float64 else np.float32)
        # float32/float64 fill all n uniforms first; float16 fills chunk by chunk (no leftovers)
        u = uniform(n if dt != np.float16 else 16 * k)[: 16 * k]  # (16k,)
        out[: 16 * k] = box_muller(u.reshape(k, 16)).ravel()  # (16k,)
        if n % 16:
            out[n - 16 :] = box_muller(uniform(16).reshape(1, 16)).ravel()  # (16,)
        return out  # (n,)

    def standard_normal(self, size=None, dtype=np.float32):
        """``torch.randn(size, generator=g, dtype=...)``, bit for bit (numpy's call form)."""
        shape, dt = _check_size(() if size is None else size), _check_dtype(dtype)
        n = math.prod(shape)
        if n >= 16:
            out = self._normal_fill(n, dt).astype(dt, copy=False)
        else:  # float16 from double goes through float, as c10::Half(float(x))
            out = self._normal_small(n).astype(np.float32 if dt != np.float64 else dt).astype(dt)
        out = out.reshape(shape)
        return out[()] if size is None else out

    def randn(self, *shape, dtype=np.float32):
        """torch call form: ``randn(2, 4, 64, 64)`` or ``randn((2, 4, 64, 64))``."""
        if len(shape) == 1 and not isinstance(shape[0], int | np.integer):
            shape = shape[0]
        return self.standard_normal(tuple(shape), dtype=dtype)

    # ---- state in torch's layout -------------------------------------------------------------

    def get_state(self) -> np.ndarray:
        """Generator state as torch's ``get_state()`` bytes (uint8, 5056): interchangeable."""
        st = self._bits.state["state"]
        pos = int(st["pos"])
        buf = np.zeros(_STATE_BYTES, dtype=np.uint8)
        buf[0:8] = np.array([self._seed], "<u8").view(np.uint8)
        left, nxt = (1, 0 if self._fresh else _N) if pos == _N else (_N + 1 - pos, pos)
        buf[8:16] = np.array([left, 1], "<i4").view(np.uint8)  # left, seeded
        buf[16:24] = np.array([nxt], "<u8").view(np.uint8)
        buf[24:5016] = np.asarray(st["key"], "<u8").view(np.uint8)  # (4992,)
        if self._next_double is not None:  # legacy normal_y + normal_is_valid
            buf[5024:5032] = np.array([self._next_double], "<f8").view(np.uint8)
            buf[5040:5044] = np.array([1], "<i4").view(np.uint8)
        if self._next_float is not None:
            buf[5044:5048] = np.array([self._next_float], "<f4").view(np.uint8)
            buf[5048] = 1
        return buf

    def set_state(self, state) -> None:
        """Load bytes from :meth:`get_state` or ``torch.Generator.get_state().numpy()``."""
        buf = np.ascontiguousarray(np.asarray(state)).reshape(-1)
        if buf.dtype != np.uint8 or buf.size != _STATE_BYTES:
            raise InputError(
                f"state: expected {_STATE_BYTES} uint8 bytes, got {buf.size} of {buf.dtype}"
            )
        left, _seeded = buf[8:16].view("<i4").tolist()
        nxt = int(buf[16:24].view("<u8")[0])
        key = buf[24:5016].view("<u8")
        if not (1 <= left <= _N and 0 <= nxt <= _N) or np.any(key >> np.uint64(32)):
            raise InputError("state: not a torch CPU generator state (bad left/next/key words)")
        pos = _N if left == 1 else nxt
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}
        self._seed = int(buf[0:8].view("<u8")[0])
        self._fresh = left == 1 and nxt == 0
        valid = buf[5040:5044].view("<i4")[0]
        self._next_double = float(buf[5024:5032].view("<f8")[0]) if valid else None
        self._next_float = float(buf[5044:5048].view("<f4")[0]) if buf[5048] else None


def make_rng(seed=None, kind="torch"):
    """A seeded noise source with ``standard_normal(size, dtype)``.

    kind "torch": :class:`TorchGenerator` (torch.randn on the CPU, bit for bit; seed None uses
    torch's default seed); "numpy": ``numpy.random.default_rng(seed)``.
    """
    if kind == "torch":
        return TorchGenerator(DEFAULT_SEED if seed is None else seed)
    if kind == "numpy":
        return np.random.default_rng(seed)
    raise InputError(f"kind: {kind!r} is not one of 'torch', 'numpy'")


def standard_normal(rng, shape, dtype):
    """Standard normal numbers of ``shape`` in ``dtype`` (float16 via float32 for numpy, which
    draws no float16; minisd's TorchGenerator draws torch's own float16 numbers) from ``rng``:
    None or an int seed (a fresh numpy Generator), a numpy Generator, or any object with
    ``standard_normal(shape, dtype=)`` or ``randn(shape)``."""
    if rng is None or isinstance(rng, (int, np.integer)):
        rng = np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):  # numpy draws float32 / float64 only
        native = dtype if dtype in (np.float32, np.float64) else np.float32
        return rng.standard_normal(shape, dtype=native)
    if callable(getattr(rng, "standard_normal", None)):  # e.g. minisd.rng.TorchGenerator
        return rng.standard_normal(shape, dtype=dtype)
    if callable(getattr(rng, "randn", None)):
        return rng.randn(shape)
    raise InputError(
        f"rng={rng!r}: expected None, an int seed, a numpy Generator or an object with "
        "standard_normal(shape, dtype=...) / randn(shape)"
    )
