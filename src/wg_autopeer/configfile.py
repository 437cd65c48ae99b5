"""Reading a TOML configuration file, with every failure as a ``ConfigError``.

Shared by the agent's and the server's configuration; each validates its own keys.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from wg_autopeer.errors import ConfigError


def read_toml(path: Path, *, required: bool) -> dict[str, Any]:
    """The file's top-level table; ``{}`` when it is missing and not ``required``
    (a default path that was never created)."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        if required:
            raise ConfigError("--config", f"{path}: no such file") from None
        return {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("(file)", f"{path} is not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError("(file)", f"{path}: {exc.strerror}") from exc
