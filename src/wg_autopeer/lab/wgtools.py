"""What the lab asks of wireguard-tools and wireguard-go: keys, device dumps, UAPI sockets.

The lab stands in for a human at a shell, so it uses ``wg``; product code never does.
"""

from __future__ import annotations

from ipaddress import ip_address, ip_network
from pathlib import Path

from wg_autopeer.errors import LabError
from wg_autopeer.lab.netns import run_command
from wg_autopeer.wireguard.base import DeviceState, Endpoint, IPNetwork, PeerState

# wireguard-go's UAPI socket folder, shared by every namespace (it is a file path).
UAPI_DIR = Path("/var/run/wireguard")


def generate_keypair() -> tuple[str, str]:
    """A new WireGuard key pair (private, public), base64 as ``wg`` prints them."""
    private = run_command(["wg", "genkey"]).stdout.strip()
    public = run_command(["wg", "pubkey"], stdin_text=private + "\n").stdout.strip()
    return private, public


def _parse_endpoint(text: str) -> Endpoint | None:
    if text in ("(none)", ""):
        return None
    host, _, port = text.rpartition(":")
    return Endpoint(ip_address(host.strip("[]")), int(port))


def parse_wg_dump(interface: str, text: str) -> DeviceState:
    """Parse ``wg show <interface> dump`` (private key left out)."""
    lines = [line.split("\t") for line in text.splitlines() if line.strip()]
    if not lines or len(lines[0]) < 4:
        raise LabError(f"{interface}: unexpected `wg show dump` output: {text!r}")
    _private, public, port, fwmark = lines[0][:4]
    peers: list[PeerState] = []
    for cols in lines[1:]:
        if len(cols) < 8:
            raise LabError(f"{interface}: unexpected peer line in `wg show dump`: {cols!r}")
        pub, _psk, endpoint, allowed, handshake, rx, tx, keepalive = cols[:8]
        allowed_ips: tuple[IPNetwork, ...] = ()
        if allowed not in ("(none)", ""):
            allowed_ips = tuple(ip_network(a, strict=False) for a in allowed.split(","))
        peers.append(
            PeerState(
                public_key=pub,
                allowed_ips=allowed_ips,
                endpoint=_parse_endpoint(endpoint),
                latest_handshake=float(handshake) if handshake != "0" else None,
                rx_bytes=int(rx),
                tx_bytes=int(tx),
                persistent_keepalive=None if keepalive == "off" else int(keepalive),
            )
        )
    return DeviceState(
        name=interface,
        public_key=public if public != "(none)" else None,
        listen_port=int(port) if port not in ("0", "off") else None,
        peers=tuple(peers),
        fwmark=None if fwmark == "off" else int(fwmark, 0),
    )
