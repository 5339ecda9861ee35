"""The Kubernetes manifests under k8s/, checked with the real tools: every kustomization rendered by
kustomize, core objects against Kubernetes' own schemas, KubeRay objects against the KubeRay v1.7.0 CRD
schemas (strict: a field the schema does not declare is an error), every entrypoint through the job's own
argument parser, the nightly RayJob rendered by the very script the CronJob runs, and checkov.

Tools: `kustomize` or `kubectl` (its built-in kustomize), `kubernetes-validate` (pip), `checkov` (on PATH
or named by $CHECKOV), `promtool` (on PATH or named by $PROMTOOL), `busybox` (optional: the render script
also runs under it). KubeRay's CRDs come from the folder named by $KUBERAY_CRD_SCHEMAS (ray.io_rayjobs.yaml,
ray.io_raycronjobs.yaml). A missing tool skips its tests on a workstation and fails them where $CI is set.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"

# Every kustomization that is built on its own (k8s/components/* are only ever included).
BUILDS = ["overlays/cpu", "overlays/gpu", "optional/raycronjob", "optional/monitoring"]
# The overlays that carry the nightly CronJob and its template.
CRONJOB_OVERLAYS = ["overlays/cpu", "overlays/gpu"]
TRAIN_BUILDS = ["overlays/cpu", "overlays/gpu", "optional/raycronjob"]

NAMESPACE = "genre-pipeline"
# Core objects are checked against this Kubernetes release's schemas (CronJob.timeZone is GA since 1.27).
KUBERNETES_VERSION = "1.33"
CORE_KINDS = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
SCHEMAS_ENV = "KUBERAY_CRD_SCHEMAS"
RUN_DATE = "2026-11-28"


# ---------------------------------------------------------------- tools


def _missing(what: str) -> None:
    """A missing tool: skip on a workstation, fail in CI (a silent skip there would hide a missing install)."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI is set, so this is a failure, not a skip)")
    pytest.skip(what)


@functools.cache
def _kustomize_command() -> tuple[str, ...] | None:
    if shutil.which("kustomize"):
        return ("kustomize", "build")
    if shutil.which("kubectl"):
        return ("kubectl", "kustomize")
    return None


@functools.cache
def _build_text(build: str) -> str:
    command = _kustomize_command()
    if command is None:
        _missing("neither `kustomize` nor `kubectl` is on PATH: install either (Debian: kubectl/kubernetes-client)")
    result = subprocess.run([*command, str(K8S / build)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} k8s/{build} failed:\n{result.stderr}"
    return result.stdout


def render(build: str) -> list[dict]:
    """The objects `kubectl apply -k k8s/<build>` would send (a fresh copy each call)."""
    return [doc for doc in yaml.safe_load_all(_build_text(build)) if doc is not None]


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def generated(docs: list[dict], name: str) -> dict:
    """A configMapGenerator's ConfigMap, by its name before kustomize appended the content hash."""
    return one([d for d in docs if re.fullmatch(rf"{name}-[a-z0-9]{{10}}", d["metadata"]["name"])], "ConfigMap")


def settings(docs: list[dict]) -> dict[str, str]:
    return generated(docs, "genre-pipeline-settings")["data"]


def render_label_rayjob(docs: list[dict], tmp_path: Path, run_date: str | None = RUN_DATE,
                        shell: tuple[str, ...] = ("sh",), path: str | None = None,
                        drop: str | None = None) -> subprocess.CompletedProcess:
    """Run the CronJob's init container by hand: its script and template from the rendered ConfigMap, its
    environment from the rendered settings ConfigMap (as envFrom gives it), output to tmp_path/rayjob.yaml."""
    template = generated(docs, "genre-label-rayjob-template")["data"]
    (tmp_path / "label-rayjob.yaml").write_text(template["label-rayjob.yaml"])
    (tmp_path / "render.sh").write_text(template["render.sh"])
    env = {"PATH": path or os.environ["PATH"], **settings(docs)}
    if run_date is not None:
        env["RUN_DATE"] = run_date
    if drop:
        env.pop(drop)
    return subprocess.run([*shell, str(tmp_path / "render.sh"), str(tmp_path / "label-rayjob.yaml"),
                           str(tmp_path / "rayjob.yaml")], env=env, capture_output=True, text=True, timeout=30)


def rendered_label_rayjob(docs: list[dict], tmp_path: Path, **kwargs) -> dict:
    result = render_label_rayjob(docs, tmp_path, **kwargs)
    assert result.returncode == 0, f"render.sh failed:\n{result.stderr}"
    text = (tmp_path / "rayjob.yaml").read_text()
    assert "${" not in text, "placeholders left in the rendered RayJob"
    return yaml.safe_load(text)


# ---------------------------------------------------------------- schemas


def _strict(schema):
    """The schema with additionalProperties: false on every object schema that lists properties and leaves
    unknown fields neither allowed (additionalProperties) nor preserved (x-kubernetes-preserve-unknown-fields)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[key] = _strict(value)
        else:
            out[key] = value
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_schema(kind: str, strict: bool = True) -> dict:
    folder = os.environ.get(SCHEMAS_ENV)
    if not folder:
        pytest.skip(f"{SCHEMAS_ENV} is not set: point it at the folder with KubeRay's CRDs "
                    f"({', '.join(CRD_FILES.values())}), from ray-operator/config/crd/bases in KubeRay v1.7.0")
    path = Path(folder) / CRD_FILES[kind]
    assert path.is_file(), f"{SCHEMAS_ENV}={folder}: no {CRD_FILES[kind]} there"
    crd = yaml.safe_load(path.read_text())
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    return _strict(schema) if strict else schema


def crd_errors(obj: dict, strict: bool = True) -> list[str]:
    schema = _crd_schema(obj["kind"], strict)
    validator = jsonschema.Draft4Validator(schema)  # OpenAPI v3.0 schemas are draft-4 flavoured
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]


def assert_valid_crd(obj: dict) -> None:
    assert obj["apiVersion"] == "ray.io/v1"
    errors = crd_errors(obj)
    assert not errors, f"{obj['kind']} {obj['metadata']['name']} breaks the KubeRay CRD schema:\n" + "\n".join(errors)


@functools.cache
def _kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate is not installed: pip install kubernetes-validate")
    return kubernetes_validate


# ---------------------------------------------------------------- the jobs' own parsers


@functools.cache
def _job_module(script: str):
    path = REPO / script
    assert path.is_file(), f"the entrypoint names {script}, which does not exist"
    spec = importlib.util.spec_from_file_location(f"k8s_entrypoint_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _job_parser(script: str):
    return _job_module(script).build_parser()


def parse_entrypoint(entrypoint: str, script: str, capsys):
    """The entrypoint's arguments through the job's own argparse parser; an unknown flag fails the test."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", script], f"entrypoint should start with `python {script}`: {entrypoint}"
    parser = _job_parser(script)
    try:
        return parser.parse_args(argv[2:])
    except SystemExit:
        pytest.fail(f"{script} rejects the entrypoint's arguments: {capsys.readouterr().err.strip()}\n"
                    f"entrypoint: {entrypoint}")


# ================================================================ the files


def _yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_every_yaml_file_under_k8s_parses():
    files = _yaml_files()
    assert len(files) >= 10, files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path.relative_to(REPO)} holds no YAML document"
        for doc in docs:
            assert isinstance(doc, dict) and {"apiVersion", "kind"} <= doc.keys(), \
                f"{path.relative_to(REPO)}: a document without apiVersion/kind"


def test_no_secret_is_shipped():
    """Credentials come from a Secret created by hand; no manifest carries one or anything key-shaped."""
    for path in _yaml_files():
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path}: an AWS access key id"
        for doc in yaml.safe_load_all(text):
            assert doc is None or doc.get("kind") != "Secret", f"{path.relative_to(REPO)} ships a Secret"


@pytest.mark.parametrize("build", BUILDS)
def test_kustomization_renders(build):
    docs = render(build)
    assert docs
    names = set()
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in names, f"{key} twice"
        names.add(key)
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{key} outside {NAMESPACE}"
        assert doc["metadata"]["labels"].get("app.kubernetes.io/part-of") == "genre-pipeline", key


@pytest.mark.parametrize("build", BUILDS)
def test_core_objects_match_the_kubernetes_schemas_strictly(build):
    kv = _kubernetes_validate()
    core = [d for d in render(build) if d["kind"] in CORE_KINDS]
    for doc in core:
        try:
            kv.validate(doc, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as error:
            pytest.fail(f"k8s/{build}: {doc['kind']} {doc['metadata']['name']}: {error}")
    unchecked = {d["kind"] for d in render(build)} - CORE_KINDS - set(CRD_FILES) - {"PodMonitor", "PrometheusRule"}
    assert not unchecked, f"kinds no test validates: {unchecked}"


# ================================================================ KubeRay objects


@pytest.mark.parametrize("build", TRAIN_BUILDS)
def test_training_rayjob_matches_the_crd_strictly(build):
    assert_valid_crd(one(render(build), "RayJob", "genre-train"))


@pytest.mark.parametrize("build", CRONJOB_OVERLAYS)
def test_nightly_label_rayjob_matches_the_crd_strictly(build, tmp_path):
    assert_valid_crd(rendered_label_rayjob(render(build), tmp_path))


def test_raycronjob_matches_the_crd_strictly():
    assert_valid_crd(one(render("optional/raycronjob"), "RayCronJob", "genre-label"))


def test_strict_schema_rejects_a_misspelt_key():
    """The CRD leaves RayJob.spec open to unknown fields; the strict copy does not, so a typo is caught."""
    train = one(render("overlays/gpu"), "RayJob", "genre-train")
    assert crd_errors(train) == []

    typo = copy.deepcopy(train)
    typo["spec"]["activeDeadlineSecond"] = typo["spec"].pop("activeDeadlineSeconds")
    assert crd_errors(typo, strict=False) == [], "the CRD as shipped accepts the typo: the strict check is needed"
    errors = crd_errors(typo)
    assert any("activeDeadlineSecond" in e and e.startswith("spec:") for e in errors), errors

    nested = copy.deepcopy(train)
    worker = nested["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    worker["resource"] = worker.pop("resources")
    assert any("'resource' was unexpected" in e for e in crd_errors(nested)), crd_errors(nested)


@pytest.mark.parametrize("build", TRAIN_BUILDS)
def test_rayjobs_clean_up_authenticate_and_take_s3_credentials_from_the_secret(build, tmp_path):
    docs = render(build)
    jobs = [one(docs, "RayJob", "genre-train")["spec"]]
    if build in CRONJOB_OVERLAYS:
        jobs.append(rendered_label_rayjob(docs, tmp_path)["spec"])
    else:
        jobs.append(one(docs, "RayCronJob", "genre-label")["spec"]["jobTemplate"])
    for spec in jobs:
        assert deletion_rule_errors(spec) == []
        assert spec["activeDeadlineSeconds"] > 0
        assert spec["backoffLimit"] >= 1
        cluster = spec["rayClusterSpec"]
        assert cluster["rayVersion"] == "2.60.0"
        assert cluster["authOptions"] == {"mode": "token"}, "Ray token authentication stays on"
        pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
        for pod in pods:
            (container,) = pod["spec"]["containers"]
            assert {"secretRef": {"name": "genre-pipeline-s3"}} in container["envFrom"]
            assert {"name": "metrics", "containerPort": 8080} in container["ports"]
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert pod["spec"]["automountServiceAccountToken"] is False
            assert container["resources"]["requests"] and container["resources"]["limits"]


# ================================================================ cleanup (deletionStrategy)

DELETION_ORDER = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]


def deletion_rule_errors(spec: dict) -> list[str]:
    """KubeRay 1.7's own checks of deletionStrategy.deletionRules (ray-operator validation.go, which the CRD's
    schema cannot express): not with shutdownAfterJobFinishes (nor its TTL), nor with onSuccess/onFailure; each
    condition one of jobStatus / jobDeploymentStatus; one rule per (condition, policy); TTLs non-decreasing
    along DeleteWorkers -> DeleteCluster -> DeleteSelf; no DeleteWorkers with the autoscaler."""
    strategy = spec.get("deletionStrategy") or {}
    rules = strategy.get("deletionRules") or []
    errors = []
    if not rules:
        return ["no deletionStrategy.deletionRules"]
    if spec.get("shutdownAfterJobFinishes"):
        errors.append("shutdownAfterJobFinishes and deletionRules are mutually exclusive")
    if spec.get("ttlSecondsAfterFinished"):
        errors.append("ttlSecondsAfterFinished only works with shutdownAfterJobFinishes")
    if "onSuccess" in strategy or "onFailure" in strategy:
        errors.append("legacy onSuccess/onFailure together with deletionRules")
    ttls: dict[tuple[str, str], dict[str, int]] = {}
    for i, rule in enumerate(rules):
        condition = rule["condition"]
        keys = {"jobStatus", "jobDeploymentStatus"} & condition.keys()
        if len(keys) != 1:
            errors.append(f"deletionRules[{i}]: exactly one of jobStatus / jobDeploymentStatus")
            continue
        (key,) = keys
        by_policy = ttls.setdefault((key, condition[key]), {})
        if rule["policy"] in by_policy:
            errors.append(f"deletionRules[{i}]: duplicate {rule['policy']} for {key} {condition[key]}")
        by_policy[rule["policy"]] = condition.get("ttlSeconds", 0)
        if rule["policy"] == "DeleteWorkers" and spec.get("rayClusterSpec", {}).get("enableInTreeAutoscaling"):
            errors.append(f"deletionRules[{i}]: DeleteWorkers with autoscaling")
    for (key, value), by_policy in ttls.items():
        ordered = [by_policy[p] for p in DELETION_ORDER if p in by_policy]
        if ordered != sorted(ordered):
            errors.append(f"{key} {value}: TTLs must not decrease along {DELETION_ORDER}: {by_policy}")
    return errors


def _rules(spec: dict) -> dict[tuple[str, str], dict[str, int]]:
    out: dict[tuple[str, str], dict[str, int]] = {}
    for rule in spec["deletionStrategy"]["deletionRules"]:
        ((key, value),) = [(k, v) for k, v in rule["condition"].items() if k != "ttlSeconds"]
        out.setdefault((key, value), {})[rule["policy"]] = rule["condition"].get("ttlSeconds", 0)
    return out


@pytest.mark.parametrize("build", TRAIN_BUILDS)
def test_finished_rayjobs_are_cleaned_up_and_failed_ones_kept_for_debugging(build, tmp_path):
    docs = render(build)
    train = one(docs, "RayJob", "genre-train")
    nightly = (rendered_label_rayjob(docs, tmp_path) if build in CRONJOB_OVERLAYS
               else one(docs, "RayCronJob", "genre-label")["spec"]["jobTemplate"])
    nightly_spec = nightly.get("spec", nightly)
    for name, spec in [("train", train["spec"]), ("nightly", nightly_spec)]:
        assert deletion_rule_errors(spec) == [], name
        rules = _rules(spec)
        # Success: the cluster (and its GPUs) go within minutes.
        assert 0 < rules[("jobStatus", "SUCCEEDED")]["DeleteCluster"] <= 3600, name
        # Failure, by the job or the deployment: GPU workers freed within minutes, the head kept a while for
        # debugging, the RayJob itself never deleted automatically.
        for condition in [("jobStatus", "FAILED"), ("jobDeploymentStatus", "Failed")]:
            assert rules[condition]["DeleteWorkers"] <= 3600, (name, condition)
            assert rules[condition]["DeleteCluster"] >= 3600, (name, condition)
            assert "DeleteSelf" not in rules[condition], (name, condition)
    # Training's RayJob stays (deleting it would let the next apply start a new run); a good night's goes
    # after a week (RayCronJob has no history limit, so this is what prunes them).
    assert "DeleteSelf" not in _rules(train["spec"])[("jobStatus", "SUCCEEDED")]
    assert _rules(nightly_spec)[("jobStatus", "SUCCEEDED")]["DeleteSelf"] >= 86400


def test_deletion_rule_check_rejects_what_kuberay_rejects():
    spec = one(render("overlays/gpu"), "RayJob", "genre-train")["spec"]
    assert deletion_rule_errors(spec) == []
    legacy = copy.deepcopy(spec) | {"shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 300}
    assert len(deletion_rule_errors(legacy)) == 2
    disordered = copy.deepcopy(spec)
    for rule in disordered["deletionStrategy"]["deletionRules"]:
        if rule["policy"] == "DeleteWorkers":
            rule["condition"]["ttlSeconds"] = 10**6
    assert any("must not decrease" in e for e in deletion_rule_errors(disordered))
    # The CRD schema (strict) also checks the rules' shape: an unknown policy fails there.
    train = one(render("overlays/gpu"), "RayJob", "genre-train")
    train["spec"]["deletionStrategy"]["deletionRules"][0]["policy"] = "DeleteEverything"
    assert any("deletionRules" in e for e in crd_errors(train))


# ================================================================ sizes, images, settings


@pytest.mark.parametrize("build", TRAIN_BUILDS)
def test_images_are_the_overlays_pinned_job_image(build):
    docs = render(build)
    job_image = settings(docs)["IMAGE"]
    assert re.fullmatch(r"[a-z0-9./-]+/genre-pipeline:[0-9A-Za-z._-]+", job_image), job_image
    assert not job_image.endswith(":latest")
    train = one(docs, "RayJob", "genre-train")["spec"]
    cluster = train["rayClusterSpec"]
    images = {c["image"] for t in [cluster["headGroupSpec"]["template"], train["submitterPodTemplate"],
                                   *[g["template"] for g in cluster["workerGroupSpecs"]]]
              for c in t["spec"]["containers"]}
    assert images == {job_image}


@pytest.mark.parametrize("build", CRONJOB_OVERLAYS)
def test_label_cluster_is_the_training_cluster(build, tmp_path):
    """The label template is text, so kustomize cannot patch it: it must come out identical to the
    training RayJob's cluster and submitter once the settings are filled in."""
    docs = render(build)
    train = one(docs, "RayJob", "genre-train")["spec"]
    label = rendered_label_rayjob(docs, tmp_path)["spec"]
    assert label["rayClusterSpec"] == train["rayClusterSpec"]
    assert label["submitterPodTemplate"] == train["submitterPodTemplate"]


def _workers(build: str) -> dict:
    (group,) = one(render(build), "RayJob", "genre-train")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group


def test_gpu_overlay_has_four_one_gpu_workers_on_gpu_nodes():
    group = _workers("overlays/gpu")
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    # Any Linux node: the GPU request and the toleration bring a GPU node (see the next test).
    assert term["matchExpressions"] == [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


# Node labels that exist only once a node has booted and its daemons ran (NVIDIA GPU feature discovery,
# Node Feature Discovery). A node autoscaler scaling a GPU pool from zero cannot know them, so a required
# selector on one keeps the pods Pending forever.
POST_BOOT_LABEL_PREFIXES = ("nvidia.com/", "feature.node.kubernetes.io/", "amd.com/")


def _required_node_label_keys(pod: dict) -> set[str]:
    keys = set(pod.get("nodeSelector", {}))
    required = (pod.get("affinity", {}).get("nodeAffinity", {})
                .get("requiredDuringSchedulingIgnoredDuringExecution", {}))
    for term in required.get("nodeSelectorTerms", []):
        keys |= {e["key"] for e in term.get("matchExpressions", []) + term.get("matchFields", [])}
    return keys


def _worker_pods(build: str, tmp_path: Path) -> list[dict]:
    docs = render(build)
    clusters = [d["spec"]["rayClusterSpec"] for d in docs if d["kind"] == "RayJob"]
    clusters += [d["spec"]["jobTemplate"]["rayClusterSpec"] for d in docs if d["kind"] == "RayCronJob"]
    if build in CRONJOB_OVERLAYS:
        clusters.append(rendered_label_rayjob(docs, tmp_path)["spec"]["rayClusterSpec"])
    return [g["template"]["spec"] for c in clusters for g in c["workerGroupSpecs"]]


@pytest.mark.parametrize("build", TRAIN_BUILDS)
def test_gpu_workers_can_scale_from_zero(build, tmp_path):
    """No worker requires a label that only a booted GPU node has; GPU workers keep their request and
    toleration, which is what an autoscaler provisions for."""
    pods = _worker_pods(build, tmp_path)
    assert pods
    for pod in pods:
        post_boot = {k for k in _required_node_label_keys(pod) if k.startswith(POST_BOOT_LABEL_PREFIXES)}
        assert not post_boot, f"k8s/{build}: workers require post-boot node labels {post_boot}"
        (worker,) = pod["containers"]
        if worker["resources"]["limits"].get("nvidia.com/gpu", "0") != "0":
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]


def test_post_boot_label_check_catches_nvidia_feature_discovery():
    pod = {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}]}]}}},
        "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}
    keys = _required_node_label_keys(pod)
    assert keys == {"nvidia.com/gpu.present", "cloud.google.com/gke-accelerator"}
    assert {k for k in keys if k.startswith(POST_BOOT_LABEL_PREFIXES)} == {"nvidia.com/gpu.present"}


def test_cpu_overlay_is_small_and_has_no_gpus():
    group = _workers("overlays/cpu")
    assert 1 <= group["replicas"] <= 2
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"].get("nvidia.com/gpu", "0") == "0"
    assert int(worker["resources"]["limits"]["cpu"]) <= 2


# ================================================================ entrypoints vs the jobs' parsers


@pytest.mark.parametrize("build", TRAIN_BUILDS)
def test_training_entrypoint_is_accepted_by_the_training_job(build, capsys):
    docs = render(build)
    values = settings(docs)
    args = parse_entrypoint(one(docs, "RayJob", "genre-train")["spec"]["entrypoint"],
                            "jobs/train_genre_model.py", capsys)
    bucket = values["BUCKET"]
    assert args.catalog == f"s3://{bucket}/catalog/catalog.parquet"
    assert args.storage_path == f"s3://{bucket}/runs"
    assert args.name == values["RUN_NAME"]
    assert args.pushgateway == values["PUSHGATEWAY"]
    entrypoint = shlex.split(one(docs, "RayJob", "genre-train")["spec"]["entrypoint"])
    config, _ = _job_module("jobs/train_genre_model.py").parse_config(entrypoint[2:])
    # A pretrained backbone, its head first: from random weights the labels would not beat the genre prior.
    assert config.starts_pretrained and config.resolved_head_epochs > 0 and config.weights is None
    if build == "overlays/cpu":
        assert (args.arch, args.epochs, args.num_workers, args.use_gpu) == ("efficientnet_lite0", 3, 2, False)
    else:
        assert (args.arch, args.epochs, args.num_workers, args.use_gpu) == ("efficientnet_lite2", 5, 4, True)
    gpus = int(values["WORKERS"]) * int(values["WORKER_GPUS"])
    assert gpus == (args.num_workers if args.use_gpu else 0), "one GPU per DDP worker"


PRETRAINED_ARCHS = {"efficientnet_lite0", "efficientnet_lite2"}


@pytest.mark.parametrize("build", TRAIN_BUILDS)
def test_every_training_rayjob_uses_the_pretrained_recipe(build):
    """The recipe for real posters everywhere: a pretrained EfficientNet-Lite, never a backbone from random
    weights (e.g. resnet50 or cnn with pretraining off), judged by the job's own parser (conftest.load_job)."""
    from conftest import load_job

    entrypoint = shlex.split(one(render(build), "RayJob", "genre-train")["spec"]["entrypoint"])
    assert entrypoint[:2] == ["python", "jobs/train_genre_model.py"]
    job = load_job("train_genre_model")
    args = job.build_parser().parse_args(entrypoint[2:])
    assert args.arch in PRETRAINED_ARCHS, f"k8s/{build} trains {args.arch}"
    assert args.pretrained is not False, f"k8s/{build} turns pretraining off"
    assert args.weights is None, f"k8s/{build} starts from a weights file, not the pretrained backbone"
    config, _ = job.parse_config(entrypoint[2:])
    assert config.starts_pretrained and config.resolved_head_epochs > 0


def assert_pinned_model(model: str, values: dict[str, str]) -> None:
    """The nightly --model is the MODEL_URI setting: a promoted pointer folder (jobs/promote_model.py) or a
    pinned version, never the run's model folder, whose pointer every training run moves."""
    assert model == values["MODEL_URI"], f"--model {model} is not the MODEL_URI setting"
    assert model != f"s3://{values['BUCKET']}/runs/{values['RUN_NAME']}/model"
    assert re.fullmatch(r"s3://[a-z0-9.-]+/(runs/[^/]+/versions/[^/]+|.+/production)", model), model


@pytest.mark.parametrize("build", CRONJOB_OVERLAYS)
def test_nightly_label_entrypoint_is_accepted_by_the_label_job(build, tmp_path, capsys):
    docs = render(build)
    values = settings(docs)
    job = rendered_label_rayjob(docs, tmp_path)
    assert job["metadata"]["name"] == f"genre-label-{RUN_DATE}"
    args = parse_entrypoint(job["spec"]["entrypoint"], "jobs/label_catalog.py", capsys)
    bucket = values["BUCKET"]
    assert args.catalog == f"s3://{bucket}/catalog/catalog.parquet"
    assert_pinned_model(args.model, values)
    assert args.output == f"s3://{bucket}/labels"
    assert args.run_date == RUN_DATE
    assert args.pushgateway == values["PUSHGATEWAY"]
    assert args.batch_size == 64
    if build == "overlays/cpu":
        assert (args.actors, args.num_gpus_per_actor) == (2, 0)
    else:
        assert (args.actors, args.num_gpus_per_actor) == (4, 1)
    assert args.actors * args.num_gpus_per_actor == int(values["WORKERS"]) * int(values["WORKER_GPUS"])


def _pushgateway_flags(build: str, tmp_path: Path, capsys) -> list[str]:
    docs = render(build)
    jobs = [(one(docs, "RayJob", "genre-train")["spec"]["entrypoint"], "jobs/train_genre_model.py")]
    jobs += [(d["spec"]["jobTemplate"]["entrypoint"], "jobs/label_catalog.py")
             for d in docs if d["kind"] == "RayCronJob"]
    if build in CRONJOB_OVERLAYS:
        jobs.append((rendered_label_rayjob(docs, tmp_path)["spec"]["entrypoint"], "jobs/label_catalog.py"))
    return [parse_entrypoint(entrypoint, script, capsys).pushgateway for entrypoint, script in jobs]


@pytest.mark.parametrize("build", TRAIN_BUILDS)
def test_every_entrypoint_pushes_to_the_pushgateway_setting(build, tmp_path, capsys):
    gateway = settings(render(build))["PUSHGATEWAY"]
    assert re.fullmatch(r"[a-z0-9.-]+:[0-9]+", gateway), gateway
    flags = _pushgateway_flags(build, tmp_path, capsys)
    assert len(flags) == 2 and set(flags) == {gateway}


def test_the_pushgateway_address_is_written_only_as_the_setting():
    """Its address is in no manifest, template or script but as a PUSHGATEWAY= settings literal."""
    gateway = settings(render("overlays/gpu"))["PUSHGATEWAY"]
    host = gateway.split(":")[0]
    for path in sorted(p for p in K8S.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".sh")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if host in line and not line.lstrip().startswith("#"):
                assert line.strip() == f"- PUSHGATEWAY={gateway}", f"{path.relative_to(REPO)}:{number}: {line}"


def _ray_pod_templates(docs: list[dict], tmp_path: Path) -> dict[str, dict]:
    """Every pod template of the training RayJob and of the label RayJob (rendered, or the RayCronJob's)."""
    specs = {"train": one(docs, "RayJob", "genre-train")["spec"]}
    specs.update({f"raycronjob {d['metadata']['name']}": d["spec"]["jobTemplate"]
                  for d in docs if d["kind"] == "RayCronJob"})
    if any(d["kind"] == "CronJob" for d in docs):
        specs["nightly"] = rendered_label_rayjob(docs, tmp_path)["spec"]
    pods = {}
    for job, spec in specs.items():
        cluster = spec["rayClusterSpec"]
        pods[f"{job} submitter"] = spec["submitterPodTemplate"]
        pods[f"{job} head"] = cluster["headGroupSpec"]["template"]
        pods.update({f"{job} {g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]})
    return pods


def _assert_service_account(docs: list[dict], tmp_path: Path, account: str) -> None:
    pods = _ray_pod_templates(docs, tmp_path)
    assert len(pods) == 6, sorted(pods)
    for name, pod in pods.items():
        assert pod["spec"].get("serviceAccountName") == account, f"{name}: {pod['spec'].get('serviceAccountName')}"
        assert pod["spec"]["automountServiceAccountToken"] is False, name


@pytest.mark.parametrize("build", TRAIN_BUILDS)
def test_every_ray_pod_runs_as_the_service_account_setting(build, tmp_path):
    docs = render(build)
    _assert_service_account(docs, tmp_path, settings(docs)["SERVICE_ACCOUNT"])


@pytest.mark.parametrize("build", TRAIN_BUILDS)
def test_a_service_account_given_in_the_overlay_reaches_every_ray_pod(build, tmp_path):
    """IRSA / Workload Identity: set SERVICE_ACCOUNT in the overlay (here, in a copy of k8s/) and every pod
    template of both jobs gets it."""
    command = _kustomize_command()
    if command is None:
        _missing("neither `kustomize` nor `kubectl` is on PATH")
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    for overlay in CRONJOB_OVERLAYS:
        path = copy_root / overlay / "kustomization.yaml"
        text = path.read_text()
        assert text.count("- SERVICE_ACCOUNT=default\n") == 1, path
        path.write_text(text.replace("- SERVICE_ACCOUNT=default\n", "- SERVICE_ACCOUNT=genre-pipeline-s3-role\n"))
    result = subprocess.run([*command, str(copy_root / build)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    _assert_service_account(docs, tmp_path, "genre-pipeline-s3-role")


def test_raycronjob_entrypoint_is_accepted_by_the_label_job(capsys):
    docs = render("optional/raycronjob")
    values = settings(docs)
    spec = one(docs, "RayCronJob", "genre-label")["spec"]
    assert spec["timeZone"] == "Etc/UTC"
    args = parse_entrypoint(spec["jobTemplate"]["entrypoint"], "jobs/label_catalog.py", capsys)
    assert_pinned_model(args.model, values)
    assert args.output == f"s3://{values['BUCKET']}/labels"
    assert (args.actors, args.num_gpus_per_actor) == (4, 1)
    # No CronJob launcher in this variant: the operator creates the RayJobs.
    assert not [d for d in docs if d["kind"] in ("CronJob", "Role", "RoleBinding", "ServiceAccount")]


# The labels table's catalog: pyiceberg's variable suffix -> the setting that fills it.
TABLE_CATALOG_SETTINGS = {"TYPE": "TABLE_CATALOG_TYPE", "URI": "TABLE_CATALOG_URI",
                          "WAREHOUSE": "TABLE_CATALOG_WAREHOUSE"}


def _label_job(docs: list[dict], tmp_path: Path) -> dict:
    """The nightly label RayJob's spec: the CronJob's template as it renders, or the RayCronJob's jobTemplate."""
    if any(d["kind"] == "CronJob" for d in docs):
        return rendered_label_rayjob(docs, tmp_path)["spec"]
    return one(docs, "RayCronJob", "genre-label")["spec"]["jobTemplate"]


@pytest.mark.parametrize("build", TRAIN_BUILDS)
def test_the_label_job_commits_through_the_catalog_of_the_settings(build, tmp_path, capsys, monkeypatch):
    """An s3:// output cannot have the embedded SQLite catalog (the job refuses it): the nightly entrypoint names
    a catalog with --table-catalog, and every Ray pod of the label job configures that catalog from the
    TABLE_CATALOG_* settings, in pyiceberg's own PYICEBERG_CATALOG__<NAME>__* variables."""
    import dataclasses

    from pyiceberg.utils.config import Config

    from genre_pipeline.label.table import EMBEDDED_CATALOG, TableSettingsError, catalog_properties

    docs = render(build)
    values = settings(docs)
    spec = _label_job(docs, tmp_path)
    parse_entrypoint(spec["entrypoint"], "jobs/label_catalog.py", capsys)
    config, _ = _job_module("jobs/label_catalog.py").parse_config(shlex.split(spec["entrypoint"])[2:])
    assert config.table_catalog != EMBEDDED_CATALOG and config.output.startswith("s3://")
    expected = {f"PYICEBERG_CATALOG__{config.table_catalog.upper()}__{suffix}": values[setting]
                for suffix, setting in TABLE_CATALOG_SETTINGS.items()}
    cluster = spec["rayClusterSpec"]
    pods = {"head": cluster["headGroupSpec"]["template"],
            **{g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]}}
    for name, pod in pods.items():
        (container,) = pod["spec"]["containers"]
        env = {var["name"]: var.get("value") for var in container.get("env", [])}
        assert {key: env.get(key) for key in expected} == expected, f"k8s/{build}: {name}"

    # pyiceberg, in the head's environment, finds the flag's catalog with the settings' properties.
    for key in [key for key in os.environ if key.upper().startswith("PYICEBERG_")]:
        monkeypatch.delenv(key)
    for key, value in expected.items():
        monkeypatch.setenv(key, value)
    assert Config().get_catalog_config(config.table_catalog) == {
        suffix.lower(): values[setting] for suffix, setting in TABLE_CATALOG_SETTINGS.items()}
    assert catalog_properties(config.table_settings)["name"] == config.table_catalog
    embedded = dataclasses.replace(config, table_catalog=EMBEDDED_CATALOG)
    with pytest.raises(TableSettingsError, match="embedded SQLite catalog needs a local output folder"):
        catalog_properties(embedded.table_settings)


def test_the_catalog_address_is_written_only_as_the_setting():
    """Each overlay's catalog URI is in no manifest, template or script but as its TABLE_CATALOG_URI= literal."""
    for build in CRONJOB_OVERLAYS:
        uri = settings(render(build))["TABLE_CATALOG_URI"]
        assert re.fullmatch(r"https?://[a-z0-9.-]+(:[0-9]+)?(/\S*)?", uri), uri
        for path in sorted(p for p in K8S.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".sh")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if uri in line and not line.lstrip().startswith("#"):
                    assert line.strip() == f"- TABLE_CATALOG_URI={uri}", f"{path.relative_to(REPO)}:{number}: {line}"


SCHEDULER_KINDS = ("CronJob", "RayCronJob")
# RayCronJob.spec in KubeRay 1.7.0. A field beyond these (concurrencyPolicy, startingDeadlineSeconds, history
# limits) is one k8s/components/raycronjob should set, and k8s/README.md should stop saying it is missing.
RAYCRONJOB_SPEC_FIELDS = {"schedule", "timeZone", "suspend", "jobTemplate"}


@pytest.mark.parametrize("build", CRONJOB_OVERLAYS + ["optional/raycronjob"])
def test_each_build_schedules_the_night_exactly_once(build):
    """The CronJob and the RayCronJob never render together: the raycronjob component deletes the CronJob and
    its launcher objects, so applying the variant cannot keep both (k8s/README.md: switching a namespace)."""
    docs = render(build)
    schedulers = [(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in SCHEDULER_KINDS]
    assert len(schedulers) == 1, f"k8s/{build}: {schedulers}"
    if schedulers[0][0] == "RayCronJob":
        launcher = [(d["kind"], d["metadata"]["name"]) for d in docs if "launcher" in d["metadata"]["name"]
                    or d["metadata"]["name"].startswith("genre-label-rayjob-template")]
        assert not launcher, f"k8s/{build} keeps the CronJob's helpers: {launcher}"


def test_raycronjob_crd_has_no_concurrency_policy_or_starting_deadline():
    """KubeRay 1.7.0's RayCronJob has neither (k8s/README.md relies on the commit protocol instead); should a
    KubeRay upgrade bring them, this fails until the component sets Forbid and a short deadline."""
    fields = set(_crd_schema("RayCronJob", strict=False)["properties"]["spec"]["properties"])
    assert fields == RAYCRONJOB_SPEC_FIELDS, f"RayCronJob.spec gained {fields - RAYCRONJOB_SPEC_FIELDS}: set them"
    spec = one(render("optional/raycronjob"), "RayCronJob", "genre-label")["spec"]
    if "concurrencyPolicy" in fields:
        assert spec["concurrencyPolicy"] == "Forbid"
    if "startingDeadlineSeconds" in fields:
        assert 0 < spec["startingDeadlineSeconds"] <= 3600


def test_raycronjob_run_date_is_the_drivers_utc_date(capsys):
    """The operator copies jobTemplate verbatim (the scheduled time is only an annotation on the RayJob), so
    the entrypoint passes no --run-date and the label job takes today's date from the clock, in UTC."""
    entrypoint = one(render("optional/raycronjob"), "RayCronJob", "genre-label")["spec"]["jobTemplate"]["entrypoint"]
    assert "--run-date" not in shlex.split(entrypoint)
    parse_entrypoint(entrypoint, "jobs/label_catalog.py", capsys)
    before = datetime.now(timezone.utc).date().isoformat()
    config, _ = _job_module("jobs/label_catalog.py").parse_config(shlex.split(entrypoint)[2:])
    after = datetime.now(timezone.utc).date().isoformat()
    assert config.run_date in {before, after}


# ================================================================ the nightly CronJob


@pytest.mark.parametrize("build", CRONJOB_OVERLAYS)
def test_cronjob_launches_one_labelling_rayjob_a_night(build):
    docs = render(build)
    cron = one(docs, "CronJob", "genre-label-nightly")["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    assert cron["timeZone"] == "Etc/UTC"
    assert cron["startingDeadlineSeconds"] > 0
    assert cron["successfulJobsHistoryLimit"] >= 1 and cron["failedJobsHistoryLimit"] >= 1
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False

    # The names kustomize generated are the names the pod uses.
    sa = one(docs, "ServiceAccount", pod["serviceAccountName"])
    assert sa["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    template_cm = generated(docs, "genre-label-rayjob-template")
    assert volumes["template"]["configMap"]["name"] == template_cm["metadata"]["name"]
    (render_step,) = pod["initContainers"]
    assert render_step["envFrom"] == [{"configMapRef": {"name": generated(docs, "genre-pipeline-settings")
                                                        ["metadata"]["name"]}}]
    assert render_step["command"][:2] == ["/bin/sh", "/template/render.sh"]
    assert Path(render_step["command"][2]).name in template_cm["data"]

    # Only the container that talks to the API server gets a token.
    (create,) = pod["containers"]
    assert create["args"][0] == "create"
    token_mounts = {c["name"] for c in [render_step, create]
                    for m in c.get("volumeMounts", []) if m["name"] == "kube-api-access"}
    assert token_mounts == {"create"}
    for container in (render_step, create):
        image = container["image"]
        assert re.search(r":[0-9A-Za-z._-]+$", image) and not image.endswith(":latest"), image
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["resources"]["limits"]


@pytest.mark.parametrize("build", CRONJOB_OVERLAYS)
def test_launcher_may_only_create_rayjobs_in_its_namespace(build):
    docs = render(build)
    role = one(docs, "Role", "genre-label-launcher")
    assert role["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]}]
    binding = one(docs, "RoleBinding", "genre-label-launcher")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "genre-label-launcher"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "genre-label-launcher",
                                    "namespace": NAMESPACE}]
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def _busybox_path(tmp_path: Path) -> str | None:
    busybox = shutil.which("busybox")
    if busybox is None:
        return None
    applets = tmp_path / "busybox-bin"
    applets.mkdir()
    for applet in ("sh", "awk", "date"):
        (applets / applet).symlink_to(busybox)
    return str(applets)


@pytest.mark.parametrize("shell", ["sh", "busybox"])
def test_render_script_defaults_to_todays_utc_date(shell, tmp_path):
    path = None
    if shell == "busybox":
        path = _busybox_path(tmp_path)
        if path is None:
            pytest.skip("busybox is not installed (Debian: apt-get install busybox): ran under sh only")
    docs = render("overlays/gpu")
    before = datetime.now(timezone.utc).date().isoformat()
    job = rendered_label_rayjob(docs, tmp_path, run_date=None, shell=("sh",), path=path)
    after = datetime.now(timezone.utc).date().isoformat()
    assert job["metadata"]["name"] in {f"genre-label-{before}", f"genre-label-{after}"}
    run_date = job["metadata"]["labels"]["genre-pipeline/run-date"]
    assert f"--run-date {run_date}" in job["spec"]["entrypoint"]
    assert len(job["metadata"]["name"]) <= 63


def test_render_script_fails_on_an_unset_setting_or_a_bad_date(tmp_path):
    docs = render("overlays/cpu")
    missing = render_label_rayjob(docs, tmp_path, drop="BUCKET")
    assert missing.returncode != 0 and "BUCKET is not set" in missing.stderr
    bad_date = render_label_rayjob(docs, tmp_path, run_date="28.11.2026")
    assert bad_date.returncode != 0 and "YYYY-MM-DD" in bad_date.stderr


# ================================================================ alerts (PrometheusRule)


def _promtool() -> str:
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not promtool:
        _missing("promtool is not installed (Debian: apt-get install prometheus), or set PROMTOOL")
    return promtool


def _rule_file(tmp_path: Path) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rule file, which is what the Operator hands Prometheus."""
    rule = one(render("optional/monitoring"), "PrometheusRule", "genre-pipeline")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    return path


def test_prometheus_rules_pass_promtool_check(tmp_path):
    rules = _rule_file(tmp_path)
    result = subprocess.run([_promtool(), "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {r["alert"] for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"]}
    assert {"GenrePipelineLabelStale", "GenrePipelineLabelNoPush", "GenrePipelineBadPosterShareHigh",
            "GenrePipelinePredictBatchSlow"} <= alerts


LABEL = 'job="genre_pipeline_label",instance=""'
# promtool's clock starts at 0. Series are sampled every minute, as a scraped Pushgateway's are; a healthy one
# is a push every night whose value is the time it was pushed.
NO_PUSH_ALERT = {
    "exp_labels": {"severity": "warning", "job": "genre_pipeline_label"},
    "exp_annotations": {
        "summary": "The nightly label job pushed nothing in the last 26 hours",
        "description": "No label run pushed to the Pushgateway since yesterday's 02:30 UTC launch. Check the CronJob "
        "(kubectl -n genre-pipeline get cronjob genre-label-nightly, its Jobs and events) and the Pushgateway."}}
NIGHTLY_PUSHES = "0x1439 86400x1439 172800x1440"  # pushed at 0 h, 24 h and 48 h; sampled up to 72 h
RULE_TESTS = {
    "rule_files": ["rules.yaml"],
    "evaluation_interval": "1m",
    "tests": [
        {   # A Pushgateway with no label group: the absent() alert fires, nothing else.
            "interval": "1m",
            "input_series": [],
            "alert_rule_test": [
                {"eval_time": "1h", "alertname": "GenrePipelineLabelNoPush", "exp_alerts": [NO_PUSH_ALERT]},
                {"eval_time": "1h", "alertname": "GenrePipelineLabelStale", "exp_alerts": []},
            ],
        },
        {   # Healthy: a push each night (every 24 h), a success each time, 1% bad posters: no alert.
            "interval": "1m",
            "input_series": [
                {"series": f'push_time_seconds{{{LABEL},run="night"}}', "values": NIGHTLY_PUSHES},
                {"series": f'genre_pipeline_label_last_success_timestamp_seconds{{{LABEL},run="night"}}',
                 "values": NIGHTLY_PUSHES},
                {"series": f'genre_pipeline_label_rows{{{LABEL},run="night",status="ok"}}', "values": "99x4320"},
                {"series": f'genre_pipeline_label_rows{{{LABEL},run="night",status="missing_poster"}}',
                 "values": "1x4320"},
            ],
            "alert_rule_test": [
                {"eval_time": "72h", "alertname": name, "exp_alerts": []}
                for name in ("GenrePipelineLabelNoPush", "GenrePipelineLabelStale", "GenrePipelineBadPosterShareHigh")
            ],
        },
        {   # The pushes stop after the first night: 26 h later no push, 36 h later stale.
            "interval": "1m",
            "input_series": [
                {"series": f'push_time_seconds{{{LABEL},run="night"}}', "values": "0x2880"},
                {"series": f'genre_pipeline_label_last_success_timestamp_seconds{{{LABEL},run="night"}}',
                 "values": "0x2880"},
            ],
            "alert_rule_test": [
                {"eval_time": "20h", "alertname": "GenrePipelineLabelNoPush", "exp_alerts": []},
                {"eval_time": "27h", "alertname": "GenrePipelineLabelNoPush", "exp_alerts": [NO_PUSH_ALERT]},
                {"eval_time": "30h", "alertname": "GenrePipelineLabelStale", "exp_alerts": []},
                {"eval_time": "37h", "alertname": "GenrePipelineLabelStale", "exp_alerts": [{
                    "exp_labels": {"severity": "warning"},
                    "exp_annotations": {
                        "summary": "No successful genre labelling for 36 hours",
                        "description": "The last successful label run was 1d 13h 0m 0s ago. Look at the nightly "
                        "RayJobs (kubectl -n genre-pipeline get rayjobs -l app.kubernetes.io/component=label) "
                        "and their logs."}}]},
            ],
        },
        {   # A night with 20% bad posters alerts while it is recent.
            "interval": "1m",
            "input_series": [
                {"series": f'genre_pipeline_label_last_success_timestamp_seconds{{{LABEL},run="bad"}}',
                 "values": "0x180"},
                {"series": f'genre_pipeline_label_rows{{{LABEL},run="bad",status="ok"}}', "values": "80x180"},
                {"series": f'genre_pipeline_label_rows{{{LABEL},run="bad",status="fetch_failed"}}',
                 "values": "20x180"},
            ],
            "alert_rule_test": [
                {"eval_time": "2h", "alertname": "GenrePipelineBadPosterShareHigh",
                 "exp_alerts": [{"exp_labels": {"severity": "warning", "run": "bad"}, "exp_annotations": {
                     "summary": "bad: 20% of the movies have no usable poster",
                     "description": "genre_pipeline_label_rows by status shows which kind (missing, unreadable, "
                     "fetch_failed, refused)."}}]},
            ],
        },
    ],
}


def test_prometheus_rules_fire_on_a_night_without_push_and_stay_quiet_when_healthy(tmp_path):
    _rule_file(tmp_path)
    tests = tmp_path / "rules_test.yaml"
    tests.write_text(yaml.safe_dump(RULE_TESTS, sort_keys=False))
    result = subprocess.run([_promtool(), "test", "rules", str(tests)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# ================================================================ security scan


def _checkov() -> str:
    checkov = os.environ.get("CHECKOV") or shutil.which("checkov")
    if not checkov:
        _missing("checkov is not installed: pip install checkov (in a venv of its own), "
                 "then put it on PATH or set CHECKOV=/path/to/checkov")
    return checkov


def test_checkov_passes_on_the_manifests_and_the_rendered_overlays():
    """Raw files (kubernetes) and every kustomization as kustomize renders it (kustomize). Offline:
    --skip-download keeps checkov from fetching guidelines or external checks."""
    if _kustomize_command() is None:
        _missing("checkov's kustomize framework needs `kustomize` or `kubectl` on PATH")
    result = subprocess.run(
        [_checkov(), "--directory", str(K8S), "--framework", "kubernetes", "--framework", "kustomize",
         "--skip-download", "--compact", "--quiet"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, f"checkov found problems:\n{result.stdout}\n{result.stderr}"
    assert "Passed checks" in result.stdout
