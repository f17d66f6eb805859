"""Prometheus metrics of one :class:`~gateway.runtime.Gateway`.

Each gateway has its own :class:`~prometheus_client.CollectorRegistry` (never the global one), so
several gateways can run in one process (tests).  The runtime calls the small methods of
:class:`Metrics`; a runtime built without one gets a private, unexported instance (no-op in effect).
What the instances' status already counts (reconnects, turns in flight, state) is read from it when
``/metrics`` is scraped rather than counted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from gateway.supervisor import InstanceStatus

__all__ = ["Metrics"]

_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class _HasStatus(Protocol):
    @property
    def status(self) -> InstanceStatus: ...


class Metrics:
    """The counters and histograms of one gateway."""

    def __init__(self, instances: Callable[[], Mapping[str, _HasStatus]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._messages = Counter(
            "gateway_messages",
            "Messages per instance and outcome (received, duplicate, answered, failed, "
            "interrupted, denied)",
            ["instance", "outcome"],
            registry=self.registry,
        )
        self._feedback = Counter(
            "gateway_feedback",
            "Feedback on replies per instance and rating",
            ["instance", "rating"],
            registry=self.registry,
        )
        self._api_calls = Counter(
            "gateway_platform_api_calls",
            "Platform API call attempts per instance and outcome (ok, retried, rate_limited, failed)",
            ["instance", "outcome"],
            registry=self.registry,
        )
        self._first_chunk = Histogram(
            "gateway_agent_first_chunk_seconds",
            "Seconds from the start of a turn to the agent's first chunk",
            ["instance"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._answer = Histogram(
            "gateway_agent_answer_seconds",
            "Seconds from the start of a turn to the agent's full answer",
            ["instance"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        if instances is not None:
            self.registry.register(_StatusCollector(instances))

    def message(self, instance: str, outcome: str, count: int = 1) -> None:
        self._messages.labels(instance, outcome).inc(count)

    def feedback(self, instance: str, rating: str) -> None:
        self._feedback.labels(instance, rating).inc()

    def api_call(self, instance: str, outcome: str) -> None:
        self._api_calls.labels(instance, outcome).inc()

    def first_chunk(self, instance: str, seconds: float) -> None:
        self._first_chunk.labels(instance).observe(seconds)

    def answer(self, instance: str, seconds: float) -> None:
        self._answer.labels(instance).observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text format of everything in the registry."""
        return generate_latest(self.registry)


class _StatusCollector:
    """Reads the instances' status at scrape time."""

    def __init__(self, instances: Callable[[], Mapping[str, _HasStatus]]) -> None:
        self._instances = instances

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Any]:
        reconnects = CounterMetricFamily(
            "gateway_reconnects", "Reconnections per instance", labels=["instance"]
        )
        in_flight = GaugeMetricFamily(
            "gateway_in_flight_turns", "Messages being answered per instance", labels=["instance"]
        )
        connected = GaugeMetricFamily(
            "gateway_instance_connected", "1 if the instance is connected", labels=["instance"]
        )
        for name, runtime in sorted(dict(self._instances()).items()):
            status = runtime.status
            reconnects.add_metric([name], status.reconnects)
            in_flight.add_metric([name], status.in_flight)
            connected.add_metric([name], 1 if status.state == "connected" else 0)
        yield reconnects
        yield in_flight
        yield connected
