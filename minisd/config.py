"""Checks shared by the model configs (UNet, VAE, CLIP text encoder).

A config.json is user input: a field that holds a string ("8"), a zero, or a value that does not
divide the channels would otherwise pass loading and fail deep inside a forward pass with a
ZeroDivisionError or a reshape error. These checks refuse it at load, naming the file and field.
"""

from __future__ import annotations

import math

from .errors import ConfigError


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_numbers(source, cfg, *, ints=(), floats=(), optional=()):
    """Fields of the dataclass ``cfg``: those in ``ints`` hold a positive int or a non-empty
    tuple of them, those in ``floats`` a finite number; a field in ``optional`` may be None."""
    for names, ok, kind in (
        (ints, _positive_int, "positive integers"),
        (floats, _finite, "a number"),
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
