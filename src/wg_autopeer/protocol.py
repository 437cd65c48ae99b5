"""Wire models of ``/peering-request``, shared by agent and server.

Compatible with wireguard-web: a request is a JSON list (one object also
accepted) of ``{"pubkey", "ip", "netmask", "gateway"}`` entries, one per address
of the client's default-route interface(s). ``listen_port`` is this project's
optional addition, and so is ``gateway_mac`` (a fingerprint of the LAN: the
gateway's MAC address); wireguard-web ignores both. The answer is
``{"peers": [{"pubkey", "endpoint", "port", "ip"}]}``.

Plain dataclasses, checked by hand: four small messages do not need a validation
library, and the agent, which imports this module, stays without pydantic (about
12 MiB of its memory and a tenth of a second of its start). Each model has a
``from_json`` that takes what ``json.loads`` gave and raises ``WireFormatError``
naming the field, and a ``to_json`` for the other direction. Unknown fields are
ignored, as wireguard-web does. ``LAN_ENTRY_SCHEMA`` is the request's JSON Schema
for the server's OpenAPI document; tests hold it to the checks here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_interface
from typing import Any

from wg_autopeer.wireguard.base import IPAddress, IPNetwork, is_valid_key

PATH = "/peering-request"
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
MAX_ENTRIES = 64
MAX_BODY_BYTES = 64 * 1024
DEFAULT_WAIT_SECONDS = 25
MAX_WAIT_SECONDS = 60
MAX_PORT = 65535


class WireFormatError(ValueError):
    """A message that is not the wire format; ``where`` names the field (dotted path)."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message

    def inside(self, outer: str) -> WireFormatError:
        """The same error, its field path prefixed with ``outer``."""
        return WireFormatError(f"{outer}.{self.where}", self.message)


# -- field readers: one JSON value each, or WireFormatError -----------------------------------


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise WireFormatError(where, "must be a JSON object")
    return value


def _required(obj: Mapping[str, Any], name: str) -> Any:
    if obj.get(name) is None:
        raise WireFormatError(name, "field required")
    return obj[name]


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise WireFormatError(where, "must be a string")
    return value


def _address(value: Any, where: str) -> IPAddress:
    # Only a string: Python would take a number (or true) as 0.0.0.1, and no client
    # writes an address as one, so such a field is a mistake, not an address.
    if not isinstance(value, str):
        raise WireFormatError(where, "must be an IP address written as a string")
    try:
        return ip_address(value)
    except ValueError:
        raise WireFormatError(where, "is not a valid IPv4 or IPv6 address") from None


def _whole(value: Any, where: str, low: int, high: int) -> int:
    """A whole number in [low, high]: an integer, or a float without a fraction (24.0),
    never true or false (``True`` is 1 to Python: a prefix of /1 nobody meant)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireFormatError(where, "must be a whole number")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise WireFormatError(where, "must be a whole number")
    number = int(value)
    if not low <= number <= high:
        raise WireFormatError(where, f"must be between {low} and {high}")
    return number


def _optional(obj: Mapping[str, Any], name: str, read: Any, *args: Any) -> Any:
    value = obj.get(name)
    return None if value is None else read(value, name, *args)


# -- the request ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LanEntry:
    """One address of the client's LAN (default-route) interface.

    Built from checked values only: construction refuses a bad key, MAC address,
    prefix length or a mix of address families with ``WireFormatError``.
    """

    pubkey: str
    ip: IPAddress
    netmask: int
    gateway: IPAddress
    listen_port: int | None = None
    # The gateway's MAC address, lower-case and colon-separated: a fingerprint of the LAN.
    gateway_mac: str | None = None

    def __post_init__(self) -> None:
        if not is_valid_key(self.pubkey):
            raise WireFormatError("pubkey", "must be base64 of 32 bytes")
        if self.ip.version != self.gateway.version:
            raise WireFormatError("gateway", "must be of the same address family as ip")
        if not 0 <= self.netmask <= self.ip.max_prefixlen:
            raise WireFormatError(
                "netmask", f"must be between 0 and {self.ip.max_prefixlen} for IPv{self.ip.version}"
            )
        if self.listen_port is not None and not 1 <= self.listen_port <= MAX_PORT:
            raise WireFormatError("listen_port", f"must be between 1 and {MAX_PORT}")
        if self.gateway_mac is not None and not _MAC.fullmatch(self.gateway_mac):
            raise WireFormatError(
                "gateway_mac", "must be a MAC address like 52:54:00:12:34:56 (lower-case)"
            )

    @classmethod
    def from_json(cls, value: Any) -> LanEntry:
        """One entry of a request body, as ``json.loads`` gave it."""
        obj = _object(value, "entry")
        mac = _optional(obj, "gateway_mac", _text)
        return cls(
            pubkey=_text(_required(obj, "pubkey"), "pubkey"),
            ip=_address(_required(obj, "ip"), "ip"),
            netmask=_whole(_required(obj, "netmask"), "netmask", 0, 128),
            gateway=_address(_required(obj, "gateway"), "gateway"),
            listen_port=_optional(obj, "listen_port", _whole, 1, MAX_PORT),
            # Written by hand or by another client: "52-54-00-…" is refused, case is not.
            gateway_mac=None if mac is None else mac.strip().lower(),
        )

    def to_json(self) -> dict[str, Any]:
        """The entry as a JSON object, absent fields left out."""
        obj: dict[str, Any] = {
            "pubkey": self.pubkey,
            "ip": str(self.ip),
            "netmask": self.netmask,
            "gateway": str(self.gateway),
        }
        if self.listen_port is not None:
            obj["listen_port"] = self.listen_port
        if self.gateway_mac is not None:
            obj["gateway_mac"] = self.gateway_mac
        return obj

    @property
    def network(self) -> IPNetwork:
        """The LAN: the address masked by its prefix."""
        return ip_interface(f"{self.ip}/{self.netmask}").network


_ADDRESS_SCHEMA = {"anyOf": [{"type": "string", "format": f} for f in ("ipv4", "ipv6")]}

# The request entry's JSON Schema (for the server's OpenAPI document). It cannot say
# everything ``LanEntry`` checks (a valid key, one address family, /32 at most for IPv4),
# so a body it allows may still be refused; a body it refuses is always refused.
LAN_ENTRY_SCHEMA: dict[str, Any] = {
    "title": "LanEntry",
    "description": "One address of the client's LAN (default-route) interface.",
    "type": "object",
    "required": ["pubkey", "ip", "netmask", "gateway"],
    "properties": {
        "pubkey": {
            "type": "string",
            "description": "base64 public key of the client's tunnel interface",
        },
        "ip": {**_ADDRESS_SCHEMA, "description": "the client's address on its LAN"},
        "netmask": {
            "type": "integer",
            "minimum": 0,
            "maximum": 128,
            "description": "prefix length of that address",
        },
        "gateway": {**_ADDRESS_SCHEMA, "description": "the LAN's default gateway"},
        "listen_port": {
            "anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_PORT}, {"type": "null"}],
            "description": "the client's own WireGuard listen port",
        },
        "gateway_mac": {
            "anyOf": [{"type": "string"}, {"type": "null"}],
            "description": "the gateway's MAC address (lower-case, colon-separated), a"
            " fingerprint of the LAN: two entries match only when these are equal or one"
            " is missing",
        },
    },
}


# -- the answer -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerOffer:
    """One LAN neighbour, as the server names it.

    Only the types are checked here: whether an offer is safe to add is the agent's
    safety filter's judgement, offer by offer.
    """

    pubkey: str
    # The neighbour's LAN address and WireGuard listen port; both absent when the
    # neighbour reported no port (it then makes the handshake itself).
    endpoint: str | None = None
    port: int | None = None
    # The neighbour's tunnel addresses.
    ip: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, value: Any) -> PeerOffer:
        obj = _object(value, "offer")
        addresses = obj.get("ip")
        if addresses is None:
            addresses = []
        if not isinstance(addresses, list):
            raise WireFormatError("ip", "must be a list of strings")
        return cls(
            pubkey=_text(_required(obj, "pubkey"), "pubkey"),
            endpoint=_optional(obj, "endpoint", _text),
            # Any whole number: the safety filter judges the range, offer by offer.
            port=_optional(obj, "port", _whole, -(2**63), 2**63),
            ip=[_text(a, f"ip.{i}") for i, a in enumerate(addresses)],
        )

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"pubkey": self.pubkey}
        if self.endpoint is not None:
            obj["endpoint"] = self.endpoint
        if self.port is not None:
            obj["port"] = self.port
        obj["ip"] = list(self.ip)
        return obj


@dataclass(frozen=True, slots=True)
class PeeringAnswer:
    """The 200 answer to a peering request."""

    peers: list[PeerOffer]

    @classmethod
    def from_json(cls, value: Any) -> PeeringAnswer:
        obj = _object(value, "body")
        peers = _required(obj, "peers")
        if not isinstance(peers, list):
            raise WireFormatError("peers", "must be a list")
        offers = []
        for i, offer in enumerate(peers):
            try:
                offers.append(PeerOffer.from_json(offer))
            except WireFormatError as exc:
                raise exc.inside(f"peers.{i}") from None
        return cls(offers)

    def to_json(self) -> dict[str, Any]:
        return {"peers": [offer.to_json() for offer in self.peers]}


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """Every error answer: ``{"error": "..."}``."""

    error: str

    @classmethod
    def from_json(cls, value: Any) -> ErrorBody:
        return cls(_text(_required(_object(value, "body"), "error"), "error"))
