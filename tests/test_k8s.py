"""The KubeRay manifests in k8s/: schema-valid, consistent with the app, and sized as the planner says.

The RayService is checked against the openAPIV3Schema of KubeRay v1.7.0's CRD (../shared/schemas) in strict
mode (unknown fields are errors, as a typo should be), built-in kinds with kubernetes-validate, and the
serveConfigV2 string with Ray Serve's own schema. Rendering uses ``cluster.kustomize.render``; when kubectl or
kustomize is installed its output is compared with ``kustomize build``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster import kustomize
from cluster.kustomize import BASE_DIR, K8S_DIR, json_patch, render, rayservice

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0-ray.io_rayservices.yaml"
PLANNED = ("scout", "maverick", "behemoth")
KUSTOMIZATIONS = {"base": BASE_DIR, **{name: K8S_DIR / "overlays" / name for name in ("tiny-cpu", *PLANNED)}}
SECRETS = sorted(BASE_DIR.glob("secret.*.yaml"))
GPU = "nvidia.com/gpu"
IANA_SVC_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")  # Kubernetes port names


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(path) for name, path in KUSTOMIZATIONS.items()}


def _groups(rs: dict) -> dict[str, dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    return {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}


def _serve_config(rs: dict) -> dict:
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


def _app(rs: dict) -> dict:
    [app] = _serve_config(rs)["applications"]
    return app


def _deployment(rs: dict, name: str) -> dict:
    [d] = [d for d in _app(rs)["deployments"] if d["name"] == name]
    return d


# -- the RayService against the CRD schema, strict -------------------------------------------------------


def _strict(node):
    """Forbid fields the schema does not name, except where it keeps unknown fields on purpose."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@pytest.fixture(scope="session")
def crd_schema(request) -> dict:
    """The v1 openAPIV3Schema, parsed once from the 1 MB YAML and then kept as JSON in the pytest cache."""
    if not CRD.is_file():
        pytest.skip(f"{CRD} is absent (the KubeRay RayService CRD lives in ../shared/schemas)")
    raw = CRD.read_bytes()
    cached = request.config.cache.mkdir("kuberay-crd") / f"rayservice-v1-{hashlib.sha256(raw).hexdigest()[:16]}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    crd = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = v1["schema"]["openAPIV3Schema"]
    cached.write_text(json.dumps(schema))
    return schema


@pytest.fixture(scope="session")
def strict_validator(crd_schema):
    jsonschema = pytest.importorskip("jsonschema")
    return jsonschema.Draft7Validator(_strict(crd_schema))


def _errors(validator, doc: dict) -> list[str]:
    return sorted(f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc))


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rayservice_matches_crd_schema(rendered, strict_validator, name):
    assert _errors(strict_validator, rayservice(rendered[name])) == []


def test_strict_schema_catches_a_typo_and_a_wrong_type(rendered, crd_schema, strict_validator):
    import jsonschema

    doc = copy.deepcopy(rayservice(rendered["base"]))
    cluster = doc["spec"]["rayClusterConfig"]
    cluster["enableInTreeAutoscalng"] = cluster.pop("enableInTreeAutoscaling")
    cluster["workerGroupSpecs"][0]["replicas"] = "2"
    cluster["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resouces"] = {}
    errors = _errors(strict_validator, doc)
    assert len(errors) == 3, errors
    assert "/spec/rayClusterConfig: Additional properties are not allowed ('enableInTreeAutoscalng' was unexpected)" in errors
    assert "/spec/rayClusterConfig/workerGroupSpecs/0/replicas: '2' is not of type 'integer'" in errors
    assert any(e.startswith("/spec/rayClusterConfig/workerGroupSpecs/1/template/spec/containers/0: ")
               and "'resouces' was unexpected" in e for e in errors), errors
    # The CRD as published lets both typos through (Kubernetes would prune them silently): only the type shows.
    assert len(_errors(jsonschema.Draft7Validator(crd_schema), doc)) == 1


# -- built-in kinds: kubernetes-validate, and port names --------------------------------------------------


def _builtin_docs(rendered) -> list[dict]:
    docs = [d for d in rendered["base"] if d["kind"] != "RayService"]
    docs += [yaml.safe_load(p.read_text()) for p in SECRETS]
    for name, manifests in rendered.items():  # each pod template, as the Pod KubeRay will make of it
        for group, spec in _groups(rayservice(manifests)).items():
            template = spec["template"]
            docs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{name}-{group}",
                         **template.get("metadata", {})}, "spec": template["spec"]})
    return docs


def _k8s_validate(doc: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]' (kubernetes-validate)")
    kv.validate(doc, kv.latest_version(), strict=True)


def test_builtin_manifests_validate(rendered):
    docs = _builtin_docs(rendered)
    assert {d["kind"] for d in docs} == {"Service", "Secret", "Pod"} and len(SECRETS) == 2
    for doc in docs:
        _k8s_validate(doc)


def _port_name_errors(doc: dict) -> list[str]:
    errors = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "ports" and isinstance(value, list):
                    for i, port in enumerate(value):
                        for field in ("name", "targetPort"):
                            named = port.get(field)
                            if field == "name" or isinstance(named, str):
                                if not (isinstance(named, str) and IANA_SVC_NAME.match(named)):
                                    errors.append(f"{path}/{key}/{i}/{field}: {named!r}")
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}/{i}")

    walk(doc, "")
    return errors


def test_bad_port_names_are_caught(rendered):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]' (kubernetes-validate)")
    [service] = [d for d in rendered["base"] if d["kind"] == "Service"]
    numeric = copy.deepcopy(service)
    numeric["spec"]["ports"][0]["name"] = 9000
    with pytest.raises(kv.ValidationError, match="not of type 'string'"):
        _k8s_validate(numeric)
    # kubernetes-validate's schemas have no format for port names; the API server's rule is checked here.
    for bad in ("Bad_Name", "grpc--port", "a-name-longer-than-15"):
        named = copy.deepcopy(service)
        named["spec"]["ports"][0]["name"] = bad
        assert _port_name_errors(named) == [f"/spec/ports/0/name: {bad!r}"]


def test_ports_are_named_and_agree(rendered):
    for name, docs in rendered.items():
        for doc in docs:
            assert _port_name_errors(doc) == [], name
        rs = rayservice(docs)
        groups = _groups(rs)
        ports = {g: {p["name"]: p["containerPort"] for p in spec["template"]["spec"]["containers"][0].get("ports", [])}
                 for g, spec in groups.items()}
        assert ports["head"] == {"gcs": 6379, "dashboard": 8265, "grpc": 9000, "http": 8000}, name
        assert ports["routers"] == {"grpc": 9000, "http": 8000}, name
        config = _serve_config(rs)
        assert (config["grpc_options"]["port"], config["http_options"]["port"]) == (9000, 8000), name
    [service] = [d for d in rendered["base"] if d["kind"] == "Service"]
    assert {(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        ("grpc", 9000, "grpc"), ("http", 8000, "http")}
    router_labels = _groups(rayservice(rendered["base"]))["routers"]["template"]["metadata"]["labels"]
    selector = dict(service["spec"]["selector"])
    assert selector.pop("ray.io/serve") == "true" and selector.items() <= router_labels.items()


# -- conventions: CPU-only head, requests == limits, GPUs with tolerations, secrets by reference ---------


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_pod_conventions(rendered, name):
    rs = rayservice(rendered[name])
    spec, cluster = rs["spec"], rs["spec"]["rayClusterConfig"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"} and cluster["enableInTreeAutoscaling"] is True
    assert set(cluster["autoscalerOptions"]) >= {"upscalingMode", "idleTimeoutSeconds"}
    if name != "tiny-cpu":
        ft = cluster["gcsFaultToleranceOptions"]
        assert ft["redisAddress"] and set(ft["redisPassword"]) == {"valueFrom"}
    groups = _groups(rs)
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0" and groups["head"]["rayStartParams"]["num-gpus"] == "0"
    # KubeRay passes the value to `ray start --resources=...` through a shell: a quoted JSON string.
    assert json.loads(json.loads(groups["routers"]["rayStartParams"]["resources"])) == {"moe_router": 1000}
    assert json.loads(json.loads(groups["experts"]["rayStartParams"]["resources"])) == {"moe_expert": 1000}
    for group, g in groups.items():
        pod = g["template"]["spec"]
        containers = pod["containers"] + pod.get("initContainers", [])
        for c in containers:
            assert c["resources"]["requests"] == c["resources"]["limits"], (group, c["name"])
        gpus = pod["containers"][0]["resources"]["limits"].get(GPU, 0)
        tolerated = any(t.get("key") == GPU for t in pod.get("tolerations", []))
        assert (gpus > 0) == tolerated, group
        cpu_only = group == "head" or name == "tiny-cpu"
        assert (gpus == 0) if cpu_only else (gpus > 0), group
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["MOE_SERVE_API_TOKEN"] == {"name": "MOE_SERVE_API_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": "moe-serve-api-token", "key": "token"}}}, group
        assert all(c["image"] == "moe-serve:latest" for c in containers), group


def test_secret_placeholders_are_referenced_not_applied(rendered):
    names = {yaml.safe_load(p.read_text())["metadata"]["name"]: yaml.safe_load(p.read_text()) for p in SECRETS}
    assert set(names) == {"moe-serve-api-token", "moe-serve-redis"}
    assert set(names["moe-serve-api-token"]["stringData"]) == {"token"}
    cluster = rayservice(rendered["base"])["spec"]["rayClusterConfig"]
    ref = cluster["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert set(names[ref["name"]]["stringData"]) == {ref["key"]}
    for docs in rendered.values():  # re-applying a placeholder would reset the real Secret
        assert all(d["kind"] != "Secret" for d in docs)


# -- serveConfigV2: Ray Serve's schema, and the app it names ---------------------------------------------


def _deployment_names(app) -> set[str]:
    from ray.serve import Application

    d = app._bound_deployment
    names = {d.name}
    for arg in [*d.init_args, *d.init_kwargs.values()]:
        if isinstance(arg, Application):
            names |= _deployment_names(arg)
    return names


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from models.checkpoint_writer import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("k8s") / "tiny", preset="tiny", seed=0)


def _fields(model) -> set[str]:
    return set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}


def serve_config_errors(config: dict) -> list[str]:
    """Ray Serve's schema, plus what it lets through: unknown fields (pydantic ignores extras by default) and
    ``autoscaling_config`` dicts (``DeploymentSchema`` keeps a dict as it is, unchecked)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema, ServeApplicationSchema,
                                  ServeDeploySchema, gRPCOptionsSchema)

    def unknown(d: dict, model, path: str) -> list[str]:
        return [f"{path}/{key}: unknown field" for key in d if key not in _fields(model)]

    try:
        ServeDeploySchema.model_validate(config)
    except Exception as e:  # pydantic's ValidationError, which Ray may wrap
        return [str(e)]
    errors = unknown(config, ServeDeploySchema, "")
    errors += unknown(config.get("grpc_options", {}), gRPCOptionsSchema, "/grpc_options")
    errors += unknown(config.get("http_options", {}), HTTPOptionsSchema, "/http_options")
    for i, app in enumerate(config["applications"]):
        errors += unknown(app, ServeApplicationSchema, f"/applications/{i}")
        for j, d in enumerate(app.get("deployments", [])):
            path = f"/applications/{i}/deployments/{j}"
            errors += unknown(d, DeploymentSchema, path)
            errors += unknown(d.get("ray_actor_options", {}), RayActorOptionsSchema, f"{path}/ray_actor_options")
            if isinstance(d.get("autoscaling_config"), dict):
                errors += unknown(d["autoscaling_config"], AutoscalingConfig, f"{path}/autoscaling_config")
                try:
                    AutoscalingConfig(**d["autoscaling_config"])
                except Exception as e:
                    errors.append(f"{path}/autoscaling_config: {e}")
    return errors


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_serve_config_parses_and_names_the_app(rendered, tiny_checkpoint, name):
    from ray._common.utils import import_attr

    import router.serve_app
    from router import app_spec
    from router.settings import ServeSettings

    rs = rayservice(rendered[name])
    config = _serve_config(rs)
    assert serve_config_errors(config) == []
    [app] = config["applications"]
    assert app["name"] == app_spec.APP_NAME  # the names `moe-serve up` deploys with (cluster/serve_up.py)
    assert import_attr(app["import_path"]) is router.serve_app.app_builder
    assert config["grpc_options"]["grpc_servicer_functions"] == app_spec.GRPC_SERVICERS
    for path in config["grpc_options"]["grpc_servicer_functions"]:
        import_attr(path)  # what the proxy imports on every node
    args = app["args"]
    fields = {f.name for f in dataclasses.fields(ServeSettings)} | {"min_routers", "max_routers", "router_cpus"}
    assert set(args) <= fields, set(args) - fields
    assert args["checkpoint"].startswith(kustomize.MODELS_MOUNT + "/") and args["fleet_name"] == kustomize.FLEET_NAME
    assert args["shards"] >= 1
    # The app builds from these args (checkpoint swapped for a local one) and has the deployments overridden.
    built = router.serve_app.app_builder({**args, "checkpoint": str(tiny_checkpoint)})
    assert {d["name"] for d in app["deployments"]} == _deployment_names(built) == {"Router", "Ingress"}
    scaling = _deployment(rs, "Router")["autoscaling_config"]
    assert (scaling["min_replicas"], scaling["max_replicas"]) == (args["min_routers"], args["max_routers"])
    assert _deployment(rs, "Router")["ray_actor_options"]["num_cpus"] == args["router_cpus"]
    for d in app["deployments"]:
        assert d["ray_actor_options"]["resources"] == {"moe_router": 1}


def test_serve_config_errors_are_caught():
    config = kustomize.tiny_cpu_serve_config()
    assert serve_config_errors(config) == []
    planted = copy.deepcopy(config)
    planted["grpc_options"]["prot"] = 9000
    planted["applications"][0]["deployments"][1]["num_replics"] = 2
    planted["applications"][0]["deployments"][0]["autoscaling_config"]["target_ongoing_request"] = 4
    assert serve_config_errors(planted) == [
        "/grpc_options/prot: unknown field", "/applications/0/deployments/0/autoscaling_config/"
        "target_ongoing_request: unknown field", "/applications/0/deployments/1/num_replics: unknown field"]
    negative = copy.deepcopy(config)
    negative["applications"][0]["deployments"][0]["autoscaling_config"]["target_ongoing_requests"] = -1
    [error] = serve_config_errors(negative)
    assert "autoscaling_config" in error and "target_ongoing_requests" in error


def test_tiny_cpu_serve_config():
    config = kustomize.tiny_cpu_serve_config()
    [app] = config["applications"]
    assert app["args"]["checkpoint"] == "/models/tiny"
    assert (app["args"]["shards"], app["args"]["shard_device"], app["args"]["min_routers"]) == (2, "cpu", 1)
    assert all(d["ray_actor_options"].get("num_gpus", 0) == 0 for d in app["deployments"])


# -- the planner-sized overlays --------------------------------------------------------------------------


def _readme_commands() -> dict[str, list[str]]:
    """overlay name -> `moe-serve` argv, from the commands written in k8s/README.md."""
    found = re.findall(r"^(?:\.venv/bin/)?moe-serve (plan .*--emit-kustomize k8s/overlays/(\S+))$",
                       (K8S_DIR / "README.md").read_text(), flags=re.M)
    return {name: shlex.split(line) for line, name in found}


@pytest.fixture(scope="module")
def plans(shared_models) -> dict:
    from cluster.planner import PlanInput, load_raw_config, make_plan

    out = {}
    for name, argv in _readme_commands().items():
        opts = dict(zip(argv[1::2], argv[2::2]))
        config = opts["--config"]
        raw, model = load_raw_config(config if config == "behemoth" else ROOT / config)
        out[name] = make_plan(raw, PlanInput(gpu=opts["--gpu"], gpus_per_node=int(opts["--gpus-per-node"])),
                              model_name=model)
    return out


def test_readme_has_a_command_per_planned_overlay():
    commands = _readme_commands()
    assert set(commands) == set(PLANNED)
    for argv in commands.values():  # the inputs `plans` reads are all the command sets
        assert set(argv[1::2]) == {"--config", "--gpu", "--gpus-per-node", "--emit-kustomize"}


def test_committed_overlays_are_what_the_commands_write(shared_models, tmp_path, monkeypatch, capsys):
    from cluster.cli import main

    monkeypatch.chdir(ROOT)
    for name, argv in _readme_commands().items():
        out = tmp_path / "k8s" / "overlays" / name
        assert main([*argv[:-1], str(out)]) == 0
        committed = K8S_DIR / "overlays" / name
        assert (out / "patch.rayservice.yaml").read_text() == (committed / "patch.rayservice.yaml").read_text(), (
            f"k8s/overlays/{name} is stale: re-run its command in k8s/README.md")
        assert render(out) == render(committed)
    assert "wrote" in capsys.readouterr().err


@pytest.mark.parametrize("name", PLANNED)
def test_overlay_agrees_with_the_plan(rendered, plans, name):
    plan, rs = plans[name], rayservice(rendered[name])
    groups, args = _groups(rs), _app(rs)["args"]
    router, ingress = _deployment(rs, "Router"), _deployment(rs, "Ingress")

    # Experts: one shard per GPU, on as few pods as fit, with less than one pod's worth idle.
    experts = groups["experts"]
    expert_limits = experts["template"]["spec"]["containers"][0]["resources"]["limits"]
    expert_gpus = experts["replicas"] * expert_limits[GPU]
    assert args["shards"] == plan.expert_gpus and args["shard_device"] == "cuda"
    assert experts["replicas"] == experts["minReplicas"] == experts["maxReplicas"]
    assert expert_limits[GPU] <= plan.gpus_per_node
    assert plan.expert_gpus <= expert_gpus < plan.expert_gpus + experts["replicas"]
    if name == "maverick":
        assert expert_gpus == plan.expert_gpus == 12
    assert _gib(expert_limits["memory"]) >= expert_limits[GPU] * plan.expert_gpu.expert_weights_bytes / (1 << 30)

    # Routers: TP width in GPUs, whole TP groups per pod, autoscaling from the planned count to twice it.
    routers = groups["routers"]
    router_limits = routers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert router["ray_actor_options"]["num_gpus"] == plan.router_tp
    assert router_limits[GPU] % plan.router_tp == 0 and router_limits[GPU] <= plan.gpus_per_node
    per_pod = router_limits[GPU] // plan.router_tp
    scaling = router["autoscaling_config"]
    assert scaling["min_replicas"] == scaling["initial_replicas"] == plan.routers
    assert scaling["max_replicas"] == kustomize.MAX_ROUTERS_FACTOR * plan.routers
    assert scaling["target_ongoing_requests"] == plan.sequences_per_router
    assert routers["minReplicas"] == routers["replicas"] == -(-plan.routers // per_pod)
    assert routers["maxReplicas"] * per_pod >= scaling["max_replicas"] > (routers["maxReplicas"] - 1) * per_pod
    assert ingress["num_replicas"] == routers["minReplicas"]
    assert _gib(router_limits["memory"]) >= router_limits[GPU] * plan.router_gpu.dense_weights_bytes / (1 << 30)
    assert args["kv_cache_bytes"] >= plan.router_gpu.kv_cache_bytes * plan.router_tp
    assert args["checkpoint"] == f"/models/{plan.model_name}"


def _gib(quantity: str) -> int:
    assert quantity.endswith("Gi"), quantity
    return int(quantity[:-2])


def test_infeasible_plan_writes_no_overlay(shared_models, tmp_path, capsys):
    from cluster.cli import main

    out = tmp_path / "overlay"
    config = shared_models / "llama4-maverick-17b-128e.config.json"
    assert main(["plan", "--config", str(config), "--gpu", "H100", "--gpus-per-node", "8", "--nodes", "1",
                 "--emit-kustomize", str(out)]) == 2
    assert "infeasible" in capsys.readouterr().err and not out.exists()


# -- the renderer ----------------------------------------------------------------------------------------


def _kustomize_build(path: Path) -> list[dict] | None:
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(path)]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(path)]
    else:
        return None
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_render_equals_kustomize_build(rendered, name):
    built = _kustomize_build(KUSTOMIZATIONS[name])
    if built is None:
        pytest.skip("neither kustomize nor kubectl is installed")

    def key(d):
        return d["kind"], d["metadata"]["name"]

    assert sorted(rendered[name], key=key) == sorted(built, key=key)


def test_json_patch_and_refusals(tmp_path):
    doc = {"spec": {"groups": [{"name": "a", "n": 1}], "drop": 1}}
    json_patch(doc, [{"op": "test", "path": "/spec/groups/0/name", "value": "a"},
                     {"op": "replace", "path": "/spec/groups/0/n", "value": 2},
                     {"op": "add", "path": "/spec/groups/-", "value": {"name": "b"}},
                     {"op": "add", "path": "/spec/a~1b", "value": 3},
                     {"op": "remove", "path": "/spec/drop"}])
    assert doc == {"spec": {"groups": [{"name": "a", "n": 2}, {"name": "b"}], "a/b": 3}}
    with pytest.raises(ValueError, match="test /spec/groups/0/name"):
        json_patch(doc, [{"op": "test", "path": "/spec/groups/0/name", "value": "routers"}])
    with pytest.raises(ValueError, match="no such field"):
        json_patch(doc, [{"op": "replace", "path": "/spec/typo", "value": 1}])
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamespace: other\n")
    with pytest.raises(ValueError, match="namespace"):
        render(tmp_path)
