"""Prometheus metrics of one server instance (its own registry, so tests stay apart)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# How often the loop-lag probe wakes up.
LAG_PROBE_INTERVAL_S = 0.25


class ServerMetrics:
    """Requests by outcome, latency, registered clients, LAN groups and waiting queries."""

    def __init__(
        self,
        *,
        clients: Callable[[], float],
        groups: Callable[[], float],
        degraded: Callable[[], float] = lambda: 0.0,
        store_queued: Callable[[], float] = lambda: 0.0,
        store_failures: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "wg_autopeer_requests",
            "Requests to the coordination server, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "wg_autopeer_request_duration_seconds",
            "Time to answer a request (blocking queries include their wait)",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 15, 30, 60, 90),
            registry=self.registry,
        )
        self.waiting = Gauge(
            "wg_autopeer_waiting_queries",
            "Blocking queries waiting for a change",
            registry=self.registry,
        )
        Gauge(
            "wg_autopeer_registered_clients",
            "Clients with a live registration",
            registry=self.registry,
        ).set_function(clients)
        Gauge(
            "wg_autopeer_lan_groups",
            "Distinct (public IP, gateway, network) groups",
            registry=self.registry,
        ).set_function(groups)
        Gauge(
            "wg_autopeer_degraded",
            "1 while the registry store or its change feed fails (serving from memory)",
            registry=self.registry,
        ).set_function(degraded)
        Gauge(
            "wg_autopeer_store_queued_changes",
            "Changes waiting to be written to the registry store",
            registry=self.registry,
        ).set_function(store_queued)
        Gauge(
            "wg_autopeer_store_failed_writes",
            "Writes to the registry store that failed since the start (retried)",
            registry=self.registry,
        ).set_function(store_failures)
        self.dropped = Counter(
            "wg_autopeer_dropped_registrations",
            "Registrations dropped, by reason",
            ["reason"],
            registry=self.registry,
        )

        self._by_outcome: dict[str, Counter] = {}
        self.loop_lag = Histogram(
            "wg_autopeer_event_loop_lag_seconds",
            "How late the event loop ran a timer: time every request waited behind other work",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
            registry=self.registry,
        )

    async def probe_loop_lag(self, interval: float = LAG_PROBE_INTERVAL_S) -> None:
        """Until cancelled: sleep ``interval``, record how much later than asked it woke."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag.observe(max(0.0, loop.time() - due))

    def observe(self, outcome: str, seconds: float) -> None:
        counter = self._by_outcome.get(outcome)
        if counter is None:
            # Outcomes are a short list of our own names (and http_NNN): bound once each.
            counter = self._by_outcome[outcome] = self.requests.labels(outcome=outcome)
        counter.inc()
        self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
