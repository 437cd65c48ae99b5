"""The safety filter: the server may pick neighbours, it may not hijack routes.

Everything the server answers is checked here before it reaches the device.
An offer becomes a ``DirectPeer`` only when its key is a fresh WireGuard key,
its endpoint (if it has one) lies on one of the LANs this agent reported, and every allowed IP
is a host route of a neighbour inside the tunnel network that nobody else on
the device owns. Anything else is refused with a readable reason. Pure.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import ip_address, ip_network
from types import MappingProxyType

from wg_autopeer.errors import UnsafeAnswer
from wg_autopeer.protocol import PeeringAnswer, PeerOffer, WireFormatError
from wg_autopeer.wireguard.base import Endpoint, IPAddress, IPNetwork, is_valid_key

MAX_ANSWER_BYTES = 1024 * 1024
MAX_PEERS = 256
# A neighbour has an IPv4 and maybe a few IPv6 tunnel addresses; more smells of abuse.
MAX_ALLOWED_IPS_PER_PEER = 16


@dataclass(frozen=True)
class DirectPeer:
    """A neighbour on the LAN, safe to add as a direct WireGuard peer.

    ``endpoint`` is None for a passive peer: the server knows no port of the
    neighbour's (it reported none), so the agent adds the key alone and waits for
    the neighbour's handshake to show where it is.
    """

    public_key: str
    endpoint: Endpoint | None
    allowed_ips: tuple[IPNetwork, ...]

    @property
    def passive(self) -> bool:
        return self.endpoint is None


@dataclass(frozen=True)
class SafetyContext:
    """What the agent knows about itself and its device, to judge offers against.

    ``foreign_peers`` are the peers on the device the agent did not add (the hub
    and hand-configured ones), each with its allowed IPs.
    """

    own_key: str
    hub_key: str
    tunnel_networks: tuple[IPNetwork, ...]
    own_tunnel_ips: tuple[IPAddress, ...]
    hub_tunnel_ips: tuple[IPAddress, ...]
    lan_networks: tuple[IPNetwork, ...]
    foreign_peers: Mapping[str, tuple[IPNetwork, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )
    # This host's own addresses on those LANs: an offer pointing at us is refused.
    own_lan_ips: tuple[IPAddress, ...] = ()


@dataclass(frozen=True)
class Refusal:
    """An offer the filter refused, and why (meant for a log line)."""

    pubkey: str
    reason: str


@dataclass(frozen=True)
class FilterResult:
    accepted: tuple[DirectPeer, ...]
    refused: tuple[Refusal, ...]


def _shown(value: object, limit: int = 60) -> str:
    """A server-supplied value fit for a log line: quoted, escaped, truncated."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _host_route(network: IPNetwork) -> bool:
    return network.prefixlen == network.max_prefixlen


def _network_or_broadcast(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    """True when ``address`` is the network or broadcast address of every one of
    ``networks`` that holds it. /31, /32 (and /127, /128) have none to avoid."""
    return all(
        net.prefixlen < net.max_prefixlen - 1
        and address in (net.network_address, net.broadcast_address)
        for net in networks
    )


def _parse_endpoint(offer: PeerOffer, ctx: SafetyContext) -> Endpoint | str | None:
    """The offer's endpoint, None for none (a passive peer), or the reason it is refused."""
    if not offer.endpoint or offer.port is None:
        # An address without a port (or a port without an address) cannot be tried:
        # wireguard-web and this server send neither for a neighbour of unknown port.
        return None
    try:
        address = ip_address(offer.endpoint.strip().removeprefix("[").removesuffix("]"))
    except ValueError:
        return f"endpoint {_shown(offer.endpoint)} is not an IP address"
    if not 1 <= offer.port <= 65535:
        return f"port {offer.port} out of range"
    if address.is_multicast or address.is_unspecified or address.is_loopback:
        return f"endpoint {address} is not a unicast LAN address"
    if address in ctx.own_lan_ips:
        return f"endpoint {address} is this host's own LAN address"
    lans = [net for net in ctx.lan_networks if address in net]
    if not lans:
        return f"endpoint {address} is outside the LANs this agent reported"
    if _network_or_broadcast(address, lans):
        return f"endpoint {address} is the network or broadcast address of its LAN"
    return Endpoint(address, offer.port)


def _parse_allowed_ip(
    text: str, ctx: SafetyContext, explicit: Mapping[IPNetwork, str]
) -> IPNetwork | str:
    """One allowed IP of an offer, or the reason it is refused."""
    try:
        network = ip_network(text.strip(), strict=True)
    except (ValueError, TypeError):
        return f"allowed IP {_shown(text)} is not a network"
    if not _host_route(network):
        return f"allowed IP {network} is not a host route (/32 or /128)"
    address = network.network_address
    tunnels = [net for net in ctx.tunnel_networks if address in net]
    if not tunnels:
        return f"allowed IP {network} is outside the tunnel network"
    if _network_or_broadcast(address, tunnels):
        return f"allowed IP {network} is the network or broadcast address of the tunnel"
    if address in ctx.hub_tunnel_ips:
        return f"allowed IP {network} is the hub's tunnel address"
    if address in ctx.own_tunnel_ips:
        return f"allowed IP {network} is this host's own tunnel address"
    owner = explicit.get(network)
    if owner is not None:
        return f"allowed IP {network} belongs to hand-configured peer {owner[:8]}…"
    return network


def _check_offer(
    offer: PeerOffer, ctx: SafetyContext, explicit: Mapping[IPNetwork, str]
) -> DirectPeer | str:
    key = offer.pubkey
    if not is_valid_key(key):
        return "not a WireGuard public key (base64 of 32 bytes)"
    if key == ctx.own_key:
        return "this agent's own key"
    if key == ctx.hub_key:
        return "the hub's key"
    if key in ctx.foreign_peers:
        return "a peer the agent did not add (hand-configured) already has this key"
    endpoint = _parse_endpoint(offer, ctx)
    if isinstance(endpoint, str):
        return endpoint
    if not offer.ip:
        return "no allowed IPs"
    if len(offer.ip) > MAX_ALLOWED_IPS_PER_PEER:
        return f"{len(offer.ip)} allowed IPs (at most {MAX_ALLOWED_IPS_PER_PEER})"
    allowed: list[IPNetwork] = []
    for text in offer.ip:
        # One bad allowed IP refuses the whole offer rather than trimming it: a server
        # that sends a hijacking route is not trusted for the rest of that peer either,
        # and a trimmed peer would quietly differ from what its owner announced.
        network = _parse_allowed_ip(text, ctx, explicit)
        if isinstance(network, str):
            return network
        allowed.append(network)
    if len(set(allowed)) != len(allowed):
        return "the same allowed IP listed twice"
    return DirectPeer(key, endpoint, tuple(allowed))


def _explicit_host_routes(ctx: SafetyContext) -> dict[IPNetwork, str]:
    """Host routes that hand-configured peers carry explicitly, mapped to their key.

    The hub is left out: it may carry a neighbour's /32 explicitly, and moving that
    route to the direct peer is the point (the ledger remembers it, to give it back).
    """
    return {
        network: key
        for key, networks in ctx.foreign_peers.items()
        if key != ctx.hub_key
        for network in networks
        if _host_route(network)
    }


def _claimed_ips(offer: PeerOffer) -> set[IPNetwork]:
    claimed: set[IPNetwork] = set()
    for text in offer.ip[:MAX_ALLOWED_IPS_PER_PEER]:
        try:
            claimed.add(ip_network(text.strip(), strict=False))
        except (ValueError, TypeError):
            continue
    return claimed


def filter_offers(offers: Sequence[PeerOffer], ctx: SafetyContext) -> FilterResult:
    """Split the server's offers into safe direct peers and refusals.

    Offers that share a key, or claim the same allowed IP, are all refused: the
    server contradicts itself and the agent cannot tell which one is right.
    """
    explicit = _explicit_host_routes(ctx)
    key_count = Counter(offer.pubkey for offer in offers)
    ip_count: Counter[IPNetwork] = Counter()
    for offer in offers:
        ip_count.update(_claimed_ips(offer))

    accepted: list[DirectPeer] = []
    refused: list[Refusal] = []
    for offer in offers:
        shown = offer.pubkey if is_valid_key(offer.pubkey) else _shown(offer.pubkey)
        if key_count[offer.pubkey] > 1:
            refused.append(Refusal(shown, "offered more than once"))
            continue
        shared = sorted(str(n) for n in _claimed_ips(offer) if ip_count[n] > 1)
        if shared:
            refused.append(Refusal(shown, f"allowed IP {shared[0]} is offered for another peer"))
            continue
        result = _check_offer(offer, ctx, explicit)
        if isinstance(result, str):
            refused.append(Refusal(shown, result))
        else:
            accepted.append(result)
    return FilterResult(tuple(accepted), tuple(refused))


def parse_answer(raw: bytes) -> PeeringAnswer:
    """Parse a 200 answer body; raises ``UnsafeAnswer`` for one refused whole
    (larger than 1 MiB, more than 256 peers, not JSON, not the wire format)."""
    if len(raw) > MAX_ANSWER_BYTES:
        raise UnsafeAnswer(f"answer of {len(raw)} bytes exceeds {MAX_ANSWER_BYTES}")
    try:
        answer = PeeringAnswer.from_json(json.loads(raw))
    except (ValueError, RecursionError) as exc:
        # WireFormatError names the field; json's own errors say where the text broke.
        what = exc if isinstance(exc, WireFormatError) else f"not JSON: {exc}"
        raise UnsafeAnswer(f"answer is not the wire format: {what}") from exc
    if len(answer.peers) > MAX_PEERS:
        raise UnsafeAnswer(f"answer offers {len(answer.peers)} peers (at most {MAX_PEERS})")
    return answer
