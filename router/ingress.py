"""The ingress deployment: gRPC (``moeserve.v1`` and ``grpc.health.v1``) and OpenAI HTTP, forwarding to routers.

Every bad input becomes a status with a message a person understands, and the next request is served.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator

import grpc
import ray
from grpc_health.v1 import health_pb2
from ray import serve

import torch

from models.config import load_config
from models.tokenizer import Tokenizer
from protos.moeserve.v1 import moeserve_pb2 as pb
from router.auth import check_bearer, load_api_token
from router.engine import max_sequence_len
from router.grpc_api import ApiError, complete_response, engine_request, generate_response, status_of
from router.openai_api import build_openai_app
from router.request import GenerationOutput, GenerationRequest
from router.settings import ServeSettings
from router.tracing import continue_trace, current_carrier, setup_tracing

log = logging.getLogger(__name__)


class RouterClient:
    """What the HTTP and gRPC layers need of the routers: generate, and who is being served."""

    def __init__(self, handle, tokenizer: Tokenizer, model_name: str, max_model_len: int):
        self.handle, self.tokenizer, self.model_name, self.max_model_len = handle, tokenizer, model_name, max_model_len

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        if not request.trace_context:  # hand the caller's trace on to the router replica
            request = dataclasses.replace(request, trace_context=tuple(current_carrier().items()))
        stream = self.handle.options(stream=True).generate.remote(request)
        finished = False
        try:
            async for out in stream:
                finished = out.finished
                yield out
        finally:
            if not finished:  # the client went away: cancelling reaches the router, which frees the KV blocks
                stream.cancel()


@serve.ingress()
class Ingress:
    def __init__(self, router, settings: dict):
        self.settings = s = ServeSettings(**settings)
        setup_tracing()
        cfg = load_config(s.checkpoint)
        self.cfg, self.tokenizer, self.router = cfg, Tokenizer.from_dir(s.checkpoint), router
        # the same limit the routers' engines enforce (model context and what their KV cache can hold)
        max_len = max_sequence_len(cfg, s.engine_config(), getattr(torch, s.dtype))
        self.client = RouterClient(router, self.tokenizer, s.model_name, max_len)
        self.api_token = load_api_token()

    def __serve_build_asgi_app__(self):
        app = build_openai_app(lambda: self.client, self.api_token, max_body_bytes=self.settings.max_request_bytes,
                               trace_context=lambda headers: continue_trace(headers, "http.request"))

        @app.get("/healthz")
        async def healthz():
            from fastapi.responses import JSONResponse

            serving, why = await self._serving()
            return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING", "reason": why},
                                status_code=200 if serving else 503)

        return app

    # -- gRPC: moeserve.v1.MoeServeService -------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> AsyncIterator[pb.GenerateResponse]:
        try:
            self._authenticate(grpc_context)
            with continue_trace(_trace_headers(grpc_context), "moeserve.v1.MoeServeService/Generate"):
                async for out in self._outputs(request):
                    yield generate_response(out)
        except Exception as e:
            self._fail(grpc_context, e)

    async def Complete(self, request: pb.CompleteRequest, grpc_context) -> pb.CompleteResponse:
        try:
            self._authenticate(grpc_context)
            with continue_trace(_trace_headers(grpc_context), "moeserve.v1.MoeServeService/Complete"):
                return complete_response([out async for out in self._outputs(request)])
        except Exception as e:
            self._fail(grpc_context, e)

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context) -> pb.TokenizeResponse:
        try:
            self._authenticate(grpc_context)
            if request.model and request.model != self.settings.model_name:
                raise ApiError(grpc.StatusCode.NOT_FOUND, f"model {request.model!r} is not served here")
            add_bos = request.add_bos if request.HasField("add_bos") else True
            return pb.TokenizeResponse(token_ids=self.tokenizer.encode(request.text, add_bos=add_bos))
        except Exception as e:
            self._fail(grpc_context, e)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, grpc_context) -> pb.GetModelInfoResponse:
        try:
            self._authenticate(grpc_context)
            status = await self.router.status.remote()
            cfg = self.cfg
            return pb.GetModelInfoResponse(
                model_name=self.settings.model_name, max_context_tokens=status["max_model_len"],
                vocab_size=cfg.vocab_size, num_layers=cfg.num_hidden_layers, num_experts=cfg.num_local_experts,
                experts_per_token=cfg.num_experts_per_tok, moe_layer_indices=list(cfg.moe_layers),
                placement_epoch=status["epoch"], num_expert_shards=status["num_shards"],
                num_router_replicas=self._num_routers(), dtype=self.settings.dtype)
        except Exception as e:
            self._fail(grpc_context, e)

    # -- gRPC: grpc.health.v1.Health -------------------------------------------------------------
    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context) -> health_pb2.HealthCheckResponse:
        serving, why = await self._serving()
        if not serving:
            log.info("health: NOT_SERVING (%s)", why)
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def _serving(self) -> tuple[bool, str]:
        """SERVING only once a router generated through every shard of the current epoch, and all are alive."""
        try:
            status = await self.router.status.remote()
        except Exception as e:
            return False, f"no router answers: {type(e).__name__}"
        if not status["ready"]:
            return False, status["error"] or "router warming up"
        if self.settings.fleet_name:
            try:
                fleet = ray.get_actor(self.settings.fleet_name, namespace=self.settings.fleet_namespace)
            except ValueError:
                return False, f"expert fleet {self.settings.fleet_name!r} is not running"
            dead = await fleet.dead_shards.remote()
            if dead:
                return False, f"expert shards {dead} are not answering"
        return True, ""

    # -- helpers ---------------------------------------------------------------------------------
    async def _outputs(self, request) -> AsyncIterator[GenerationOutput]:
        """The engine's outputs for a Generate/Complete request; a passed ``timeout_ms`` is DEADLINE_EXCEEDED."""
        async for out in self.client.generate(engine_request(request, self.tokenizer, self.settings.model_name)):
            if out.finish_reason == "deadline":
                raise ApiError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"request timed out after {request.timeout_ms} ms; the work was stopped")
            yield out

    def _authenticate(self, grpc_context) -> None:
        # With one app the proxy routes here whatever `application` says; a wrong name is still an error.
        app = dict(grpc_context.invocation_metadata()).get("application")
        if app and app != serve.get_replica_context().app_name:
            raise ApiError(grpc.StatusCode.NOT_FOUND, f"application {app!r} is not served here")
        if self.api_token is None:
            return
        metadata = dict(grpc_context.invocation_metadata())
        if not check_bearer(metadata.get("authorization"), self.api_token):
            raise ApiError(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in `authorization`")

    @staticmethod
    def _fail(grpc_context, error: Exception):
        api = status_of(error)
        if api.code == grpc.StatusCode.INTERNAL:
            log.exception("request failed")
        grpc_context.set_code(api.code)
        grpc_context.set_details(api.message)
        # Serve keeps the code and details we set; a plain exception so it crosses to the proxy intact.
        raise RuntimeError(api.message) from None

    @staticmethod
    def _num_routers() -> int:
        try:
            app = serve.status().applications[serve.get_replica_context().app_name]
            return app.deployments["Router"].replica_states.get("RUNNING", 0)
        except Exception:
            return 0


def _trace_headers(grpc_context) -> dict[str, str]:
    """W3C trace context of the client: from metadata, or what the Serve proxy extracted."""
    headers = {k: v for k, v in grpc_context.invocation_metadata() if k in ("traceparent", "tracestate")}
    if "traceparent" not in headers and grpc_context.traceparent():
        headers["traceparent"] = grpc_context.traceparent()
    return headers
