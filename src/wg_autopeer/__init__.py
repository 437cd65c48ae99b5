"""wg-autopeer: direct WireGuard paths between hub-and-spoke clients that share a LAN.

Packages, one per concept:

- ``protocol``  wire models shared by agent and server (wireguard-web compatible)
- ``wireguard`` control of WireGuard devices: one interface, a kernel-netlink and a UAPI backend
- ``netview``   links, addresses and default routes, plus a debounced change stream
- ``agent``     the client side: report, filter, reconcile, ledger, health
- ``server``    the hub side: identity by tunnel address, registry, matching, blocking queries
- ``lab``       network-namespace topologies for tests, the demo and benchmarks
"""

from wg_autopeer.lazypackage import defer_init

__version__ = "0.1.0"

# pyroute2's __init__ imports its whole library; we use a few submodules (see lazypackage).
defer_init("pyroute2")
