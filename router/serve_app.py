"""The Ray Serve application: an ingress (gRPC + OpenAI HTTP) in front of autoscaled router replicas.

``app_builder`` is what a Serve config (``serveConfigV2`` on KubeRay) imports: ``router.serve_app:app_builder``.
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application

from router.ingress import Ingress
from router.serve_router import Router
from router.settings import ServeSettings



def build_app(settings: ServeSettings, min_routers: int = 1, max_routers: int | None = None,
              router_cpus: float = 0.1) -> Application:
    max_routers = max(max_routers or min_routers, min_routers)
    # The engine queues and refuses ("overloaded") on its own; Serve may hand a replica that many requests.
    per_router = settings.max_num_seqs + settings.max_waiting
    router = serve.deployment(Router, name="Router", max_ongoing_requests=per_router, max_queued_requests=1,
                              ray_actor_options={"num_cpus": router_cpus},
                              health_check_period_s=5, health_check_timeout_s=30,
                              autoscaling_config={"min_replicas": min_routers, "initial_replicas": min_routers,
                                                  "max_replicas": max_routers,
                                                  "target_ongoing_requests": max(1, settings.max_num_seqs // 2)})
    ingress = serve.deployment(Ingress, name="Ingress", max_ongoing_requests=max_routers * per_router,
                               ray_actor_options={"num_cpus": 0.05})
    return ingress.bind(router.bind(settings.to_dict()), settings.to_dict())


def app_builder(args: dict) -> Application:
    """Serve config entry point: ``args`` are ``ServeSettings`` fields plus min_routers / max_routers."""
    args = dict(args)
    routing = {k: args.pop(k) for k in ("min_routers", "max_routers", "router_cpus") if k in args}
    return build_app(ServeSettings(**args), **routing)
