"""Agent configuration: the TOML file, flags on top, and the errors that stop start-up.

Every bad file must stop the agent before it touches anything, with exit status
2 and a message that names the key and the expected form. The last tests run
the real command line (``python -m wg_autopeer agent --config bad.toml``).
"""

from __future__ import annotations

import argparse
import dataclasses
import grp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wg_autopeer.agent.config import AgentConfig, load_agent_config, overrides_from_args
from wg_autopeer.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "packaging" / "agent.toml"


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "agent.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def test_file_sets_every_key(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    config = load_agent_config(
        write(
            tmp_path,
            f"""
interfaces = ["wg0", "wg1"]
server = "http://10.99.0.1/peering-request"
state_dir = "/tmp/s"
runtime_dir = "/tmp/r"
interval = 12.5
tray = false
wait = 10
persistent_keepalive = 15
handshake_timeout = 7
handshake_stale_after = 120
uapi_dir = "/tmp/u"
control_group = "{group}"
push = false
first_report_delay = 5
""",
        )
    )
    assert config == AgentConfig(
        interfaces=("wg0", "wg1"),
        server="http://10.99.0.1/peering-request",
        state_dir=Path("/tmp/s"),
        runtime_dir=Path("/tmp/r"),
        interval=12.5,
        tray=False,
        wait=10,
        persistent_keepalive=15,
        handshake_timeout=7.0,
        handshake_stale_after=120.0,
        uapi_dir=Path("/tmp/u"),
        control_group=group,
        push=False,
        first_report_delay=5.0,
    )


def test_shipped_example_loads_and_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    config = load_agent_config(EXAMPLE, required=True)
    # The example's active values are the defaults (commented keys stay at theirs).
    assert config == AgentConfig()
    for field in dataclasses.fields(AgentConfig):
        assert f"\n{field.name} = " in text or f"\n# {field.name} = " in text, field.name


def test_missing_default_file_means_defaults(tmp_path: Path) -> None:
    assert load_agent_config(tmp_path / "absent.toml") == AgentConfig()


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'interval = 60\nserver = "http://10.0.0.1/x"\n')
    args = argparse.Namespace(
        interface=["wg7"],
        server=None,
        state_dir=None,
        runtime_dir="/tmp/r",
        interval=9.0,
        no_tray=True,
    )
    config = load_agent_config(path, overrides_from_args(args))
    assert config.interval == 9.0
    assert config.server == "http://10.0.0.1/x"  # not given on the command line: the file's
    assert config.interfaces == ("wg7",)
    assert config.runtime_dir == Path("/tmp/r")
    assert config.tray is False


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        # unknown keys, with the list of the known ones
        ("colour = 'blue'", "colour", "unknown key"),
        ("[agent]\ninterval = 10", "agent", "known keys: control_group"),
        # wrong types
        ("interval = 'soon'", "interval", "a number of seconds between 5 and 86400, got 'soon'"),
        ("interval = true", "interval", "a number of seconds"),
        ("interfaces = 'wg0'", "interfaces", 'a list of interface names, e.g. ["wg0"]'),
        ("interfaces = ['a-name-longer-than-15']", "interfaces", "a list of interface names"),
        ("tray = 'yes'", "tray", "true or false, got 'yes'"),
        ("server = 'ftp://hub/x'", "server", 'a URL, e.g. "http://10.99.0.1/peering-request"'),
        ("state_dir = 5", "state_dir", "a directory path, got 5"),
        ("wait = 2.5", "wait", "whole seconds between 1 and 60, got 2.5"),
        ("control_group = 7", "control_group", "the name of an existing group"),
        ("control_group = 'no-such-group-wgap'", "control_group", "(no such group)"),
        # out of range
        ("interval = 1", "interval", "between 5 and 86400, got 1"),
        ("interval = nan", "interval", "between 5 and 86400, got nan"),
        ("interval = inf", "interval", "between 5 and 86400"),
        ("wait = 61", "wait", "between 1 and 60, got 61"),
        ("persistent_keepalive = 0", "persistent_keepalive", "between 1 and 65535"),
        ("handshake_stale_after = 10", "handshake_stale_after", "between 30 and 3600"),
        ("first_report_delay = -1", "first_report_delay", "between 0 and 600"),
    ],
)
def test_bad_value_names_the_key_and_the_expected_form(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_agent_config(write(tmp_path, text))
    assert caught.value.key == key
    assert expected in str(caught.value)


def test_bad_flag_is_refused_like_a_bad_file_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_agent_config(None, {"interval": 0.5})
    assert caught.value.key == "interval"


@pytest.mark.parametrize(
    "content",
    [b"interval = = 3\n", b"[unclosed\n", b"interval = 30\ninterval = 40\n", b"\xff\xfe bad"],
)
def test_file_that_is_not_toml_is_refused_with_its_path(tmp_path: Path, content: bytes) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as caught:
        load_agent_config(path)
    assert f"{path} is not valid TOML" in str(caught.value)


def test_explicit_config_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_agent_config(tmp_path / "absent.toml", required=True)
    assert caught.value.key == "--config"
    assert "no such file" in str(caught.value)


# -- the real command line --------------------------------------------------------------


def run_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wg_autopeer", "agent", "--no-tray", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("colour = 'blue'\n", "config key 'colour': unknown key in"),
        (
            "interval = 'soon'\n",
            "config key 'interval': expected a number of seconds between 5 and 86400, got 'soon'",
        ),
        (
            "wait = 600\n",
            "config key 'wait': expected whole seconds between 1 and 60, got 600",
        ),
        ("interval = = 3\n", "is not valid TOML: "),
    ],
)
def test_agent_command_stops_with_exit_2_and_the_message(
    tmp_path: Path, text: str, message: str
) -> None:
    result = run_agent("--config", str(write(tmp_path, text)))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("wg-autopeer agent: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_agent_command_with_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_agent("--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2
    assert "config key '--config'" in result.stderr
    assert "absent.toml: no such file" in result.stderr


def test_agent_command_refuses_a_bad_flag_like_a_bad_file(tmp_path: Path) -> None:
    result = run_agent("--config", "/dev/null", "--interval", "1")
    assert result.returncode == 2
    assert "config key 'interval': expected a number of seconds between 5 and 86400" in (
        result.stderr
    )
