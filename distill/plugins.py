"""User code named in a config as `module:callable` (curation plug-in filters, eval scorers)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


class PluginError(RuntimeError):
    """User code named in a config raised: said in one line (which plug-in, which record, the exception)."""


def load_callable(spec: str, field: str) -> Callable:
    """The callable `spec` names (`package.module:function`, or `module:Class.method`); errors
    name the config `field` in backticks. The module must be importable (installed or on
    `PYTHONPATH`)."""
    module, _, attr = str(spec).partition(":")
    if not module or not attr:
        raise ValueError(f"`{field}`: expected `module:callable`, got {spec!r}")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # importing user code can raise anything; say which spec and why
        raise ValueError(f"`{field}`: cannot load {spec!r} ({type(e).__name__}: {e})") from e
    if not callable(obj):
        raise ValueError(f"`{field}`: {spec!r} is a {type(obj).__name__}, not a callable")
    return obj
