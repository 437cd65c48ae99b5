"""An agent that behaves like the seed's original one, for mixed-fleet lab tests.

Every ``--interval`` seconds it reports its LAN to the hub *without* a listen
port, and puts every neighbour it is offered on the device at once, tunnel
routes included (``wg set``), with the offered endpoint when there is one; it
removes peers that are no longer offered. No proof, no fallback: that is the
neighbour a make-before-break agent has to live with.

Run inside a client's namespace: ``python -m wg_autopeer.lab.seedagent
--interface IF --server URL``. Lab-only; the product never imports it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from ipaddress import ip_interface
from typing import Any

import httpx

PERSISTENT_KEEPALIVE = 25


def _run(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def lan_entries(public_key: str) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = []
    for route in json.loads(_run("ip", "-j", "route", "show", "default")):
        gateway, device = route.get("gateway"), route.get("dev")
        if not gateway or not device:
            continue
        for info in json.loads(_run("ip", "-j", "-4", "addr", "show", "dev", device)):
            for addr in info.get("addr_info", []):
                entries.append(
                    {"pubkey": public_key, "ip": addr["local"], "netmask": addr["prefixlen"],
                     "gateway": gateway}
                )  # fmt: skip
    return entries


def report(server: str, source: str, entries: list[dict[str, object]]) -> list[dict[str, Any]]:
    # The report must leave from the tunnel address: that is how the hub knows us.
    transport = httpx.HTTPTransport(local_address=source)
    with httpx.Client(transport=transport, timeout=5.0, trust_env=False) as client:
        answer = client.post(server, json=entries)
        answer.raise_for_status()
        peers: list[dict[str, Any]] = answer.json()["peers"]
    return peers


def apply(interface: str, offers: list[dict[str, Any]], added: set[str]) -> set[str]:
    offered = {str(o["pubkey"]) for o in offers}
    for key in added - offered:
        _run("wg", "set", interface, "peer", key, "remove")
    for offer in offers:
        argv = ["wg", "set", interface, "peer", str(offer["pubkey"])]
        if offer.get("endpoint") and offer.get("port"):
            argv += ["endpoint", f"{offer['endpoint']}:{offer['port']}"]
        ips = [str(ip) if "/" in str(ip) else f"{ip}/32" for ip in offer.get("ip", [])]
        argv += ["allowed-ips", ",".join(ips), "persistent-keepalive", str(PERSISTENT_KEEPALIVE)]
        _run(*argv)
    return offered


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wg_autopeer.lab.seedagent")
    parser.add_argument("--interface", required=True)
    parser.add_argument("--server", required=True)
    parser.add_argument("--interval", type=float, default=30.0)
    args = parser.parse_args(argv)
    public_key = _run("wg", "show", args.interface, "public-key").strip()
    source = str(
        ip_interface(
            json.loads(_run("ip", "-j", "-4", "addr", "show", "dev", args.interface))[0][
                "addr_info"
            ][0]["local"]
        ).ip
    )
    added: set[str] = set()
    while True:
        try:
            offers = report(args.server, source, lan_entries(public_key))
            added = apply(args.interface, offers, added)
            print(f"seedagent: {len(offers)} neighbour(s)", flush=True)
        except (
            OSError,
            ValueError,
            KeyError,
            httpx.HTTPError,
            subprocess.CalledProcessError,
        ) as exc:
            print(f"seedagent: {exc}", flush=True)
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
