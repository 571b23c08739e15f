"""OpenTelemetry traces of data calls, exported over OTLP/HTTP to a
collector on loopback (a real HTTP server decoding the protobuf requests):
the call's span continues the caller's trace, its stages are its children,
the upstream receives a ``traceparent`` naming the upstream span, a refusal
is a span with its problem, and no span carries the token or the path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from config.settings import ConfigurationError, load_settings
from gateway.state import TRACING
from tests.conftest import World, free_port

WorldFactory = Callable[..., Awaitable[World]]

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    status_code: int
    service: str


@dataclass
class Collector:
    url: str
    spans: list[Span] = field(default_factory=list)
    content_types: set[str] = field(default_factory=set)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    """An OTLP/HTTP traces receiver: ``POST /v1/traces``, protobuf."""
    port = free_port()
    state = Collector(f"http://127.0.0.1:{port}/v1/traces")

    async def traces(request: web.Request) -> web.Response:
        state.content_types.add(request.content_type)
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    state.spans.append(
                        Span(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status_code=span.status.code,
                            service=str(resource.get("service.name")),
                        )
                    )
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield state
    finally:
        await runner.cleanup()


async def _exported(world: World, collector: Collector, trace_id: str, count: int) -> list[Span]:
    """The spans of ``trace_id`` once ``count`` have reached the collector."""
    await asyncio.to_thread(world.app[TRACING].flush)
    for _ in range(100):
        spans = [s for s in collector.spans if s.trace_id == trace_id]
        if len(spans) >= count:
            return spans
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len([s for s in collector.spans if s.trace_id == trace_id])} of {count} spans")


SERVER, CLIENT = 2, 3  # opentelemetry.proto.trace.v1.Span.SpanKind
ERROR = 2  # Status.StatusCode.STATUS_CODE_ERROR


async def test_a_served_call_is_one_trace_with_its_stages(
    world_factory: WorldFactory, collector: Collector
) -> None:
    world = await world_factory(tracing__otlp_endpoint=collector.url, tracing__service_name="pdg-test")
    ds, lic, _app, token = await world.licensed()
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"  # the caller does not sample: we decide
    status, body, resp = await world.call(
        f"/data/{ds['id']}/records?secret=1", token, headers={"traceparent": traceparent}
    )
    assert status == 200, body
    call_id = resp.headers["X-Call-Id"]

    spans = await _exported(world, collector, CALLER_TRACE, 6)
    assert collector.content_types == {"application/x-protobuf"}
    (root,) = [s for s in spans if s.kind == SERVER]
    assert root.name == "GET /data/{dataset}"
    assert root.parent_id == CALLER_SPAN, "the caller's trace is continued"
    assert root.service == "pdg-test"
    assert root.attributes["pdg.call_id"] == call_id
    assert root.attributes["pdg.dataset"] == ds["id"]
    assert root.attributes["pdg.licensee"] == lic["licensee_id"]
    assert root.attributes["pdg.outcome"] == "served"
    assert root.attributes["http.response.status_code"] == 200
    children = {s.name: s for s in spans if s.parent_id == root.span_id}
    assert set(children) == {"pdg.authenticate", "pdg.authorize", "pdg.reserve", "pdg.upstream", "pdg.relay"}
    upstream_span = children["pdg.upstream"]
    assert upstream_span.kind == CLIENT
    assert upstream_span.attributes["http.response.status_code"] == 200

    # The upstream was asked with the trace, its parent the upstream span.
    sent = world.upstream.last["headers"]["traceparent"]
    version, trace_id, parent_id, flags = sent.split("-")
    assert (version, trace_id, parent_id, flags) == ("00", CALLER_TRACE, upstream_span.span_id, "01")

    for span in spans:
        for value in span.attributes.values():
            assert token not in str(value)
            assert "records" not in str(value), span
            assert "secret" not in str(value), span


async def test_a_refused_call_is_a_span_with_its_problem(
    world_factory: WorldFactory, collector: Collector
) -> None:
    world = await world_factory(tracing__otlp_endpoint=collector.url)
    ds, _lic, _app, _token = await world.licensed()
    trace = "0af7651916cd43dd8448eb211c80319c"
    status, body, _ = await world.call(
        f"/data/{ds['id']}/x", "not-a-token", headers={"traceparent": f"00-{trace}-b7ad6b7169203331-01"}
    )
    assert status == 401, body
    spans = await _exported(world, collector, trace, 2)
    (root,) = [s for s in spans if s.kind == SERVER]
    assert root.attributes["http.response.status_code"] == 401
    assert root.attributes["pdg.problem"] == "invalid-token"
    assert root.status_code != ERROR, "a caller's mistake is not the gateway's error"
    assert [s.name for s in spans if s.parent_id == root.span_id] == ["pdg.authenticate"]

    # An upstream that cannot be reached: a 503 span marked as an error.
    dead = await world.dataset(upstream_url=f"http://127.0.0.1:{free_port()}/svc")
    lic_ee = await world.licensee()
    await world.licence(lic_ee["id"], [dead["id"]])
    app = await world.app_client(lic_ee["id"])
    token = await world.token(app, f"purpose:public-interest dataset:{dead['id']}")
    trace = "1af7651916cd43dd8448eb211c80319c"
    status, body, _ = await world.call(
        f"/data/{dead['id']}/x", token, headers={"traceparent": f"00-{trace}-b7ad6b7169203331-01"}
    )
    assert status == 503, body
    spans = await _exported(world, collector, trace, 5)
    (root,) = [s for s in spans if s.kind == SERVER]
    assert root.attributes["pdg.problem"] == "upstream-unavailable"
    assert root.attributes["pdg.outcome"] == "upstream-failure"
    assert root.status_code == ERROR
    assert "pdg.record" in {s.name for s in spans if s.parent_id == root.span_id}


async def test_sampling_is_the_gateways_decision(world_factory: WorldFactory, collector: Collector) -> None:
    """At ratio 0 no call is traced, whatever the caller's sampled flag; the
    caller's ``traceparent`` then reaches the upstream untouched."""
    world = await world_factory(tracing__otlp_endpoint=collector.url, tracing__sample_ratio=0.0)
    ds, _lic, _app, token = await world.licensed()
    traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    status, body, _ = await world.call(
        f"/data/{ds['id']}/records", token, headers={"traceparent": traceparent}
    )
    assert status == 200, body
    await asyncio.to_thread(world.app[TRACING].flush)
    assert collector.spans == []
    sent = world.upstream.last["headers"]["traceparent"]
    assert sent.split("-")[1] == CALLER_TRACE
    assert sent.split("-")[3] == "00", "an unsampled span is passed on as unsampled"


def test_an_endpoint_that_is_not_a_url_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="otlp_endpoint"):
        load_settings(env={"PDG_OTLP_ENDPOINT": "collector:4318"})
