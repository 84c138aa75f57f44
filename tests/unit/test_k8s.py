"""KubeRay manifests, validated offline the way an API server with KubeRay would:
the kustomize overlays, `graft k8s render` output, and planted mistakes that each
check must catch (CRD schema, built-in schemas, the operator's own rules)."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster import k8s
from jobs.config import compose, run_name
from jobs.sweep import sweep_name

ROOT = Path(__file__).parents[2]
needs_crds = pytest.mark.skipif(
    k8s.crd_dir() is None, reason="no KubeRay CRDs at ../shared/kuberay-crds ($GRAFT_KUBERAY_CRDS)"
)


def _render(kind: str, overrides: list[str]) -> dict[str, Any]:
    cfg = compose(overrides, config_name=kind)
    name = sweep_name(cfg) if kind == "sweep" else run_name(cfg)
    return k8s.render(kind, cfg, overrides, name, image="registry.example/graft:1", namespace="ml")


@needs_crds
@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu"])
def test_every_overlay_renders_and_validates(overlay: str) -> None:
    docs = k8s.kustomize(ROOT / "k8s" / "overlays" / overlay)  # kubectl kustomize
    kinds = {d["kind"] for d in docs}
    assert {
        "RayCluster",
        "PersistentVolumeClaim",
        "StatefulSet",
        "Service",
        "Secret",
        "ServiceAccount",
    } <= kinds
    assert k8s.validate(docs) == []
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for d in docs:  # resource limits on every container
        for c in k8s._containers(d):
            assert c["resources"]["limits"], (d["kind"], c["name"])


@needs_crds
@pytest.mark.parametrize(
    ("kind", "overrides", "replicas", "gpus"),
    [
        ("finetune", ["strategy=lora", "data.labels=[a,b]"], 2, None),
        ("finetune", ["scaling=gpu8", "deepspeed=zero3"], 8, "1"),
        ("sweep", ["sweep.max_concurrent=3", "scaling.num_workers=2"], 6, None),
    ],
)
def test_rendered_rayjobs_validate_and_carry_the_config(
    kind: str, overrides: list[str], replicas: int, gpus: str | None
) -> None:
    job = _render(kind, overrides)
    assert k8s.validate([job]) == []
    spec = job["spec"]
    assert spec["entrypoint"].startswith(f"python -m cluster.cli {kind} -q ")
    for o in overrides:
        assert o in spec["entrypoint"] or repr(o) in spec["entrypoint"]
    assert (
        "run.output_dir=/runs" in spec["entrypoint"]
        and "cluster.address=auto" in spec["entrypoint"]
    )
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    # a lost worker restarts the gang; an evicted pod has time to checkpoint
    assert "train.max_failures=2" in spec["entrypoint"]
    pods = [spec["rayClusterSpec"]["headGroupSpec"], *spec["rayClusterSpec"]["workerGroupSpecs"]]
    assert [p["template"]["spec"]["terminationGracePeriodSeconds"] for p in pods] == [
        k8s.GRACE_S
    ] * len(pods)
    group = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == replicas
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"] == resources["limits"]
    assert resources["limits"].get("nvidia.com/gpu") == gpus
    assert job["metadata"]["namespace"] == "ml"
    assert all(
        c["image"] == "registry.example/graft:1"
        for c in k8s._containers(job)
        if c["name"].startswith("ray-")
    )
    if kind == "sweep":
        assert "sweep.storage=$GRAFT_STUDY_URL" in spec["entrypoint"]


def _cluster_doc() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "k8s" / "base" / "raycluster.yaml").read_text())


@functools.cache
def _default_job() -> str:
    return yaml.safe_dump(_render("finetune", []))


def _job_doc() -> dict[str, Any]:
    return yaml.safe_load(_default_job())


def _break(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, last = path.split("/")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is _DELETE:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return doc


_DELETE = object()


def _gpu_requests_below_limits() -> dict[str, Any]:
    doc = _cluster_doc()
    container = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resources"]["requests"]["nvidia.com/gpu"] = "0"
    return doc


WORKER = "spec/workerGroupSpecs/0"


@needs_crds
@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: _break(_cluster_doc(), "metadata/name", "Graft_Cluster"), "DNS-1035"),
        (lambda: _break(_job_doc(), "metadata/name", "graft-" + "x" * 60), "KubeRay allows 47"),
        (
            lambda: _break(_job_doc(), "spec/shutdownAfterJobFinishes", False),
            "ttlSecondsAfterFinished needs",
        ),
        (
            lambda: _break(_cluster_doc(), f"{WORKER}/replicas", 9),
            "minReplicas <= replicas <= maxReplicas",
        ),
        (
            lambda: _break(_cluster_doc(), "spec/headGroupSpec/rayStartParams/num-cpus", 0),
            "values must be strings",
        ),
        (
            lambda: _break(
                _cluster_doc(),
                f"{WORKER}/template/spec/containers",
                [
                    {
                        "name": "log-shipper",
                        "image": "busybox",
                        "resources": {"limits": {"cpu": "1"}},
                    },
                    _cluster_doc()["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][
                        0
                    ],
                ],
            ),
            "Ray container must come first",
        ),
        (lambda: _gpu_requests_below_limits(), "must equal limits"),
        (
            lambda: _break(_cluster_doc(), "spec/workerGroups", []),
            "Additional properties are not allowed",
        ),
        (lambda: _break(_cluster_doc(), f"{WORKER}/replicas", "two"), "is not of type 'integer'"),
        (lambda: _break(_job_doc(), "spec/backoffLimit", "many"), "is not of type 'integer'"),
    ],
)
def test_planted_mistakes_are_caught(make: Any, expected: str) -> None:
    doc = make()
    errors = k8s.validate([doc])
    assert any(expected in e for e in errors), errors


def test_planted_mistakes_in_built_in_kinds_are_caught() -> None:
    pvc = yaml.safe_load((ROOT / "k8s" / "base" / "storage.yaml").read_text())
    assert k8s.validate([pvc]) == []
    pvc["spec"]["accessModes"] = "ReadWriteMany"  # a string, not a list
    assert k8s.validate([pvc])
    sts = [
        d
        for d in yaml.safe_load_all((ROOT / "k8s" / "base" / "postgres.yaml").read_text())
        if d["kind"] == "StatefulSet"
    ][0]
    sts["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    assert any("resourcez" in e for e in k8s.validate([sts]))


def test_render_cli_refuses_a_bad_config() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.cli",
            "k8s",
            "render",
            "finetune",
            "strategy.lora.r=0",
            "strategy=lora",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "strategy.lora.r" in result.stderr


@pytest.mark.skipif(
    not os.environ.get("KUBECONFIG"),
    reason="no KUBECONFIG: server-side dry run needs a live cluster with KubeRay",
)
def test_server_side_dry_run(tmp_path: Path) -> None:
    for overlay in ("cpu-dev", "gpu"):
        subprocess.run(
            [
                "kubectl",
                "apply",
                "--dry-run=server",
                "-k",
                str(ROOT / "k8s" / "overlays" / overlay),
            ],
            check=True,
        )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job_doc()))
    subprocess.run(["kubectl", "apply", "--dry-run=server", "-f", str(path)], check=True)


@needs_crds
@pytest.mark.parametrize("kind", ["finetune", "sweep"])
def test_checked_in_rayjob_examples_are_current_and_valid(kind: str) -> None:
    path = ROOT / "k8s" / "jobs" / f"{kind}.yaml"
    shipped = yaml.safe_load(path.read_text())
    cfg = compose([], config_name=kind)
    name = sweep_name(cfg) if kind == "sweep" else run_name(cfg)
    fresh = k8s.render(kind, cfg, [], name, image="ghcr.io/example/graft:0.1.0", namespace="graft")
    assert shipped == fresh, f"{path} is stale: regenerate it with the command in its first line"
    assert k8s.validate([shipped]) == []
