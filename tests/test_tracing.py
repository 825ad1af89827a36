"""Tracing: a client's W3C trace continues into the ingress span and the router replica's request span;
engine steps are spans of their own. In process, with an in-memory exporter (the Serve proxy's own spans
need RAY_SERVE_TRACING_* where the cluster starts; they are Ray's, not ours)."""

import asyncio

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from models.checkpoint_writer import make_checkpoint
from router.request import GenerationRequest
from router.sampling import SamplingParams
from router.serve_router import Router
from router.tracing import continue_trace, current_carrier, setup_tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def exporter():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporter


def test_tracing_is_off_by_default_and_rejects_unknown_exporters():
    assert setup_tracing({}) is False
    with pytest.raises(ValueError, match="expected off, console or otlp"):
        setup_tracing({"MOE_SERVE_TRACING": "zipkin"})


def test_client_trace_continues_through_ingress_and_router(exporter, tmp_path):
    ckpt = make_checkpoint(tmp_path / "tiny", "tiny", seed=2)
    router = Router({"checkpoint": str(ckpt)})
    exporter.clear()

    async def call():
        # what the ingress does: a span continuing the client's trace, handed on inside the request
        with continue_trace({"traceparent": TRACEPARENT}, "moeserve.v1.MoeServeService/Generate"):
            request = GenerationRequest("t1", (5, 6, 7), SamplingParams(temperature=0, max_tokens=4),
                                        trace_context=tuple(current_carrier().items()))
        return [o async for o in router.generate(request)]

    try:
        outputs = asyncio.run(call())
    finally:
        router.engine.shutdown()
    assert outputs[-1].finished
    spans = {s.name: s for s in exporter.get_finished_spans()}
    ingress, routed = spans["moeserve.v1.MoeServeService/Generate"], spans["router.generate"]
    assert format(ingress.context.trace_id, "032x") == TRACE_ID
    assert routed.context.trace_id == ingress.context.trace_id and routed.parent.span_id == ingress.context.span_id
    assert routed.attributes["completion_tokens"] == 4
    assert any(s.name == "engine.step" for s in exporter.get_finished_spans())
