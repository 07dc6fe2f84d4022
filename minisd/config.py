"""Checks of user-given values: numbers and paths (pipeline arguments, weights_tools), and the
fields of the model configs (UNet, VAE, CLIP text encoder).

A config.json is user input: a field that holds a string ("8"), a zero, or a value that does not
divide the channels would otherwise pass loading and fail deep inside a forward pass with a
ZeroDivisionError or a reshape error. These checks refuse it at load, naming the file and field.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .errors import ConfigError, InputError


def is_int(v) -> bool:
    """A Python or NumPy integer (bool is an int in Python, but no count of anything)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite Python or NumPy int or float (bool excluded)."""
    numeric = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
    return numeric and math.isfinite(v)


def _positive_int(v) -> bool:
    return is_int(v) and v > 0


def path_arg(value, name):
    """``value`` (str or os.PathLike) as a Path; InputError naming the argument otherwise."""
    text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    if not isinstance(text, str) or not text:
        raise InputError(f"{name}={value!r}: expected a file or folder path (str or os.PathLike)")
    return Path(text)


def check_numbers(source, cfg, *, ints=(), floats=(), optional=()):
    """Fields of the dataclass ``cfg``: those in ``ints`` hold a positive int or a non-empty
    tuple of them, those in ``floats`` a finite number; a field in ``optional`` may be None."""
    for names, ok, kind in (
        (ints, _positive_int, "positive integers"),
        (floats, is_number, "a number"),
    ):
        for name in names:
            value = getattr(cfg, name)
            if value is None and name in optional:
                continue
            values = value if isinstance(value, tuple) else (value,)
            if not values or not all(map(ok, values)):
                raise ConfigError(f"{source}: {name}={value!r}: expected {kind}")


def check_divides(source, divisor_name, divisors, channels_name, channels):
    """Each of ``divisors`` (one, or one per entry of ``channels``) divides its channels."""
    divisors = divisors if isinstance(divisors, tuple) else (divisors,) * len(channels)
    for d, c in zip(divisors, channels):
        if c % d:
            raise ConfigError(f"{source}: {divisor_name}={d} does not divide {channels_name}={c}")
