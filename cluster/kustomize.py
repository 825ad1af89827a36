"""KubeRay manifests: kustomize overlays of ``k8s/base`` sized by a capacity plan, and a small renderer.

``write_overlay(plan, dir)`` (``moe-serve plan ... --emit-kustomize DIR``) writes ``kustomization.yaml`` and a
JSON patch (RFC 6902) of the base RayService: worker-group replicas, GPUs, CPUs and memory per pod, the router
TP width, the shard count and router autoscaling, all computed from the ``Plan``.

``render(dir)`` builds a kustomization the way ``kustomize build`` does for the subset used here (``resources``,
``patches`` with JSON-patch or merge-patch bodies, ``images``), so tests and tools need no kustomize binary;
anything else in a kustomization.yaml is refused rather than ignored.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from router.app_spec import APP_NAME, FLEET_NAME, FLEET_NAMESPACE, GRPC_SERVICERS, IMPORT_PATH  # noqa: F401 (tests use them)

ROOT = Path(__file__).resolve().parents[1]
K8S_DIR = ROOT / "k8s"
BASE_DIR = K8S_DIR / "base"
TINY_CPU_DIR = K8S_DIR / "overlays" / "tiny-cpu"

GRPC_PORT, HTTP_PORT = 9000, 8000
MODELS_MOUNT = "/models"  # the checkpoints volume; a model's checkpoint is /models/<plan.model_name>

# Sizing rules on top of the plan (the plan sizes GPU memory; these size what the pod needs besides).
MAX_ROUTERS_FACTOR = 2  # router autoscaling ceiling = this x the planned routers
ROUTER_CPUS_PER_GPU = 4  # a router replica's CPUs per GPU of its TP group (scheduler, tokenizer, detokenizer)
SHARD_CPUS = 4  # an expert-shard actor's CPUs
POD_SPARE_CPUS = 4  # raylet, proxy, ingress, object store threads
HOST_GIB_PER_GPU = 8  # host memory per GPU beyond the weights it loads: CUDA context, pinned staging buffers
POD_BASE_GIB = 16  # raylet, object store, worker processes
UPSCALE_DELAY_S, DOWNSCALE_DELAY_S = 30, 600
GIB = 1 << 30


# -- rendering ------------------------------------------------------------------------------------------


def render(kustomization_dir: str | Path) -> list[dict]:
    """The resources ``kustomize build DIR`` prints, as dicts, for the kustomization features used in k8s/."""
    root = Path(kustomization_dir)
    spec = yaml.safe_load((root / "kustomization.yaml").read_text()) or {}
    unknown = set(spec) - {"apiVersion", "kind", "resources", "patches", "images"}
    if unknown:
        raise ValueError(f"{root}/kustomization.yaml: {sorted(unknown)} not supported by cluster.kustomize.render")
    docs: list[dict] = []
    for entry in spec.get("resources", []):
        path = root / entry
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for patch in spec.get("patches", []):
        _apply_patch(docs, patch, root)
    for image in spec.get("images", []):
        _set_image(docs, image)
    return docs


def _apply_patch(docs: list[dict], patch: dict, root: Path) -> None:
    body = yaml.safe_load((root / patch["path"]).read_text() if "path" in patch else patch["patch"])
    if isinstance(body, list):  # a JSON patch: applies to the target
        targets = [d for d in docs if _matches(d, patch.get("target") or {})]
        if not patch.get("target") or not targets:
            raise ValueError(f"{root}: JSON patch {patch} needs a target that matches a resource")
        for doc in targets:
            json_patch(doc, body)
    else:  # a merge patch: applies to the resource of the same kind and name
        key = (body["kind"], body["metadata"]["name"])
        targets = [d for d in docs if (d["kind"], d["metadata"]["name"]) == key]
        if len(targets) != 1:
            raise ValueError(f"{root}: merge patch for {key} matches {len(targets)} resources")
        docs[docs.index(targets[0])] = merge_patch(targets[0], body)


def _matches(doc: dict, target: dict) -> bool:
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    have = {"group": group, "version": version, "kind": doc.get("kind"), "name": doc["metadata"].get("name")}
    return all(have.get(k) == v for k, v in target.items())


def json_patch(doc: dict, ops: list[dict]) -> None:
    """Apply RFC 6902 ``add`` / ``remove`` / ``replace`` / ``test`` operations to ``doc`` in place."""
    for op in ops:
        kind, path = op["op"], op["path"]
        if kind not in ("add", "remove", "replace", "test"):
            raise ValueError(f"JSON patch op {kind!r} not supported")
        *parents, key = _pointer(path)
        node = doc
        for part in parents:
            node = node[int(part) if isinstance(node, list) else part]
        if isinstance(node, list):
            if kind == "add":
                node.insert(len(node) if key == "-" else int(key), copy.deepcopy(op["value"]))
                continue
            key = int(key)
            if not 0 <= key < len(node):
                raise ValueError(f"JSON patch {kind} {path}: index out of range")
        elif kind != "add" and key not in node:
            raise ValueError(f"JSON patch {kind} {path}: no such field")
        if kind == "remove":
            del node[key]
        elif kind == "test":
            if node[key] != op["value"]:
                raise ValueError(f"JSON patch test {path}: {node[key]!r} != {op['value']!r}")
        else:
            node[key] = copy.deepcopy(op["value"])


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def merge_patch(doc, patch):
    """RFC 7386: dicts merge key by key, ``None`` deletes, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(doc) if isinstance(doc, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _set_image(node, image: dict) -> None:
    # kustomize's images transformer: every containers[] / initContainers[] entry whose image is `name`.
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
    elif isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers"):
                for c in value:
                    name, tag = _split_image(c.get("image", ""))
                    if name == image["name"]:
                        c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag or 'latest')}"
            _set_image(value, image)


def _split_image(ref: str) -> tuple[str, str]:
    name, colon, tag = ref.rpartition(":")
    return (name, tag) if colon and "/" not in tag else (ref, "")


def rayservice(docs: list[dict]) -> dict:
    [doc] = [d for d in docs if d["kind"] == "RayService"]
    return doc


def tiny_cpu_serve_config() -> dict:
    """The parsed ``serveConfigV2`` of the tiny-cpu overlay (its checkpoint path is the pods' /models/tiny)."""
    return yaml.safe_load(rayservice(render(TINY_CPU_DIR))["spec"]["serveConfigV2"])


# -- overlays sized by a plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OverlaySizes:
    checkpoint: str
    min_routers: int
    max_routers: int
    router_tp: int
    router_target_ongoing: int
    router_kv_cache_bytes: int  # the whole router (all its TP ranks)
    routers_per_pod: int
    router_pods_min: int
    router_pods_max: int
    router_pod_memory_gib: int
    shards: int
    expert_pods: int
    expert_pod_gpus: int
    expert_pod_memory_gib: int

    @property
    def router_cpus(self) -> int:
        return ROUTER_CPUS_PER_GPU * self.router_tp

    @property
    def router_pod_gpus(self) -> int:
        return self.routers_per_pod * self.router_tp

    @property
    def router_pod_cpus(self) -> int:
        return self.routers_per_pod * self.router_cpus + POD_SPARE_CPUS

    @property
    def expert_pod_cpus(self) -> int:
        return self.expert_pod_gpus * SHARD_CPUS + POD_SPARE_CPUS


def sizes_from_plan(plan) -> OverlaySizes:
    """Pods and app arguments for a feasible ``cluster.planner.Plan`` (TP groups never span pods)."""
    if not plan.feasible:
        raise ValueError("the plan is infeasible, so no overlay was written: " + "; ".join(plan.shortages))
    if plan.dtype != "bf16":
        raise ValueError(f"the serving app loads bfloat16 weights; a {plan.dtype} plan has no overlay yet")
    tp, per_node = plan.router_tp, plan.gpus_per_node
    max_routers = MAX_ROUTERS_FACTOR * plan.routers
    routers_per_pod = min(per_node // tp, max_routers)
    # Fewest expert pods, then the fewest idle GPUs: 12 shards on 8-GPU nodes -> 2 pods x 6, 55 -> 7 x 8.
    expert_pods = math.ceil(plan.expert_gpus / per_node)
    expert_pod_gpus = math.ceil(plan.expert_gpus / expert_pods)
    kv_rank = plan.router_gpu.kv_cache_bytes // plan.sequences_per_router  # one sequence, one TP rank
    return OverlaySizes(
        checkpoint=f"{MODELS_MOUNT}/{plan.model_name}",
        min_routers=plan.routers, max_routers=max_routers, router_tp=tp,
        router_target_ongoing=plan.sequences_per_router,
        router_kv_cache_bytes=plan.router_capacity_sequences * kv_rank * tp,
        routers_per_pod=routers_per_pod,
        router_pods_min=math.ceil(plan.routers / routers_per_pod),
        router_pods_max=math.ceil(max_routers / routers_per_pod),
        router_pod_memory_gib=_pod_gib(routers_per_pod * tp, plan.router_gpu.dense_weights_bytes),
        shards=plan.expert_gpus, expert_pods=expert_pods, expert_pod_gpus=expert_pod_gpus,
        expert_pod_memory_gib=_pod_gib(expert_pod_gpus, plan.expert_gpu.expert_weights_bytes))


def _pod_gib(gpus: int, weights_per_gpu_bytes: int) -> int:
    # Weights are read through host memory on their way to the GPU.
    return POD_BASE_GIB + gpus * (math.ceil(weights_per_gpu_bytes / GIB) + HOST_GIB_PER_GPU)


def serve_config(s: OverlaySizes) -> dict:
    """The Serve config (``serveConfigV2``) of one application, ``moe-serve``, for these sizes."""
    args = {"checkpoint": s.checkpoint, "dtype": "bfloat16", "fleet_name": FLEET_NAME, "fleet_namespace": FLEET_NAMESPACE,
            "shards": s.shards, "shard_strategy": "flat", "shard_device": "cuda", "shard_cpus": SHARD_CPUS,
            "shard_resources": {"moe_expert": 1}, "device": "cuda",
            "kv_cache_bytes": s.router_kv_cache_bytes,
            "min_routers": s.min_routers, "max_routers": s.max_routers, "router_cpus": s.router_cpus}
    router = {"name": "Router",
              "ray_actor_options": {"num_cpus": s.router_cpus, "num_gpus": s.router_tp,
                                    "resources": {"moe_router": 1}},
              "autoscaling_config": {"min_replicas": s.min_routers, "initial_replicas": s.min_routers,
                                     "max_replicas": s.max_routers, "target_ongoing_requests": s.router_target_ongoing,
                                     "upscale_delay_s": UPSCALE_DELAY_S, "downscale_delay_s": DOWNSCALE_DELAY_S}}
    ingress = {"name": "Ingress", "num_replicas": s.router_pods_min, "max_replicas_per_node": 1,
               "ray_actor_options": {"num_cpus": 1, "resources": {"moe_router": 1}}}
    return {"proxy_location": "EveryNode",
            "http_options": {"host": "0.0.0.0", "port": HTTP_PORT},
            "grpc_options": {"port": GRPC_PORT, "grpc_servicer_functions": list(GRPC_SERVICERS)},
            "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": args,
                              "deployments": [router, ingress]}]}


def _group(index: int) -> str:
    return f"/spec/rayClusterConfig/workerGroupSpecs/{index}"


def _resources(cpus: int, memory_gib: int, gpus: int) -> dict:
    one = {"cpu": str(cpus), "memory": f"{memory_gib}Gi", "nvidia.com/gpu": gpus}
    return {"requests": dict(one), "limits": dict(one)}  # requests == limits: Guaranteed QoS


def rayservice_patch(s: OverlaySizes) -> list[dict]:
    """JSON patch of k8s/base's RayService; ``test`` ops make it fail loudly if the base's layout moves."""
    ops = [{"op": "test", "path": f"{_group(0)}/groupName", "value": "routers"},
           {"op": "test", "path": f"{_group(1)}/groupName", "value": "experts"},
           {"op": "replace", "path": "/spec/serveConfigV2", "value": _dump(serve_config(s))}]
    groups = ((0, s.router_pods_min, s.router_pods_max, _resources(s.router_pod_cpus, s.router_pod_memory_gib,
                                                                   s.router_pod_gpus)),
              (1, s.expert_pods, s.expert_pods, _resources(s.expert_pod_cpus, s.expert_pod_memory_gib,
                                                           s.expert_pod_gpus)))
    for index, low, high, resources in groups:
        ops += [{"op": "replace", "path": f"{_group(index)}/replicas", "value": low},
                {"op": "replace", "path": f"{_group(index)}/minReplicas", "value": low},
                {"op": "replace", "path": f"{_group(index)}/maxReplicas", "value": high},
                {"op": "test", "path": f"{_group(index)}/template/spec/containers/0/name", "value": "ray-worker"},
                {"op": "replace", "path": f"{_group(index)}/template/spec/containers/0/resources",
                 "value": resources}]
    return ops


def write_overlay(plan, out_dir: str | Path) -> list[Path]:
    """Write the overlay of ``plan`` into ``out_dir`` (``kustomization.yaml`` + ``patch.rayservice.yaml``)."""
    s = sizes_from_plan(plan)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"# Generated by `moe-serve plan ... --emit-kustomize` (the commands are in k8s/README.md): re-run it\n"
              f"# rather than editing. Plan: {plan.model_name} on {plan.gpu_name}, {plan.gpus_per_node} per node, "
              f"{plan.dtype}, {plan.context_tokens}-token context, {plan.concurrency_sequences} sequences.\n"
              f"# Routers {s.min_routers}..{s.max_routers} x TP={s.router_tp} on {s.router_pods_min}..{s.router_pods_max}"
              f" pod(s) of {s.router_pod_gpus} GPUs; {s.shards} expert shards on {s.expert_pods} pod(s) of "
              f"{s.expert_pod_gpus} GPUs.\n")
    base = Path(os.path.relpath(BASE_DIR, out.resolve())).as_posix()
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     "resources": [base],
                     "patches": [{"path": "patch.rayservice.yaml",
                                  "target": {"group": "ray.io", "version": "v1", "kind": "RayService",
                                             "name": "moe-serve"}}]}
    files = {out / "kustomization.yaml": header + _dump(kustomization),
             out / "patch.rayservice.yaml": header + _dump(rayservice_patch(s))}
    for path, text in files.items():
        path.write_text(text)
    return list(files)


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # a generated file spells every value out
        return True


def _str(dumper: yaml.SafeDumper, value: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def _dump(data) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120, default_flow_style=False)
