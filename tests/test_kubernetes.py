"""deploy/kubernetes and the compose profile "replicas": valid against pinned schemas, and wired
to what the server really does (its probes, its drain, its settings, its ports).

The core resources are checked with kubernetes-validate against the Kubernetes 1.33 schemas
(strict: an unknown field fails); the InferencePool against the CRD schema vendored from the
Gateway API Inference Extension v1.6.0. None of it has been applied to a real cluster.
"""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from server.launch import FLUSH_S, SHUTDOWN_GRACE_S
from server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.33.0"
CRD = KUBE / "vendor" / "inference.networking.k8s.io_inferencepools.yaml"
NOT_CORE = {"InferencePool", "HTTPRoute"}


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KUBE / name).read_text()) if d]


def by_kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found


ALL = documents("mixtral.yaml") + documents("inference-pool.yaml")


@pytest.mark.parametrize(
    "doc", [d for d in ALL if d["kind"] not in NOT_CORE], ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_core_resources_validate_against_the_pinned_kubernetes_schemas(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_catches_a_misspelled_field():
    deployment = copy.deepcopy(by_kind(ALL, "Deployment", "mixtral-server"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {
        "httpGett": {"path": "/ready"}
    }
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def pool_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    assert crd["metadata"]["annotations"]["inference.networking.k8s.io/bundle-version"] == "v1.6.0"
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def test_the_inference_pool_validates_against_the_vendored_crd():
    pool = by_kind(ALL, "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    schema = pool_schema()
    jsonschema.validate(pool, schema)
    broken = copy.deepcopy(pool)
    del broken["spec"]["targetPorts"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_the_manifests_match_what_the_server_does():
    deployment = by_kind(ALL, "Deployment", "mixtral-server")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = container["ports"][0]["containerPort"]
    assert port == ServerSettings.model_fields["port"].default
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"  # liveness stays 200 while draining
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60  # a 93 GB load
    # The grace period covers the preStop sleep, the drain, the flush and uvicorn's close.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = ServerSettings.model_fields["drain_timeout_s"].default
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + FLUSH_S + SHUTDOWN_GRACE_S
    env = {e["name"]: e for e in container["env"]}
    assert env["MIXTRAL_OPEN_METRICS"]["value"] == "true"
    for name in env:  # each a real setting
        assert name.removeprefix("MIXTRAL_").lower() in ServerSettings.model_fields, name
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    (weights,) = [m for m in container["volumeMounts"] if m["name"] == "weights"]
    assert weights["readOnly"] and weights["mountPath"] == "/models/mixtral"
    (volume,) = [v for v in pod["volumes"] if v["name"] == "weights"]
    assert volume["persistentVolumeClaim"]["readOnly"]
    config = yaml.safe_load((ROOT / container["args"][1]).read_text())
    assert config["model"] == weights["mountPath"]
    # The Service, the pool and the route all reach these pods on this port.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = by_kind(ALL, "Service", "mixtral-server")
    assert service["spec"]["selector"] == labels and service["spec"]["ports"][0]["targetPort"] == "http"
    pool = by_kind(ALL, "InferencePool")
    assert pool["spec"]["selector"]["matchLabels"] == labels
    assert pool["spec"]["targetPorts"] == [{"number": port}]
    epp_service = by_kind(ALL, "Service", pool["spec"]["endpointPickerRef"]["name"])
    assert epp_service["spec"]["ports"][0]["port"] == pool["spec"]["endpointPickerRef"]["port"]["number"]
    epp = by_kind(ALL, "Deployment", "mixtral-epp")
    assert epp_service["spec"]["selector"] == epp["spec"]["template"]["metadata"]["labels"]
    args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--pool-name") + 1] == pool["metadata"]["name"]
    route = by_kind(ALL, "HTTPRoute")
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == pool["metadata"]["name"]


def test_the_compose_replicas_profile_routes_on_readiness():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    router = services["router"]
    replicas = [
        name for name, s in services.items() if "replicas" in s.get("profiles", []) and name != "router"
    ]
    assert sorted(replicas) == ["replica-0", "replica-1"]
    assert sorted(router["depends_on"]) == replicas
    cmd = router["command"]
    assert cmd[cmd.index("--health-check-endpoint") + 1] == "/ready"
    urls = cmd[cmd.index("--worker-urls") + 1 : cmd.index("--worker-urls") + 3]
    assert urls == [f"http://{name}:8000" for name in replicas]
    gpus = set()
    for name in replicas:
        service = services[name]
        assert service["environment"]["MIXTRAL_OPEN_METRICS"] == "true"
        assert "ports" not in service  # reached through the router only
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        gpus.add(tuple(device["device_ids"]))
        grace = int(service["stop_grace_period"].removesuffix("s"))
        assert grace >= ServerSettings.model_fields["drain_timeout_s"].default + FLUSH_S + SHUTDOWN_GRACE_S
    assert len(gpus) == 2  # one GPU each


def test_the_compose_tp2_profile_gives_one_server_two_gpus():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    tp2 = services["mixtral-tp2"]
    assert tp2["profiles"] == ["tp2"]
    assert tp2["command"] == ["--config", "configs/mixtral-8x7b-instruct-tp2.yaml"]
    (gpus,) = tp2["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["device_ids"] == ["0", "1"]
    assert tp2["ipc"] == "host"
    config = yaml.safe_load((ROOT / "configs" / "mixtral-8x7b-instruct-tp2.yaml").read_text())
    assert config["tensor_parallel_size"] == len(gpus["device_ids"])
