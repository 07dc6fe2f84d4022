"""Errors raised by minisd. Every message names the file, key or argument at fault."""


class MinisdError(Exception):
    """Base class of every error minisd raises on purpose."""


class WeightsError(MinisdError):
    """A weights file is missing, malformed, or does not fit the model."""


class ConfigError(MinisdError):
    """A config.json / scheduler_config.json is missing or describes something unsupported."""


class InputError(MinisdError, ValueError):
    """An argument passed by the caller is invalid (size, count, range)."""
