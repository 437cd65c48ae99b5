"""``defer_init``: a package's submodules import without its ``__init__``, which runs once,
on the first lookup of a name only it defines."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wg_autopeer.lazypackage import defer_init

INIT = """
import builtins
builtins.init_runs = getattr(builtins, "init_runs", 0) + 1
from lazypkg.heavy import HEAVY
from lazypkg import light
TOP = "defined by __init__"
"""


@pytest.fixture
def package(tmp_path: Path) -> Iterator[str]:
    root = tmp_path / "lazypkg"
    root.mkdir()
    (root / "__init__.py").write_text(INIT)
    (root / "light.py").write_text("from lazypkg import sub\nLIGHT = 1\n")
    (root / "sub.py").write_text("SUB = 2\n")
    (root / "heavy.py").write_text("HEAVY = 3\n")
    sys.path.insert(0, str(tmp_path))
    import builtins

    builtins.init_runs = 0  # type: ignore[attr-defined]
    try:
        yield "lazypkg"
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "lazypkg" or m.startswith("lazypkg.")]:
            del sys.modules[name]
        del builtins.init_runs  # type: ignore[attr-defined]


def init_runs() -> int:
    import builtins

    return int(builtins.init_runs)  # type: ignore[attr-defined]


def test_submodules_import_without_running_the_package_init(package: str) -> None:
    defer_init(package)
    from lazypkg.light import LIGHT  # type: ignore[import-not-found]

    assert LIGHT == 1
    assert init_runs() == 0
    assert "lazypkg.heavy" not in sys.modules


def test_a_name_only_init_defines_runs_it_once_in_the_same_module(package: str) -> None:
    defer_init(package)
    import lazypkg  # type: ignore[import-not-found]
    from lazypkg import sub  # type: ignore[import-not-found]

    assert sub.SUB == 2
    assert init_runs() == 0  # a submodule is not a reason to run it
    from lazypkg import TOP  # type: ignore[import-not-found]

    assert TOP == "defined by __init__"
    assert lazypkg.HEAVY == 3
    assert init_runs() == 1
    assert sys.modules["lazypkg"] is lazypkg
    with pytest.raises(ImportError):
        from lazypkg import MISSING  # type: ignore[import-not-found]  # noqa: F401
    assert init_runs() == 1


def test_a_package_imported_already_or_not_installed_is_left_alone(package: str) -> None:
    import lazypkg  # type: ignore[import-not-found]

    assert init_runs() == 1
    defer_init(package)
    assert sys.modules["lazypkg"] is lazypkg
    defer_init("no_such_package_here")
    assert "no_such_package_here" not in sys.modules
