"""The tiny-cpu overlay's Serve config (what KubeRay hands to Serve) really starts the app on a local Ray
cluster and answers gRPC: the expert fleet is started by the first router replica from the config's args."""

import grpc
import torch

from cluster.kustomize import tiny_cpu_serve_config
from cluster.local_cluster import start_local_cluster
from cluster.serve_up import wait_serving
from models.checkpoint_writer import make_checkpoint
from models.generate import greedy_generate
from models.loading import load_model
from protos.moeserve.v1 import moeserve_pb2 as pb
from protos.moeserve.v1 import moeserve_pb2_grpc as pb_grpc

GRPC_PORT, HTTP_PORT = 19321, 18321


def test_tiny_cpu_serve_config_starts_and_answers(tmp_path):
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    from cluster.fleet import FLEET_NAME, stop_fleet

    config = tiny_cpu_serve_config()
    ckpt = make_checkpoint(tmp_path / "tiny", "tiny", seed=0)  # what the pods' init container makes
    app = config["applications"][0]
    app["args"]["checkpoint"] = str(ckpt)
    assert config["grpc_options"]["grpc_servicer_functions"], "the overlay must register the gRPC servicers"
    # the simulated nodes carry the worker-group markers the config's deployments ask for
    cluster = start_local_cluster(2, node_resources={"moe_router": 1000, "moe_expert": 1000})
    try:
        client = serve_start(http_options={"host": "127.0.0.1", "port": HTTP_PORT},
                             grpc_options={**config["grpc_options"], "port": GRPC_PORT})
        client.deploy_apps(ServeDeploySchema.parse_obj({"applications": [app]}))
        wait_serving(f"127.0.0.1:{GRPC_PORT}", timeout_s=300)
        with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
            stub = pb_grpc.MoeServeServiceStub(channel)
            chunks = list(stub.Generate(pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=[5, 6, 7]),
                sampling=pb.SamplingParameters(temperature=0.0, max_tokens=6, ignore_eos=True)), timeout=60))
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        ids = [t for c in chunks for t in c.token_ids]
        assert ids == greedy_generate(load_model(ckpt), torch.tensor([[5, 6, 7]]), 6)[0].tolist()
        assert info.num_expert_shards == app["args"]["shards"]
        serve.shutdown()
        import ray

        stop_fleet(ray.get_actor(FLEET_NAME, namespace="moe-serve"))
    finally:
        cluster.shutdown()
