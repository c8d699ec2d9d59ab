"""Deployment files agree with the code: ports, gRPC health service names, images, entry points."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from glmv_gateway.clients import SERVICE_NAMES

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
MODEL_PORTS = {"tokenizer": 50051, "lm": 50052, "decoder": 50053}


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def by_kind(items: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in items if d["kind"] == kind}


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
    assert listed == present


@pytest.mark.parametrize("component", sorted(MODEL_PORTS))
def test_model_service_manifest_matches_the_service(component: str) -> None:
    items = docs(f"{component}.yaml")
    deployment = by_kind(items, "Deployment")[component]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    prefix = f"GLMV_{component.upper()}_"
    port = MODEL_PORTS[component]
    assert env[f"{prefix}PORT"] == str(port) and env[f"{prefix}HOST"] == "0.0.0.0"
    assert {"name": "grpc", "containerPort": port} in container["ports"]
    assert container["readinessProbe"]["grpc"] == {"port": port, "service": SERVICE_NAMES[component]}
    assert container["image"] == f"glmvoice/{component}:0.1.0"
    assert any(
        m["readOnly"] and m["mountPath"] == env[f"{prefix}MODEL_DIR"] for m in container["volumeMounts"]
    )
    service = by_kind(items, "Service")[component]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["ports"][0]["port"] == port
    config = by_kind(items, "ConfigMap")[f"glmvoice-{component}"]
    assert all(key.startswith(prefix) for key in config["data"])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > 30  # longer than the default drain timeout


def test_gateway_reaches_the_model_services_by_their_ports() -> None:
    config = by_kind(docs("gateway.yaml"), "ConfigMap")["glmvoice-gateway"]["data"]
    for component, port in MODEL_PORTS.items():
        assert config[f"GLMV_GATEWAY_{component.upper()}_ADDR"] == f"dns:///{component}:{port}"
    worker = by_kind(docs("gateway.yaml"), "Deployment")["worker"]
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
    assert compose["worker"]["entrypoint"] == ["glmv", "worker"]
    assert "torch" not in (ROOT / "gateway" / "pyproject.toml").read_text()


@pytest.mark.parametrize("name", ["tokenizer.yaml", "lm.yaml", "decoder.yaml", "gateway.yaml"])
def test_container_resources_are_well_formed(name: str) -> None:
    """Only requests/limits under resources; a CUDA service asks for a GPU in its limits."""
    items = docs(name)
    configs = {k: v for c in by_kind(items, "ConfigMap").values() for k, v in c.get("data", {}).items()}
    for deployment in by_kind(items, "Deployment").values():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert set(resources) <= {"requests", "limits", "claims"}, resources
            assert "memory" in resources["limits"]
            device = configs.get(f"GLMV_{deployment['metadata']['name'].upper()}_DEVICE", "cpu")
            gpus = resources["limits"].get("nvidia.com/gpu")
            assert (gpus == "1") == device.startswith("cuda"), (deployment["metadata"]["name"], device)
