"""OpenTelemetry tracing: off by default; on with ``MOE_SERVE_TRACING=console|otlp``.

Spans: each request through the ingress (continuing the client's W3C trace from gRPC metadata or HTTP headers),
the request inside its router replica, and, sampled by ``MOE_SERVE_TRACING_SAMPLING_RATIO``, each engine step
with the dispatch/combine of its MoE layers. Ray Serve's own proxy spans need RAY_SERVE_TRACING_* set where the
cluster starts (see the README); ours do not depend on them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from opentelemetry import context, trace
from opentelemetry.propagate import extract, inject

TRACER_NAME = "moe-serve"
_configured = False


def setup_tracing(environ: Mapping[str, str] = os.environ) -> bool:
    """Install the exporter named by MOE_SERVE_TRACING once per process; False when tracing is off."""
    global _configured
    kind = environ.get("MOE_SERVE_TRACING", "off").lower()
    if kind in ("", "off", "none") or _configured:
        return _configured
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    if kind == "console":
        exporter = ConsoleSpanExporter()
    elif kind == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise RuntimeError("MOE_SERVE_TRACING=otlp needs the opentelemetry-exporter-otlp package") from None
        exporter = OTLPSpanExporter()  # endpoint from OTEL_EXPORTER_OTLP_ENDPOINT
    else:
        raise ValueError(f"MOE_SERVE_TRACING={kind!r}: expected off, console or otlp")
    ratio = float(environ.get("MOE_SERVE_TRACING_SAMPLING_RATIO", "1.0"))
    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(ratio),
                              resource=Resource.create({"service.name": "moe-serve"}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _configured = True
    return True


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


@contextlib.contextmanager
def continue_trace(carrier: Mapping[str, str], name: str, **attributes) -> Iterator[trace.Span]:
    """A span that continues the caller's trace (W3C ``traceparent``/``tracestate`` in ``carrier``)."""
    parent = extract({k.lower(): v for k, v in carrier.items()})
    token = context.attach(parent)
    try:
        with tracer().start_as_current_span(name, attributes=attributes) as span:
            yield span
    finally:
        context.detach(token)


def current_carrier() -> dict[str, str]:
    """The current trace as W3C headers, to hand to the next process (e.g. in a GenerationRequest)."""
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier
