"""minisd.rng.TorchGenerator against torch's CPU generator, bit for bit.

Every comparison is exact (same dtype, same shape, same bytes): torch.randn / torch.rand with
``torch.Generator().manual_seed(seed)`` versus our NumPy reimplementation, for fresh generators
and for long mixed sequences of draws from one generator (state and Box-Muller cache carried).
"""

import math
from fractions import Fraction

import numpy as np
import pytest
from refharness import need

from minisd.errors import InputError
from minisd.rng import DEFAULT_SEED, TorchGenerator, _fma32, make_rng

# 20 seeds: small, 32-bit edges, above 2**32 (only the low 32 bits seed the twister), 64-bit
# edges, and negatives (torch wraps them modulo 2**64).
SEEDS = [0, 1, 2, 3, 7, 42, 123, 1234, 31337, 65537, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
         2**32 + 5, 2**53 + 1, 2**63 - 1, 2**64 - 1, -1, -(2**63)]  # fmt: skip
# 57 shapes: the scalar path (< 16 elements), the 16-chunk boundaries and their tails, latents.
SHAPES = [(), (0,), (2, 0, 3)] + [(n,) for n in range(1, 19)] + [
    (n,) for n in (31, 32, 33, 47, 48, 49, 63, 64, 65, 100, 127, 128, 129, 255, 256, 257, 1000,
                   1023, 1024, 1025, 4097)  # fmt: skip
] + [(2, 3), (3, 5), (2, 2, 4), (5, 7), (4, 64, 64), (2, 4, 64, 64), (1, 4, 96, 40),
     (1, 4, 24, 40), (3, 4, 8, 8), (1, 4, 13, 17), (2, 4, 128, 128), (1, 1, 1, 1),
     (7, 11, 13)]  # fmt: skip
DTYPES = ["float32", "float64"]


def _torch():
    return need("torch")


def _same_bits(ours, ref, what):
    """Exact equality: dtype, shape and every byte (so -0.0 != 0.0 and NaNs would count)."""
    assert isinstance(ours, np.ndarray), f"{what}: got {type(ours).__name__}"
    assert ours.dtype == ref.dtype, f"{what}: dtype {ours.dtype} != {ref.dtype}"
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    a, b = ours.reshape(-1).view(np.uint8), ref.reshape(-1).view(np.uint8)
    if not np.array_equal(a, b):
        bad = np.flatnonzero(ours.reshape(-1) != ref.reshape(-1))
        raise AssertionError(f"{what}: {bad.size} of {ref.size} differ, first at {bad[:5]}")


def _torch_randn(torch, gen, shape, dtype):
    return torch.randn(shape, generator=gen, dtype=getattr(torch, dtype)).numpy()


@pytest.mark.parametrize("dtype", DTYPES + ["float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_randn_fresh_generator(shape, dtype):
    torch = _torch()
    i = SHAPES.index(shape)
    for seed in (SEEDS[i % 20], SEEDS[(i + 7) % 20]):
        ref = _torch_randn(torch, torch.Generator().manual_seed(seed), shape, dtype)
        ours = TorchGenerator(seed).standard_normal(shape, dtype=dtype)
        _same_bits(np.asarray(ours), ref, f"seed {seed} shape {shape} {dtype}")


@pytest.mark.parametrize("seed", SEEDS)
def test_mixed_sequence_from_one_generator(seed):
    """All shapes, both dtypes, randn and rand interleaved, from one generator per side."""
    torch = _torch()
    gen, ours = torch.Generator().manual_seed(seed), TorchGenerator(seed)
    for i, shape in enumerate(SHAPES):
        dtype = DTYPES[(i + seed) % 2]
        what = f"draw {i}: seed {seed} shape {shape} {dtype}"
        if i % 5 == 4:
            ref = torch.rand(shape, generator=gen, dtype=getattr(torch, dtype)).numpy()
            _same_bits(np.asarray(ours.rand(shape, dtype)), ref, "rand " + what)
        else:
            ref = _torch_randn(torch, gen, shape, dtype)
            _same_bits(np.asarray(ours.randn(shape, dtype=dtype)), ref, "randn " + what)
    _same_bits(ours.get_state(), gen.get_state().numpy(), f"state after seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_million_elements(dtype):
    torch = _torch()
    for seed in (0, 2**63 - 1):
        ref = _torch_randn(torch, torch.Generator().manual_seed(seed), (10**6,), dtype)
        _same_bits(TorchGenerator(seed).randn(10**6, dtype=dtype), ref, f"1e6 seed {seed}")


def test_pipeline_like_sequence():
    """Latents, a VAE posterior sample, forward noise, then one tensor per scheduler step."""
    torch = _torch()
    gen, ours = torch.Generator().manual_seed(1234), TorchGenerator(1234)
    shapes = [(2, 4, 64, 64), (1, 4, 64, 64), (2, 4, 64, 64)] + [(2, 4, 64, 64)] * 5
    for k, shape in enumerate(shapes):
        _same_bits(ours.standard_normal(shape), _torch_randn(torch, gen, shape, "float32"), k)


def test_small_path_cache_carried_and_reset():
    """Small draws cache r sin(theta); big draws neither use nor clear it; manual_seed does."""
    torch = _torch()
    gen, ours = torch.Generator().manual_seed(5), TorchGenerator(5)
    plan = [(1, "float32"), (20, "float32"), (1, "float64"), (3, "float64"), (16, "float64"),
            (2, "float16"), (5, "float32"), (1, "float32")]  # fmt: skip
    for n, dtype in plan:
        _same_bits(ours.randn(n, dtype=dtype), _torch_randn(torch, gen, (n,), dtype), (n, dtype))
    ours.randn(1)  # leaves a cached value ...
    gen.manual_seed(9)
    ours.manual_seed(9)  # ... which reseeding must drop
    _same_bits(ours.randn(3), _torch_randn(torch, gen, (3,), "float32"), "after reseed")


def test_cache_pairs_without_torch():
    """Box-Muller pairs: two size-1 draws give the values of one size-2 draw."""
    a = TorchGenerator(77)
    b = TorchGenerator(77)
    pair = a.randn(2, dtype=np.float64)
    assert pair[0] == b.randn(1, dtype=np.float64)[0]
    assert pair[1] == b.randn(1, dtype=np.float64)[0]
    assert a.randn(4).tolist() == b.randn(4).tolist()


def test_known_values_without_torch():
    """torch.randn with manual_seed(0)/(42): bits recorded from torch 2.13."""
    small = TorchGenerator(0).randn(4).view(np.uint32)  # the famous [1.5410, -0.2934, ...]
    assert [hex(x) for x in small.tolist()] == ["0x3fc53f5c", "0xbe963c50", "0xc00b7149",
                                                 "0x3f1184b6"]  # fmt: skip
    big = TorchGenerator(0).randn(17).view(np.uint32)  # AVX2 Box-Muller + recomputed tail
    assert [hex(x) for x in big[[0, 7, 15, 16]].tolist()] == [
        "0xbf901b85", "0x3fed2f4e", "0xbf57fb33", "0x3f6e8c30"]  # fmt: skip
    f64 = TorchGenerator(42).randn(16, dtype=np.float64)[:4].tolist()
    assert [x.hex() for x in f64] == ["0x1.32bee22ccb503p-2", "0x1.f063c46668b78p-3",
                                      "0x1.22011e840abbdp-2", "-0x1.dd10ce0b8c5a4p-3"]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES + ["float16"])
def test_rand_matches_torch(dtype):
    torch = _torch()
    for seed in SEEDS:
        ref = torch.rand((3, 4097), generator=torch.Generator().manual_seed(seed),
                         dtype=getattr(torch, dtype)).numpy()  # fmt: skip
        out = TorchGenerator(seed).rand((3, 4097), dtype=dtype)
        _same_bits(out, ref, f"rand seed {seed} {dtype}")
        assert out.min() >= 0 and out.max() < 1


def test_state_interchange_with_torch():
    torch = _torch()
    gen, ours = torch.Generator().manual_seed(3), TorchGenerator(3)
    _same_bits(ours.get_state(), gen.get_state().numpy(), "fresh state")
    for n in (1, 700, 17):  # leaves a cached normal and a partly used twister block
        torch.randn(n, generator=gen)
        ours.randn(n)
    _same_bits(ours.get_state(), gen.get_state().numpy(), "state after draws")
    other = TorchGenerator(0)
    other.set_state(gen.get_state().numpy())  # torch -> ours
    _same_bits(other.randn(1, 40), _torch_randn(torch, gen, (1, 40), "float32"), "after load")
    back = torch.Generator()
    back.set_state(torch.from_numpy(other.get_state()))  # ours -> torch
    _same_bits(other.randn(5, 3), _torch_randn(torch, back, (5, 3), "float32"), "torch loads")
    assert other.initial_seed() == gen.initial_seed() == 3


def test_state_round_trip_without_torch():
    g = TorchGenerator(11)
    g.randn(3)
    saved = g.get_state()
    first = g.randn(2, 40)
    g.randn(1000)
    g.set_state(saved)
    assert np.array_equal(g.randn(2, 40), first)
    with pytest.raises(InputError, match="5056"):
        g.set_state(saved[:-1])
    broken = saved.copy()
    broken[8:12] = np.array([9999], "<i4").view(np.uint8)  # left > 624
    with pytest.raises(InputError, match="left"):
        g.set_state(broken)


def test_seeds_accepted_like_torch():
    torch = _torch()
    for seed in SEEDS:
        assert (
            TorchGenerator(seed).initial_seed()
            == torch.Generator().manual_seed(seed).initial_seed()
        )
    assert TorchGenerator().initial_seed() == torch.Generator().initial_seed() == DEFAULT_SEED
    for bad in (2**64, -(2**63) - 1):
        with pytest.raises(ValueError):
            torch.Generator().manual_seed(bad)
        with pytest.raises(InputError, match="seed"):
            TorchGenerator(bad)
    for bad in (1.5, True, "3"):
        with pytest.raises(InputError, match="seed"):
            TorchGenerator(bad)
    assert np.array_equal(TorchGenerator(np.int64(4)).randn(20), TorchGenerator(4).randn(20))


def test_call_forms_and_arguments():
    g = TorchGenerator
    assert np.array_equal(g(1).randn(2, 3, 4), g(1).randn((2, 3, 4)))
    assert np.array_equal(g(1).randn(2, 3, 4), g(1).standard_normal((2, 3, 4), np.float32))
    assert np.array_equal(g(1).rand(5), g(1).random(5))
    scalar = g(1).standard_normal()
    assert np.ndim(scalar) == 0 and scalar == g(1).randn(1)[0]
    assert g(1).randn(4, dtype=np.float64).dtype == np.float64
    assert g(1).randn(0).shape == (0,)
    for bad in ("bfloat16", np.int32, "float8", None):
        with pytest.raises(InputError, match="dtype"):
            g(1).randn(4, dtype=bad)
    for bad in ((2, -1), (2.5,), "abc"):
        with pytest.raises(InputError, match="size"):
            g(1).standard_normal(bad)


def test_make_rng():
    assert isinstance(make_rng(3), TorchGenerator)
    assert make_rng(3).initial_seed() == 3 and make_rng().initial_seed() == DEFAULT_SEED
    assert np.array_equal(make_rng(3, "numpy").standard_normal(8),
                          np.random.default_rng(3).standard_normal(8))  # fmt: skip
    with pytest.raises(InputError, match="kind"):
        make_rng(0, kind="torch-cuda")


def _round_f32(x: Fraction) -> np.float32:
    """Exact round-to-nearest-even of a rational to float32 (the oracle for _fma32)."""
    f = np.float32(float(x))
    down, up = np.nextafter(f, np.float32(-np.inf)), np.nextafter(f, np.float32(np.inf))

    def key(c):  # distance first, then an even last mantissa bit wins ties
        return abs(Fraction(float(c)) - x), int(np.array(c).view(np.uint32)) & 1

    return min((f, down, up), key=key)


def test_fma32_is_correctly_rounded():
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(400).astype(np.float32) * np.float32(4) for _ in range(3))
    # double-rounding traps: a*b = 1 + 2**-11 + 2**-24 is a float32 midpoint, c = +-2**-80
    a[:2] = b[:2] = np.float32(1 + 2**-12)
    c[:2] = np.float32(2**-80), np.float32(-(2**-80))
    c[2:100] = c[2:100] * np.float32(2**-30)  # large exponent gaps
    out = _fma32(a, b, c)
    for i in range(a.size):
        exact = Fraction(float(a[i])) * Fraction(float(b[i])) + Fraction(float(c[i]))
        assert out[i] == _round_f32(exact), (i, a[i], b[i], c[i])
    naive = (a[:2].astype(np.float64) * b[:2] + c[:2]).astype(np.float32)
    assert out[0] != naive[0], "the midpoint case should defeat the naive float64 path"
    assert math.isclose(float(out[0]), 1 + 2**-11 + 2**-23)
