"""``moe-serve up``: the whole system on a local (or existing) Ray cluster, until interrupted."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import grpc
import ray
from ray import serve

from cluster.fleet import FLEET_NAME, FleetSpec, start_fleet, stop_fleet
from cluster.local_cluster import start_local_cluster
from router.app_spec import APP_NAME, FLEET_NAMESPACE, GRPC_SERVICERS
from router.serve_app import build_app
from router.settings import ServeSettings

MAX_MESSAGE_BYTES = 4 << 20  # requests above this are refused by the gRPC proxy with RESOURCE_EXHAUSTED


def wait_serving(grpc_address: str, timeout_s: float = 300.0) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(grpc_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(1.0)
    raise TimeoutError(f"the service at {grpc_address} did not report SERVING within {timeout_s:.0f} s")


class Deployment:
    """Everything ``up`` started, so it can all be stopped in reverse order."""

    def __init__(self, checkpoint: Path, routers: int, max_routers: int | None, shards: int, nodes: int,
                 address: str | None, host: str, grpc_port: int, http_port: int, **settings):
        os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(MAX_MESSAGE_BYTES))
        self.cluster = None
        if address:
            ray.init(address=address, namespace=FLEET_NAMESPACE, logging_level="warning")
        else:
            self.cluster = start_local_cluster(nodes)
        self.fleet = None
        try:
            if shards:
                node_ids = tuple(self.cluster.node_ids) if self.cluster else ()
                self.fleet = start_fleet(FleetSpec(checkpoint=str(checkpoint), num_shards=shards, node_ids=node_ids,
                                                   shard_cpus=0.05), namespace=FLEET_NAMESPACE)
            settings = ServeSettings(checkpoint=str(checkpoint), fleet_name=FLEET_NAME if shards else None, **settings)
            serve.start(http_options={"host": host, "port": http_port},
                        grpc_options={"port": grpc_port, "grpc_servicer_functions": GRPC_SERVICERS})
            serve.run(build_app(settings, routers, max_routers), name=APP_NAME, route_prefix="/", blocking=False)
        except BaseException:
            self.stop()
            raise
        self.grpc_address, self.http_address = f"{host}:{grpc_port}", f"http://{host}:{http_port}"

    def stop(self) -> None:
        try:
            serve.shutdown()
        except Exception:
            pass
        if self.fleet is not None:
            stop_fleet(self.fleet)
        if self.cluster is not None:
            self.cluster.shutdown()
        else:
            ray.shutdown()


def up(args) -> int:
    deployment = Deployment(args.checkpoint.resolve(), args.routers, args.max_routers, args.shards, args.nodes,
                            args.address, args.host, args.grpc_port, args.http_port)
    try:
        wait_serving(deployment.grpc_address)
        print(f"moe-serve is up: gRPC {deployment.grpc_address} (moeserve.v1.MoeServeService, grpc.health.v1), "
              f"HTTP {deployment.http_address}/v1 (OpenAI-compatible)", flush=True)
        if args.demo:
            from cluster.grpc_client import stream_generate

            print(f"> {args.demo}", flush=True)
            stream_generate(deployment.grpc_address, args.demo, max_tokens=24, out=sys.stdout)
            return 0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        print("shutting down ...", file=sys.stderr)
        return 0
    finally:
        deployment.stop()
