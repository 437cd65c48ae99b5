"""Prometheus metrics of one server instance (its own registry, so tests stay apart)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """Requests by outcome, latency, registered clients, LAN groups and waiting queries."""

    def __init__(
        self,
        *,
        clients: Callable[[], float],
        groups: Callable[[], float],
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
        self.dropped = Counter(
            "wg_autopeer_dropped_registrations",
            "Registrations dropped, by reason",
            ["reason"],
            registry=self.registry,
        )

    def observe(self, outcome: str, seconds: float) -> None:
        self.requests.labels(outcome=outcome).inc()
        self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
