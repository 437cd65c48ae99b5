"""Wire models of ``/peering-request``, shared by agent and server.

Compatible with wireguard-web: a request is a JSON list (one object also
accepted) of ``{"pubkey", "ip", "netmask", "gateway"}`` entries, one per address
of the client's default-route interface(s). ``listen_port`` is this project's
optional addition, and so is ``gateway_mac`` (a fingerprint of the LAN: the
gateway's MAC address); wireguard-web ignores both. The answer is
``{"peers": [{"pubkey", "endpoint", "port", "ip"}]}``.
"""

from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv6Address, ip_interface
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from wg_autopeer.wireguard.base import IPNetwork, is_valid_key

PATH = "/peering-request"
_MAC = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
MAX_ENTRIES = 64
MAX_BODY_BYTES = 64 * 1024
DEFAULT_WAIT_SECONDS = 25
MAX_WAIT_SECONDS = 60


def _address_as_text(value: Any) -> Any:
    # pydantic's lax mode takes a JSON number (and ``true``, as 0.0.0.1) for an address;
    # no client writes one, so such a field is a mistake, not an address.
    if not isinstance(value, str | IPv4Address | IPv6Address):
        raise ValueError("must be an IP address written as a string")
    return value


def _not_a_bool(value: Any) -> Any:
    # Lax mode would read ``true`` as 1: a prefix of /1 or port 1 nobody meant.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


Address = Annotated[IPv4Address | IPv6Address, BeforeValidator(_address_as_text)]
Number = Annotated[int, BeforeValidator(_not_a_bool)]


class LanEntry(BaseModel):
    """One address of the client's LAN (default-route) interface."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    pubkey: str = Field(description="base64 public key of the client's tunnel interface")
    ip: Address = Field(description="the client's address on its LAN")
    netmask: Number = Field(ge=0, le=128, description="prefix length of that address")
    gateway: Address = Field(description="the LAN's default gateway")
    listen_port: Number | None = Field(
        default=None, ge=1, le=65535, description="the client's own WireGuard listen port"
    )
    gateway_mac: str | None = Field(
        default=None,
        description="the gateway's MAC address (lower-case, colon-separated), a fingerprint"
        " of the LAN: two entries match only when these are equal or one is missing",
    )

    @field_validator("gateway_mac")
    @classmethod
    def _mac_is_a_mac(cls, value: str | None) -> str | None:
        if value is None:
            return None
        mac = value.strip().lower()
        if not _MAC.fullmatch(mac):
            raise ValueError("gateway_mac must be a MAC address like 52:54:00:12:34:56")
        return mac

    @field_validator("pubkey")
    @classmethod
    def _key_is_wireguard_key(cls, value: str) -> str:
        if not is_valid_key(value):
            raise ValueError("pubkey must be base64 of 32 bytes")
        return value

    @model_validator(mode="after")
    def _consistent_family(self) -> LanEntry:
        if self.ip.version != self.gateway.version:
            raise ValueError("ip and gateway must be of the same address family")
        if self.netmask > self.ip.max_prefixlen:
            raise ValueError(f"netmask {self.netmask} is too long for IPv{self.ip.version}")
        return self

    @property
    def network(self) -> IPNetwork:
        """The LAN: the address masked by its prefix."""
        return ip_interface(f"{self.ip}/{self.netmask}").network


class PeerOffer(BaseModel):
    """One LAN neighbour, as the server names it."""

    model_config = ConfigDict(extra="ignore")

    pubkey: str
    endpoint: str | None = Field(default=None, description="the neighbour's LAN address")
    port: Number | None = Field(default=None, description="the neighbour's WireGuard listen port")
    ip: list[str] = Field(default_factory=list, description="the neighbour's tunnel addresses")


class PeeringAnswer(BaseModel):
    """The 200 answer to a peering request."""

    model_config = ConfigDict(extra="ignore")

    peers: list[PeerOffer]


class ErrorBody(BaseModel):
    """Every error answer."""

    error: str
