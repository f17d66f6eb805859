"""Prometheus metrics of one :class:`~gateway.runtime.Gateway`.

Each gateway has its own :class:`~prometheus_client.CollectorRegistry` (never the global one), so
several gateways can run in one process (tests).  The runtime calls the small methods of
:class:`Metrics`; a runtime built without one gets a private, unexported instance (no-op in effect).
What the instances' status already counts (reconnects, turns in flight, state) is read from it when
``/metrics`` is scraped rather than counted twice.

Every series of an instance exists from its start, at 0 (:meth:`Metrics.track`): ``rate()`` and
alerts on an outcome that has not happened yet see 0 rather than no data.  A removed instance's
series go (:meth:`Metrics.forget`).  The ``*_created`` series are left out of the exposition: they
double the output and Prometheus does not use them in the text format.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, get_args

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from gateway.models import Outcome
from gateway.ratelimit import CallOutcome
from gateway.supervisor import InstanceStatus

__all__ = ["API_CALL_OUTCOMES", "MESSAGE_OUTCOMES", "Metrics"]

#: The outcomes of ``gateway_messages_total``: messages from the platform (received, duplicate,
#: then how the reply ended) and proactive ones from the outbound API (sent, send_failed).
MESSAGE_OUTCOMES = ("received", "duplicate", *(o.value for o in Outcome), "sent", "send_failed")
API_CALL_OUTCOMES: tuple[str, ...] = get_args(CallOutcome)

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
            "Messages per instance and outcome: received, duplicate, answered, failed, "
            "interrupted, denied (from the platform); sent, send_failed (proactive message "
            "parts sent through the outbound API, failed requests)",
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
            f"Platform API call attempts per instance and outcome ({', '.join(API_CALL_OUTCOMES)})",
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
        # Each counter with its second label and the values known in advance.
        self._labelled: tuple[tuple[Counter, str, tuple[str, ...]], ...] = (
            (self._messages, "outcome", MESSAGE_OUTCOMES),
            (self._feedback, "rating", ()),  # the drivers' own: they appear with the first click
            (self._api_calls, "outcome", API_CALL_OUTCOMES),
        )

    def track(self, instance: str) -> None:
        """Create the series of ``instance`` at 0."""
        for metric, _, known in self._labelled:
            for value in known:
                metric.labels(instance, value)
        self._first_chunk.labels(instance)
        self._answer.labels(instance)

    def forget(self, instance: str) -> None:
        """Remove every series of ``instance`` (removed by a reload: its last values would
        otherwise be exported for as long as the process runs)."""
        for metric, label, _ in self._labelled:
            values = {
                sample.labels[label]
                for family in metric.collect()
                for sample in family.samples
                if sample.labels.get("instance") == instance
            }
            for value in values:
                metric.remove(instance, value)
        for histogram in (self._first_chunk, self._answer):
            # Older prometheus-client versions raise KeyError for a series that does not exist.
            with contextlib.suppress(KeyError):
                histogram.remove(instance)

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
        """The Prometheus text format of everything in the registry but ``*_created``."""
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """The registry's metrics without their ``*_created`` samples.  Filtered here rather than with
    prometheus_client's ``disable_created_metrics()``, which would change every registry of the
    process (a plugin's or an agent library's too)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            created = f"{family.name}_created"
            family.samples = [s for s in family.samples if s.name != created]
            yield family


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
