"""tessmirror: verified, resumable, polite bulk downloads of TESS products from MAST.

`mirror` (blocking) and `mirror_async` (inside a running loop, e.g. Jupyter) are the entry points.
They are loaded on first use, so `import engine` stays cheap for the CLI's start-up and signal set-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "mirror", "mirror_async"]

if TYPE_CHECKING:
    from engine.api import mirror, mirror_async


def __getattr__(name: str) -> Any:
    # PEP 562: the API module pulls in aiohttp and the manager, which `tessmirror --help` never needs.
    if name in ("mirror", "mirror_async"):
        from engine import api

        return getattr(api, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
