"""Prometheus metrics. Labels are dataset ids from the catalogue (an id the
catalogue does not know collapses to ``unknown``), purposes, problem codes and
quota pools, never raw paths, caller ids or other unbounded input.

Two kinds live here:

- **counted** — counters and histograms that calls move. With
  ``pdg serve --workers N`` every worker writes them to files in one folder
  (prometheus-client's multiprocess mode, :data:`MULTIPROCESS_DIR` set by the
  supervisor before the workers start) and a scrape of any worker sums them
  all, as though one process had served every call.
- **read at scrape** (:class:`ScrapeState`) — the state of what the gateway
  depends on (database, Redis, the ledger's backlog and lag, the newest
  checkpoint's age, the licence view's age, the build). The worker answering
  the scrape reads them then; they are never summed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

__all__ = ["CONTENT_TYPE_LATEST", "MULTIPROCESS_DIR", "Metrics", "ScrapeState"]

#: The variable prometheus-client reads, when imported, to keep its values in
#: files shared by processes.
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

#: Problem codes that are a quota pool's refusal, and the pool.
QUOTA_POOLS = {"quota-exhausted": "free", "payment-required": "paid", "rate-limited": "burst"}

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ScrapeState(Collector):
    """The gauges read when scraped (``gateway.health``), set just before the
    exposition and reported by this process alone."""

    def __init__(self, version: str = "") -> None:
        self.version = version
        self.database_up = math.nan
        self.redis_up = math.nan
        self.ledger_backlog = math.nan
        self.writer_lag = math.nan
        self.last_checkpoint_age = math.nan
        self.view_age = math.nan

    def collect(self) -> Iterator[Metric]:
        info = InfoMetricFamily("pdg_build", "The gateway's version.")
        info.add_metric([], {"version": self.version})
        yield info
        for name, documentation, value in (
            ("pdg_database_up", "1 when the SQL database answered the scrape's probe.", self.database_up),
            ("pdg_redis_up", "1 when Redis (or embedded Valkey) answered the scrape's probe.", self.redis_up),
            (
                "pdg_ledger_log_backlog",
                "Call records waiting in the log for the ledger writer (past ledger.max_backlog: 503).",
                self.ledger_backlog,
            ),
            (
                "pdg_ledger_writer_lag_seconds",
                "Age of the oldest call record the ledger writer has not yet stored (0 when none waits).",
                self.writer_lag,
            ),
            (
                "pdg_ledger_last_checkpoint_age_seconds",
                "Seconds since the newest signed checkpoint of the call record (NaN when none can be read).",
                self.last_checkpoint_age,
            ),
            (
                "pdg_licence_view_age_seconds",
                "Seconds since the licence and catalogue view was confirmed (past 2 s: data calls refused).",
                self.view_age,
            ),
        ):
            yield GaugeMetricFamily(name, documentation, value=value)


class Metrics:
    def __init__(self, version: str = "") -> None:
        #: The folder of a multiprocess gateway's values, or None.
        self.multiprocess_dir = os.environ.get(MULTIPROCESS_DIR) or None
        self.registry = CollectorRegistry(auto_describe=True)
        self.state = ScrapeState(version)
        self.registry.register(self.state)
        self.data_calls = Counter(
            "pdg_data_calls",
            "Data-plane calls by dataset, purpose and outcome (status class or problem code).",
            ["dataset", "purpose", "outcome"],
            registry=self.registry,
        )
        self.refusals = Counter(
            "pdg_data_refusals",
            "Data-plane calls refused by the gateway, by problem code.",
            ["code"],
            registry=self.registry,
        )
        self.quota_refusals = Counter(
            "pdg_quota_refusals",
            "Data-plane calls refused for quota, by pool (free allowance, paid balance, burst rate).",
            ["pool"],
            registry=self.registry,
        )
        self.data_latency = Histogram(
            "pdg_data_call_seconds",
            "Data-plane call latency, gateway in to last byte out.",
            ["dataset"],
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self.upstream_latency = Histogram(
            "pdg_upstream_seconds",
            "Served calls: the upstream's time to answer (its response's head, across attempts).",
            ["dataset"],
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
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

        # A label set's child, found once (``labels()`` takes a lock and
        # checks the labels on every call).
        self._calls: dict[tuple[str, str, str], Any] = {}
        self._refusals: dict[str, tuple[Any, Any | None]] = {}
        self._latency: dict[str, Any] = {}
        self._split: dict[str, tuple[Any, Any]] = {}

    def data_call(self, dataset: str, purpose: str, outcome: str) -> None:
        """Count one data-plane call."""
        labels = (dataset, purpose, outcome)
        child = self._calls.get(labels)
        if child is None:
            child = self._calls[labels] = self.data_calls.labels(*labels)
        child.inc()

    def refusal(self, dataset: str, purpose: str, code: str) -> None:
        """Count one data-plane call the gateway refused with ``code``."""
        self.data_call(dataset, purpose, code)
        children = self._refusals.get(code)
        if children is None:
            pool = QUOTA_POOLS.get(code)
            children = self._refusals[code] = (
                self.refusals.labels(code),
                self.quota_refusals.labels(pool) if pool is not None else None,
            )
        children[0].inc()
        if children[1] is not None:
            children[1].inc()

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
        """The text exposition: with workers, every worker's counts summed,
        and this worker's scrape-time state."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        registry.register(self.state)
        return generate_latest(registry)
