"""The names that tie a deployment together (Serve config, gRPC proxy, fleet actor), in one light module:
manifests are rendered from these without importing Ray Serve or torch."""

APP_NAME = "moe-serve"
IMPORT_PATH = "router.serve_app:app_builder"  # what a Serve config (serveConfigV2) imports
GRPC_SERVICERS = [  # the gRPC proxy imports these on every node
    "protos.moeserve.v1.moeserve_pb2_grpc.add_MoeServeServiceServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
FLEET_NAME = "moe-serve-expert-fleet"  # the named expert-fleet actor, in namespace FLEET_NAMESPACE
FLEET_NAMESPACE = "moe-serve"
