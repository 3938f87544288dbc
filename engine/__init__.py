"""tessmirror: verified, resumable, polite bulk downloads of TESS products from MAST.

    from engine import mirror, plan, retry, Settings
    todo = plan(sector=1, camera=1, ccd=2)                           # an astropy Table, nothing downloaded
    results = mirror(sector=1, camera=1, ccd=2, out_dir="s1-1-2")    # blocking; fine inside Jupyter
    results = retry(results)                                         # the failed rows again

`mirror_async`/`plan_async` are the coroutine forms. The exception types (`TessMirrorError` and its
subclasses, each with an exit code and a hint) are here too. Everything is loaded on first use
(PEP 562), so `import engine` stays cheap for the CLI's start-up and signal set-up.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The one list of public names (kept literal: ruff, mypy and IDEs read it without running this).
__all__ = [  # noqa: RUF022 - grouped: the API, the schema, the exceptions
    "__version__",
    "mirror",
    "mirror_async",
    "plan",
    "plan_async",
    "retry",
    "Results",
    "build_settings",
    "Settings",
    "TessMirrorError",
    "ConfigError",
    "UsageError",
    "ArchiveError",
    "LocalError",
    "DiskFullError",
    "PermissionDeniedError",
    "UnsafePathError",
    "EmptySelectionError",
    "TapUnavailableError",
    "TapJobError",
    "TapTimeoutError",
    "IncompletePlanError",
    "RunLockedError",
]
# Where a public name is looked for, lightest module first: an exception never loads the API.
_HOMES = ("engine.exceptions", "engine.settings", "engine.api")

if TYPE_CHECKING:
    from engine.api import Results, build_settings, mirror, mirror_async, plan, plan_async, retry
    from engine.exceptions import (
        ArchiveError,
        ConfigError,
        DiskFullError,
        EmptySelectionError,
        IncompletePlanError,
        LocalError,
        PermissionDeniedError,
        RunLockedError,
        TapJobError,
        TapTimeoutError,
        TapUnavailableError,
        TessMirrorError,
        UnsafePathError,
        UsageError,
    )
    from engine.settings import Settings


class _Package(types.ModuleType):
    """`engine.plan` is the API's `plan()`, not the `engine/plan/` subpackage.

    Importing a submodule records it on its parent (`engine.plan = <module>`), which would hide the
    function from `from engine import plan`. That one record is skipped: the subpackage stays
    importable as ever (`from engine.plan import table`, `sys.modules["engine.plan"]`).
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name == "plan" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    # PEP 562: the API module pulls in aiohttp, astropy and the manager, which `tessmirror --help`
    # never needs; the exceptions and the settings schema are light but loaded on demand alike.
    if name in __all__:
        for home in _HOMES:
            module = importlib.import_module(home)
            if hasattr(module, name):
                return getattr(module, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
