"""OpenTelemetry traces of data calls (``tracing.otlp_endpoint``; the
``[otel]`` extra).

A data call is one span (kind server, ``{method} /data/{dataset}``) whose
children are its stages::

    GET /data/{dataset}          pdg.call_id, pdg.dataset, pdg.licensee,
    │                            pdg.outcome, pdg.problem, http status
    ├── pdg.authenticate         the token (and DPoP proof)
    ├── pdg.authorize            the licence and operation rules
    ├── pdg.reserve              the quota reservation
    ├── pdg.upstream             one per attempt (kind client); the request
    │                            carries ``traceparent`` naming this span
    └── pdg.relay                the answer relayed and the call recorded
        (pdg.record instead, for a refused call's record)

A caller's ``traceparent`` continues its trace (W3C Trace Context), but
whether a call is sampled is ``tracing.sample_ratio``'s decision alone: a
caller cannot make the gateway trace, and export, every call. Spans carry no
token, query, body or path (a path may hold a personal segment); the route is
the template. Spans leave in batches over OTLP/HTTP from a thread of the SDK,
never on the call's path; the provider is this application's own (not the
process-global one), flushed when the gateway stops.

With no endpoint set, :class:`Tracing` is a no-op whose stages cost a method
call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from config.settings import ConfigurationError, Settings
from gateway.access_log import RECORD

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = ["Tracing", "tracing_for"]

_NULL = contextlib.nullcontext()


class Tracing:
    """No traces: every stage a shared null context."""

    enabled = False

    def stage(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        """A child span of the call's span around one stage."""
        return _NULL

    def client(self, name: str, headers: MutableMapping[str, str], **attributes: Any) -> Any:
        """A client span around an upstream attempt, its context written into
        ``headers`` as ``traceparent``."""
        return _NULL

    def flush(self) -> None:
        """Export what is waiting (blocking)."""

    async def close(self) -> None:
        """Flush and stop exporting."""


class OpenTelemetryTracing(Tracing):
    enabled = True

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self._trace = trace
        self._tracer = provider.get_tracer("pdg.gateway")
        self._propagator = TraceContextTextMapPropagator()

    @contextlib.contextmanager
    def call(self, request: web.Request) -> Iterator[Any]:
        """The call's span: the caller's trace continued, this task's current
        span while the handler runs."""
        parent = self._propagator.extract(carrier=request.headers)
        with self._tracer.start_as_current_span(
            f"{request.method} /data/{{dataset}}",
            context=parent,
            kind=self._trace.SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": "/data/{dataset}/{path}"},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span

    def stage(self, name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
        return self._tracer.start_as_current_span(
            name, attributes=attributes, record_exception=False, set_status_on_exception=False
        )

    @contextlib.contextmanager
    def client(self, name: str, headers: MutableMapping[str, str], **attributes: Any) -> Iterator[Any]:
        with self._tracer.start_as_current_span(
            name,
            kind=self._trace.SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            self._propagator.inject(headers)
            yield span

    def ended(self, span: Any, request: web.Request, status: int, problem: str | None) -> None:
        """The call's outcome on its span, from its record."""
        record: dict[str, Any] = request.get(RECORD) or {}
        for attribute, key in (
            ("pdg.call_id", "call_id"),
            ("pdg.request_id", "request_id"),
            ("pdg.dataset", "dataset_id"),
            ("pdg.licensee", "licensee_id"),
            ("pdg.purpose", "purpose"),
            ("pdg.outcome", "outcome"),
            ("pdg.problem", "problem"),
        ):
            value = record.get(key)
            if isinstance(value, str) and value:
                span.set_attribute(attribute, value)
        span.set_attribute("http.response.status_code", status)
        if problem is not None:
            span.set_attribute("pdg.problem", problem)
        problem = problem or record.get("problem")
        if status >= 500:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, problem or str(status)))

    def flush(self) -> None:
        self.provider.force_flush()

    async def close(self) -> None:
        # The exporter may wait on an unreachable collector: not on the loop.
        await asyncio.to_thread(self.provider.shutdown)


def tracing_for(settings: Settings) -> Tracing:
    """The tracing ``settings.tracing`` asks for: none without an endpoint;
    else spans batched to the OTLP/HTTP endpoint."""
    config = settings.tracing
    if not config.otlp_endpoint:
        return Tracing()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as exc:
        raise ConfigurationError(
            "tracing.otlp_endpoint needs the [otel] extra: pip install 'public-data-gateway[otel]'"
        ) from exc
    ratio = TraceIdRatioBased(config.sample_ratio)
    # The ratio decides for every call, whatever a caller's sampled flag says.
    sampler = ParentBased(root=ratio, remote_parent_sampled=ratio, remote_parent_not_sampled=ratio)
    provider = TracerProvider(
        sampler=sampler, resource=Resource.create({"service.name": config.service_name})
    )
    exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=5)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return OpenTelemetryTracing(provider)
