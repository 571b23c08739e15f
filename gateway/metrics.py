"""Prometheus metrics. Labels are dataset ids from the catalogue (unknown ids
collapse to ``unknown``) and problem codes, never raw paths or caller ids."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.data_calls = Counter(
            "pdg_data_calls",
            "Data-plane calls by dataset and outcome (status class or problem code).",
            ["dataset", "outcome"],
            registry=self.registry,
        )
        self.data_latency = Histogram(
            "pdg_data_call_seconds",
            "Data-plane call latency, gateway in to last byte out.",
            ["dataset"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.upstream_latency = Histogram(
            "pdg_upstream_seconds",
            "Served calls: the upstream's time to answer (its response's head, across attempts).",
            ["dataset"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.overhead = Histogram(
            "pdg_gateway_overhead_seconds",
            "Served calls: the rest of the call's time (checks, metering, record, relay).",
            ["dataset"],
            registry=self.registry,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        self.tokens_issued = Counter(
            "pdg_tokens_issued",
            "Access tokens issued, by client authentication method.",
            ["method"],
            registry=self.registry,
        )
        self.token_refusals = Counter(
            "pdg_token_refusals",
            "Token endpoint refusals by problem code.",
            ["code"],
            registry=self.registry,
        )
        self.credential_failures = Counter(
            "pdg_credential_failures",
            "Failed credential checks (unknown id, wrong secret) by endpoint (token, admin).",
            ["endpoint"],
            registry=self.registry,
        )
        self.credential_throttled = Counter(
            "pdg_credential_throttled",
            "Requests refused (429) for too many failed credential checks, by endpoint.",
            ["endpoint"],
            registry=self.registry,
        )
        self.credential_throttle_unavailable = Counter(
            "pdg_credential_throttle_unavailable",
            "Credential checks made unthrottled because Redis was out of reach.",
            registry=self.registry,
        )

        # Read when scraped (``gateway.health.metrics``): the state of what
        # the gateway depends on.
        self.build_info = Info("pdg_build", "The gateway's version.", registry=self.registry)
        self.database_up = Gauge(
            "pdg_database_up", "1 when the SQL database answered the scrape's probe.", registry=self.registry
        )
        self.redis_up = Gauge(
            "pdg_redis_up",
            "1 when Redis (or the embedded Valkey) answered the scrape's probe.",
            registry=self.registry,
        )
        self.ledger_backlog = Gauge(
            "pdg_ledger_log_backlog",
            "Call records waiting in the log for the ledger writer (past ledger.max_backlog: 503).",
            registry=self.registry,
        )
        self.last_checkpoint_age = Gauge(
            "pdg_ledger_last_checkpoint_age_seconds",
            "Seconds since the newest signed checkpoint of the call record (NaN when none can be read).",
            registry=self.registry,
        )
        self.view_age = Gauge(
            "pdg_licence_view_age_seconds",
            "Seconds since the licence and catalogue view was last confirmed (past 2 s: data calls refused).",
            registry=self.registry,
        )

        # A label set's child, found once (``labels()`` takes a lock and
        # checks the labels on every call).
        self._calls: dict[tuple[str, str], Any] = {}
        self._latency: dict[str, Any] = {}
        self._split: dict[str, tuple[Any, Any]] = {}

    def data_call(self, dataset: str, outcome: str) -> None:
        """Count one data-plane call."""
        child = self._calls.get((dataset, outcome))
        if child is None:
            child = self._calls[(dataset, outcome)] = self.data_calls.labels(dataset, outcome)
        child.inc()

    def data_call_seconds(self, dataset: str, seconds: float) -> None:
        child = self._latency.get(dataset)
        if child is None:
            child = self._latency[dataset] = self.data_latency.labels(dataset)
        child.observe(seconds)

    def split_seconds(self, dataset: str, upstream: float, total: float) -> None:
        """A served call's time: the upstream's share and the gateway's."""
        children = self._split.get(dataset)
        if children is None:
            children = self._split[dataset] = (
                self.upstream_latency.labels(dataset),
                self.overhead.labels(dataset),
            )
        children[0].observe(upstream)
        children[1].observe(max(total - upstream, 0.0))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
