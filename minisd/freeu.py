"""FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net", arXiv:2309.11497), as diffusers
applies it (``utils/torch_utils.py``: ``apply_freeu`` and ``fourier_filter``, called by
UpBlock2D / CrossAttnUpBlock2D right before each ResNet's concatenation).

The decoder's ResNets take [h, s]: h the backbone feature (the previous layer's output), s the
skip feature from the encoder. In decoder stage l = 1, 2 (``up_blocks.0`` and ``up_blocks.1``,
the two lowest resolutions) FreeU re-weights both before they are concatenated:

    backbone:  h'_{l,i} = b_l * h_{l,i}  for channels i < C/2,   h'_{l,i} = h_{l,i}  otherwise
    skip:      F = FFTshift(FFT2(s_l)),   F' = F ⊙ β_l,   s'_l = Re IFFT2(IFFTshift(F'))
               β_l(u, v) = s_l  if |u - H//2| and |v - W//2| fall in the centre box, else 1

b_l > 1 strengthens the backbone (denoising); s_l < 1 damps the skip's lowest frequencies, so
the amplified backbone does not over-smooth the image. The centre box is diffusers' ``threshold
= 1``: rows H//2 - 1 .. H//2 and columns W//2 - 1 .. W//2 of the shifted spectrum (the zero
frequency and its neighbours; Python slice rules, so a 1-pixel side keeps its one frequency).
diffusers scales by the constant b_l, not the paper's structure-related
alpha_l = (b_l - 1) * (mean_c(h) - min) / (max - min) + 1; so does minisd. Stages l > 2 are
left as they are.

Precision island (as diffusers): the Fourier filter runs in float32 / complex64 whatever the
model dtype (diffusers upcasts float16 and bfloat16, keeps float32, and casts float64 down), and
its result is cast back to the model dtype. NumPy >= 2 (pocketfft) and CuPy (cuFFT) keep
complex64 for float32 input; torch on the CPU uses MKL. Measured on random skip features
(tests/test_freeu.py): max |ours - torch| / max |torch| <= 3e-7 (sizes 1x1 to 64x64), each
within ~2.5e-7 of the exact (float64) filter. A float64 UNet with FreeU therefore matches
diffusers only to float32 FFT rounding (~1e-7); given the same filtered skips, to 1e-10.
The backbone product follows torch's arithmetic: float32 and float64 in their own dtype,
float16 in float32 (torch's opmath type), rounded once.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from .backend import array_module
from .errors import InputError

#: Half-width of the scaled low-frequency box (diffusers' fourier_filter ``threshold``).
THRESHOLD = 1


@dataclass(frozen=True)
class FreeU:
    """FreeU's factors: skip scales s1, s2 and backbone scales b1, b2 of decoder stages 1, 2."""

    s1: float
    s2: float
    b1: float
    b2: float

    @classmethod
    def checked(cls, s1, s2, b1, b2):
        """The factors as floats; InputError naming the first one that is not a finite,
        non-zero real number."""
        values = {"s1": s1, "s2": s2, "b1": b1, "b2": b2}
        return cls(**{name: _factor(name, v) for name, v in values.items()})

    def stage(self, i):
        """Keyword arguments of :func:`apply_freeu` for ``up_blocks.i`` (diffusers'
        ``resolution_idx``), or None for the stages FreeU leaves alone."""
        return {0: {"b": self.b1, "s": self.s1}, 1: {"b": self.b2, "s": self.s2}}.get(i)


def _factor(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise InputError(f"enable_freeu: {name}={v!r}, expected a finite number")
    if v == 0:  # diffusers tests `s1 and s2 and b1 and b2`: one zero silently turns FreeU off
        raise InputError(
            f"enable_freeu: {name}=0 (diffusers would silently skip FreeU altogether); "
            "use disable_freeu() to turn it off"
        )
    return float(v)


def apply_freeu(h, skip, *, b, s):
    """One decoder ResNet input of a FreeU stage: backbone h (N, C, H, W) and skip feature
    (N, Cs, H, W) -> (h', skip'), same shapes and dtypes; the inputs are not modified.

    diffusers scales h in place; where the skip state is the very same array (a UNet without a
    mid block: the last down layer's output is both), the skip is scaled with it before it is
    filtered, and so it is here."""
    scaled = scale_backbone(h, b)  # (N, C, H, W)
    return scaled, fourier_filter(scaled if skip is h else skip, s)  # (N, Cs, H, W)


def scale_backbone(h, b):
    """h'[:, :C//2] = b * h[:, :C//2]; the other channels unchanged. (N, C, H, W) -> same."""
    xp = array_module(h)
    half = h.shape[1] // 2
    head = h[:, :half]  # (N, C//2, H, W)
    if h.dtype == np.float16:  # torch multiplies half tensors in float32, then rounds
        head = (head.astype(np.float32) * np.float32(b)).astype(h.dtype)
    else:
        head = head * h.dtype.type(b)  # torch: a python float operand takes the tensor's dtype
    return xp.concatenate([head, h[:, half:]], axis=1)  # (N, C, H, W)


def fourier_filter(x, scale, threshold=THRESHOLD):
    """Scale the lowest spatial frequencies of x (N, C, H, W) by ``scale``: the centre
    2*threshold x 2*threshold box of the shifted 2-D spectrum. Computed in float32 /
    complex64 (the precision island of the module docstring); returns x's dtype."""
    xp = array_module(x)
    hgt, wid = x.shape[-2:]
    freq = xp.fft.fft2(x.astype(np.float32, copy=False))  # (N, C, H, W) complex64
    freq = xp.fft.fftshift(freq, axes=(-2, -1))  # zero frequency at (H//2, W//2); a new array
    rows = slice(hgt // 2 - threshold, hgt // 2 + threshold)
    cols = slice(wid // 2 - threshold, wid // 2 + threshold)
    freq[..., rows, cols] *= np.float32(scale)  # diffusers' mask is float32
    freq = xp.fft.ifftshift(freq, axes=(-2, -1))  # (N, C, H, W)
    return xp.fft.ifft2(freq).real.astype(x.dtype)  # (N, C, H, W)
