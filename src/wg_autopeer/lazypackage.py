"""A third-party package registered without running its ``__init__``.

``import pyroute2.iproute.linux`` first runs ``pyroute2/__init__.py``, which imports every
module of the library (IPDB, NDB, nftables, 802.11, plan9, ...): some 60 modules, 80 ms
of start-up and 6 MiB the agent keeps for its whole life, for the two netlink sockets it
uses. ``defer_init`` registers the package with its search path but without running
``__init__``, so its submodules import alone. The first lookup of a name only
``__init__`` defines (``from pyroute2 import NDB``, ``pyroute2.__version__``) runs it
then, into the same module object, so such code still works, only slower once.
No library does this for a package's own ``__init__`` (importlib's LazyLoader defers a
module until first use, but a submodule import is a use); hence this module.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from typing import Any


def defer_init(name: str) -> None:
    """Register package ``name`` with its ``__init__`` deferred; a no-op when it is
    imported already or not installed."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader
    lock = threading.Lock()

    def complete(attribute: str) -> Any:
        # Module-level __getattr__ (PEP 562): called only for names not found. A
        # submodule (``from pyroute2 import config``) is imported alone.
        if not attribute.startswith("__") and importlib.util.find_spec(f"{name}.{attribute}"):
            return importlib.import_module(f"{name}.{attribute}")
        with lock:
            if package.__dict__.pop("__getattr__", None) is not None:
                loader.exec_module(package)
        return getattr(package, attribute)

    package.__getattr__ = complete  # type: ignore[method-assign]
    sys.modules[name] = package
