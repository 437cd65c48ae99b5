"""Server configuration errors as a user meets them: the real command stops with exit 2
and a message naming the key and the expected form.

Key-by-key parsing is in test_server_config_store.py; this file covers what it
does not: the command line, files that are not TOML, the shipped example.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from wg_autopeer.errors import ConfigError
from wg_autopeer.server.config import KNOWN_KEYS, ServerConfig, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "server.toml"


def write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "server.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def test_known_keys_are_exactly_the_config_fields() -> None:
    assert set(KNOWN_KEYS) == {f.name for f in dataclasses.fields(ServerConfig)}


def test_shipped_example_loads_and_documents_every_key() -> None:
    config = load_config(EXAMPLE)
    assert config.interface == "wg0"
    text = EXAMPLE.read_text()
    for key in KNOWN_KEYS:
        assert f"\n{key} = " in text or f"\n# {key} = " in text or f"\n[{key}]" in text, key


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("colour = 'blue'", "colour", "unknown key (known keys: interface, listen, db"),
        ("ttl = nan", "ttl", "expected a positive number of seconds, got nan"),
        ("ttl = inf", "ttl", "expected a positive number of seconds, got inf"),
        ("ttl = true", "ttl", "expected a positive number of seconds, got True"),
        ("refresh_interval = 0", "refresh_interval", "positive number of seconds, got 0"),
        ("db = 3", "db", "expected a non-empty string, got 3"),
        ("listen = '10.0.0.1:80'", "listen", "expected a list of strings, got '10.0.0.1:80'"),
        ("listen = ['10.0.0.1:0']", "listen", "port must be 1-65535"),
        ("metrics_sources = ['10.0.0.0/33']", "metrics_sources", "not an address or network"),
        ("policy = 3", "policy", "expected a table with 'allow' and/or 'exclude'"),
    ],
)
def test_bad_value_message_says_what_was_expected_and_what_came(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.key == key
    assert expected in str(caught.value)


@pytest.mark.parametrize("content", [b"ttl = = 3\n", b"[policy\n", b"ttl = 1\nttl = 2\n", b"\xff"])
def test_file_that_is_not_toml_is_refused_with_its_path(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert f"{path} is not valid TOML" in str(caught.value)


def test_missing_explicit_file_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.toml")
    assert caught.value.key == "--config"
    assert "absent.toml: no such file" in str(caught.value)


# -- the real command line -----------------------------------------------------------------


def run_server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wg_autopeer", "server", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 'blue'\n", "config key 'colour': unknown key (known keys: "),
        ("ttl = 'soon'\n", "config key 'ttl': expected a positive number of seconds, got 'soon'"),
        ("ttl = -5\n", "config key 'ttl': expected a positive number of seconds, got -5"),
        ("listen = ['wg0:80']\n", "config key 'listen': 'wg0:80': 'wg0' is not an IP address"),
        ("ttl = = 3\n", "is not valid TOML: "),
        ("db = ':memory:'\n", "config key 'interface': required: --interface WG"),
    ],
)
def test_server_command_stops_with_exit_2_and_the_message(
    tmp_path: Path, text: str, message: str
) -> None:
    result = run_server("--config", str(write(tmp_path, text)))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_server_command_with_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_server("--config", str(tmp_path / "absent.toml"), "--interface", "wg0")
    assert result.returncode == 2
    assert "config key '--config'" in result.stderr
    assert "absent.toml: no such file" in result.stderr


def test_server_command_refuses_a_bad_listen_flag(tmp_path: Path) -> None:
    result = run_server("--config", str(write(tmp_path, "")), "--interface", "wg0", "--listen", "x")
    assert result.returncode == 2
    assert "config key '--listen': 'x': 'x' is not an IP address" in result.stderr
