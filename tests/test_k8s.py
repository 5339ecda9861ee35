"""The Kubernetes manifests under k8s/, checked with the real tools: every kustomization and every component
rendered by kustomize, core objects against Kubernetes' own schemas, KubeRay objects against the KubeRay v1.7.0
CRD schemas (strict: a field the schema does not declare is an error), every entrypoint through the job's own
argument parser, the nightly RayJob rendered by the very script the CronJob runs, NetworkPolicies by a small
evaluator of their semantics, Kueue's quota against the jobs' requests, promtool on the alerts, and checkov.

Tools: `kustomize` or `kubectl` (its built-in kustomize), `kubernetes-validate` (pip), `checkov` (on PATH
or named by $CHECKOV), `promtool` (on PATH or named by $PROMTOOL), `busybox` (optional: the render script
also runs under it). KubeRay's CRDs come from the folder named by $KUBERAY_CRD_SCHEMAS (ray.io_rayjobs.yaml,
ray.io_raycronjobs.yaml). A missing tool skips its tests on a workstation and fails them where $CI is set.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"

ENVS = ("cpu", "gpu")
JOB_KINDS = ("nightly", "train", "evaluate", "promote")


def job_build(env: str, job: str) -> str:
    """The kustomization that applies `job` on environment `env`."""
    return f"overlays/{env}" if job == "nightly" else f"overlays/{env}/{job}"


OVERLAY_BUILDS = [job_build(env, job) for env in ENVS for job in JOB_KINDS]
NIGHTLY_BUILDS = [job_build(env, "nightly") for env in ENVS]
# The shipped variants of the gpu nightly, each with one optional component; and the namespace-less ones.
VARIANT_BUILDS = ["optional/raycronjob", "optional/kueue", "optional/network-policies", "optional/workload-identity"]
STANDALONE_BUILDS = ["optional/kueue-queues", "optional/monitoring"]
BUILDS = OVERLAY_BUILDS + VARIANT_BUILDS + STANDALONE_BUILDS
# Builds whose nightly scheduler is the CronJob (its RayJob is rendered from the template).
CRONJOB_BUILDS = NIGHTLY_BUILDS + ["optional/kueue", "optional/network-policies", "optional/workload-identity"]
# Builds that hold the namespace's shared objects (one per environment variant), and the gpu environment's.
NAMESPACE_BUILDS = NIGHTLY_BUILDS + VARIANT_BUILDS
ENV_OF = {build: ("cpu" if build.startswith("overlays/cpu") else "gpu") for build in OVERLAY_BUILDS + VARIANT_BUILDS}

NAMESPACE = "genre-pipeline"
JOB_IMAGE_NAME = "genre-pipeline"
# Core objects are checked against this Kubernetes release's schemas (CronJob.timeZone is GA since 1.27).
KUBERNETES_VERSION = "1.33"
CORE_KINDS = {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob", "Job", "NetworkPolicy"}
KUEUE_KINDS = {"ResourceFlavor", "ClusterQueue", "LocalQueue", "WorkloadPriorityClass"}
CLUSTER_SCOPED = {"Namespace", "ResourceFlavor", "ClusterQueue", "WorkloadPriorityClass"}
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
SCHEMAS_ENV = "KUBERAY_CRD_SCHEMAS"
RUN_DATE = "2026-11-28"
LOCAL_CONFIG = "config.kubernetes.io/local-config"
TEMPLATE_HEADS = {"default": "label-rayjob.yaml", "kueue": "label-rayjob-kueue.yaml"}
CLUSTER_TEMPLATE = "label-rayjob-cluster.yaml"


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


def _kustomize(path: Path) -> str:
    command = _kustomize_command()
    if command is None:
        _missing("neither `kustomize` nor `kubectl` is on PATH: install either (Debian: kubectl/kubernetes-client)")
    result = subprocess.run([*command, str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} {path} failed:\n{result.stderr}"
    return result.stdout


@functools.cache
def _build_text(build: str) -> str:
    return _kustomize(K8S / build)


def _docs(text: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


def render(build: str) -> list[dict]:
    """The objects `kubectl apply -k k8s/<build>` would send (a fresh copy each call)."""
    return _docs(_build_text(build))


@functools.cache
def _variant_text(components: tuple[str, ...]) -> str:
    folder = Path(tempfile.mkdtemp(prefix="k8s-variant-"))
    rel = os.path.relpath(K8S, folder)  # kustomize takes relative paths only
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": NAMESPACE,
        "labels": [{"pairs": {"app.kubernetes.io/part-of": "genre-pipeline"}, "includeSelectors": False}],
        "resources": [f"{rel}/base"], "components": [f"{rel}/{c}" for c in components]}))
    try:
        return _kustomize(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def render_variant(env: str, job: str, *extra: str, before_settings: tuple[str, ...] = ()) -> list[dict]:
    """`job` on `env` with extra components (k8s/components/<name>), as a kustomization of one's own lists them:
    the env first, then `before_settings`, the settings, the job and `extra`."""
    job_component = {"nightly": "nightly", "train": "train", "evaluate": "evaluate", "promote": "promote",
                     "raycronjob": "raycronjob"}[job]
    components = (f"overlays/{env}/env", *[f"components/{c}" for c in before_settings], "components/settings",
                  f"components/{job_component}", *[f"components/{c}" for c in extra])
    return _docs(_variant_text(components))


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[d['metadata']['name'] for d in found]}"
    return found[0]


def generated(docs: list[dict], name: str) -> dict:
    """A configMapGenerator's ConfigMap, by its name before kustomize appended the content hash."""
    return one([d for d in docs if re.fullmatch(rf"{name}-[a-z0-9]{{10}}", d["metadata"]["name"])], "ConfigMap")


def settings(docs: list[dict]) -> dict[str, str]:
    return generated(docs, "genre-pipeline-settings")["data"]


@functools.cache
def env_settings(env: str) -> dict[str, str]:
    return settings(render(job_build(env, "nightly")))


def build_settings(build: str) -> dict[str, str]:
    """The settings a build was rendered with: its own ConfigMap, or (a job's build, which leaves the shared
    objects to the nightly's) its environment's."""
    docs = render(build)
    if any(re.fullmatch(r"genre-pipeline-settings-[a-z0-9]{10}", d["metadata"]["name"]) for d in docs):
        return settings(docs)
    return env_settings(ENV_OF[build])


def render_label_rayjob(docs: list[dict], tmp_path: Path, run_date: str | None = RUN_DATE,
                        shell: tuple[str, ...] = ("sh",), path: str | None = None, drop: str | None = None,
                        head: str | None = None) -> subprocess.CompletedProcess:
    """Run the CronJob's init container by hand: its script and templates from the rendered ConfigMap, its
    command's file arguments (or the given head with the cluster), its environment from the rendered settings
    ConfigMap (as envFrom gives it), output to tmp_path/rayjob.yaml."""
    template = generated(docs, "genre-label-rayjob-template")["data"]
    for key, text in template.items():
        (tmp_path / key).write_text(text)
    (render_step,) = one(docs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["initContainers"]
    shell_name, script, output, *inputs = render_step["command"]
    assert (shell_name, script, output) == ("/bin/sh", "/template/render.sh", "/rendered/rayjob.yaml")
    files = [Path(p).name for p in inputs] if head is None else [head, CLUSTER_TEMPLATE]
    env = {"PATH": path or os.environ["PATH"], **settings(docs)}
    if run_date is not None:
        env["RUN_DATE"] = run_date
    if drop:
        env.pop(drop)
    return subprocess.run([*shell, str(tmp_path / "render.sh"), str(tmp_path / "rayjob.yaml"),
                           *[str(tmp_path / f) for f in files]], env=env, capture_output=True, text=True, timeout=30)


def rendered_label_rayjob(docs: list[dict], tmp_path: Path, **kwargs) -> dict:
    result = render_label_rayjob(docs, tmp_path, **kwargs)
    assert result.returncode == 0, f"render.sh failed:\n{result.stderr}"
    text = (tmp_path / "rayjob.yaml").read_text()
    assert "${" not in text, "placeholders left in the rendered RayJob"
    return yaml.safe_load(text)


def job_specs(docs: list[dict], tmp_path: Path) -> dict[str, dict]:
    """Every RayJob spec a build applies or creates: its RayJobs, the RayCronJob's jobTemplate, and the RayJob
    its CronJob renders (with the head its command names)."""
    specs = {f"RayJob {d['metadata']['name']}": d["spec"] for d in docs if d["kind"] == "RayJob"}
    specs.update({f"RayCronJob {d['metadata']['name']}": d["spec"]["jobTemplate"]
                  for d in docs if d["kind"] == "RayCronJob"})
    if any(d["kind"] == "CronJob" for d in docs):
        specs["nightly RayJob"] = rendered_label_rayjob(docs, tmp_path)["spec"]
    return specs


def pod_templates(docs: list[dict], tmp_path: Path) -> dict[str, dict]:
    """Every pod template of a build: the Ray jobs' submitters, heads and workers, the CronJob's and Jobs' pods."""
    pods = {}
    for job, spec in job_specs(docs, tmp_path).items():
        cluster = spec["rayClusterSpec"]
        pods[f"{job} submitter"] = spec["submitterPodTemplate"]
        pods[f"{job} head"] = cluster["headGroupSpec"]["template"]
        pods.update({f"{job} {g['groupName']}": g["template"] for g in cluster["workerGroupSpecs"]})
    for doc in docs:
        if doc["kind"] == "CronJob":
            pods[f"CronJob {doc['metadata']['name']}"] = doc["spec"]["jobTemplate"]["spec"]["template"]
        if doc["kind"] == "Job":
            pods[f"Job {doc['metadata']['name']}"] = doc["spec"]["template"]
    return pods


def ray_pods(docs: list[dict], tmp_path: Path) -> dict[str, dict]:
    return {name: pod for name, pod in pod_templates(docs, tmp_path).items()
            if name.endswith((" submitter", " head", " workers"))}


def quantity(value: str | int) -> float:
    """A Kubernetes quantity in its base unit (bytes, cores)."""
    text = str(value)
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


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


def parse_command(argv: list[str], script: str, capsys):
    """A command line through the job's own argparse parser; an unknown flag fails the test."""
    assert argv[:2] == ["python", script], f"should start with `python {script}`: {argv}"
    try:
        return _job_parser(script).parse_args(argv[2:])
    except SystemExit:
        pytest.fail(f"{script} rejects the arguments: {capsys.readouterr().err.strip()}\ncommand: {argv}")


SHELL_OPERATORS = {"&&", "||", ";", "&", "|", ";;", "(", ")", "<", ">", ">>", "<<"}


def head_command(entrypoint: str) -> str:
    """What the Ray head runs for a RayJob's entrypoint. KubeRay 1.7 pastes it verbatim into the submitter's shell
    command (`... ray job submit ... --no-wait -- ENTRYPOINT ; fi ; ray job logs ...`, common/job.go), that shell
    splits it into words, and `ray job submit` joins the words back with shlex.join; the head then runs the result
    in a shell. A bare shell operator in the entrypoint would end `ray job submit`'s words and run the rest in
    the submitter pod: refused here."""
    lexer = shlex.shlex(entrypoint, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words = list(lexer)
    operators = [word for word in words if word in SHELL_OPERATORS]
    assert not operators, f"{operators} would be the submitter's shell's, not the job's: quote them\n{entrypoint}"
    return shlex.join(words)


def parse_entrypoint(entrypoint: str, script: str, capsys):
    return parse_command(shlex.split(head_command(entrypoint)), script, capsys)


def test_the_submitter_shell_emulation_keeps_quoted_operators_and_catches_bare_ones():
    assert shlex.split(head_command("sh -c 'python a.py --x 1 && python b.py'")) == [
        "sh", "-c", "python a.py --x 1 && python b.py"]
    plain = "python a.py --catalog s3://b/c.parquet --flag"
    assert head_command(plain) == plain
    with pytest.raises(AssertionError, match=r"\['&&'\] would be the submitter's shell's"):
        head_command("python a.py && python b.py")


# ================================================================ the files


def _yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_every_yaml_file_under_k8s_parses():
    files = _yaml_files()
    assert len(files) >= 25, files
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path.relative_to(REPO)} holds no YAML document"
        for doc in docs:
            assert isinstance(doc, dict) and {"apiVersion", "kind"} <= doc.keys(), \
                f"{path.relative_to(REPO)}: a document without apiVersion/kind"


def test_no_secret_is_shipped():
    """Credentials come from a Secret created by hand (or workload identity); no manifest carries one."""
    for path in _yaml_files():
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path}: an AWS access key id"
        for doc in yaml.safe_load_all(text):
            assert doc is None or doc.get("kind") != "Secret", f"{path.relative_to(REPO)} ships a Secret"


def _kustomizations() -> dict[str, dict]:
    return {str(p.parent.relative_to(K8S)): yaml.safe_load(p.read_text()) for p in K8S.rglob("kustomization.yaml")}


def _components_of(build: str, found: set[str] | None = None) -> set[str]:
    """Every component a kustomization uses, through its resources' kustomizations too."""
    found = set() if found is None else found
    kustomization = yaml.safe_load((K8S / build / "kustomization.yaml").read_text())
    for entry in kustomization.get("components", []):
        path = os.path.normpath(os.path.join(build, entry))
        if path not in found:
            found.add(path)
            _components_of(path, found)
    for entry in kustomization.get("resources", []):
        path = os.path.normpath(os.path.join(build, entry))
        if (K8S / path / "kustomization.yaml").is_file():
            _components_of(path, found)
    return found


# Components no shipped kustomization lists: rendered by their tests on every environment (render_variant or a copy).
RENDERED_AS_VARIANTS = {"components/workload-identity-gcp"}


def test_every_kustomization_and_component_is_rendered_by_these_tests():
    """A component or kustomization no test builds is one nobody checks: each is a build here, or a component
    some build here uses (the job+component combinations not shipped are rendered by `render_variant`)."""
    kustomizations = _kustomizations()
    builds = {k for k, v in kustomizations.items() if v.get("kind", "Kustomization") == "Kustomization"}
    components = {k for k, v in kustomizations.items() if v.get("kind") == "Component"}
    assert builds - {"base"} == set(BUILDS), builds ^ set(BUILDS)
    used = set().union(*(_components_of(build) for build in BUILDS))
    assert components == used | RENDERED_AS_VARIANTS, f"components no build uses: {components - used}"
    assert {"components/kueue", "components/network-policies", "components/workload-identity-aws",
            "components/raycronjob", "components/train", "components/evaluate", "components/promote"} <= used


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
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], f"{key} is cluster-scoped"
        else:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{key} outside {NAMESPACE}"
        assert doc["metadata"]["labels"].get("app.kubernetes.io/part-of") == "genre-pipeline", key
        # the one Ray cluster spec (base/ray-cluster.yaml) and every job's copy of the shared objects are
        # build-time inputs only
        assert LOCAL_CONFIG not in doc["metadata"].get("annotations", {}), key
        assert key != ("RayJob", "genre-ray-cluster"), "the cluster template must never be applied"


@pytest.mark.parametrize("build", BUILDS)
def test_core_objects_match_the_kubernetes_schemas_strictly(build):
    kv = _kubernetes_validate()
    docs = render(build)
    for doc in [d for d in docs if d["kind"] in CORE_KINDS]:
        try:
            kv.validate(doc, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as error:
            pytest.fail(f"k8s/{build}: {doc['kind']} {doc['metadata']['name']}: {error}")
    # Kueue's kinds are checked for what Kueue needs of them (the kueue tests below), the Prometheus Operator's
    # by promtool.
    unchecked = {d["kind"] for d in docs} - CORE_KINDS - set(CRD_FILES) - KUEUE_KINDS - {"PodMonitor", "PrometheusRule"}
    assert not unchecked, f"kinds no test validates: {unchecked}"


# ================================================================ one kustomization per job

EXPECTED_OBJECTS = {
    "train": [("RayJob", "genre-train")],
    "evaluate": [("RayJob", "genre-evaluate")],
    "promote": [("Job", "genre-promote")],
}


@pytest.mark.parametrize("env", ENVS)
def test_each_job_is_a_kustomization_of_its_own(env):
    """Applying the nightly never starts a training run (nor an evaluation or a promotion), and deleting a job's
    kustomization deletes only that job: never the namespace, the service account or the settings."""
    nightly = {(d["kind"], d["metadata"]["name"]) for d in render(job_build(env, "nightly"))}
    assert not {kind for kind, _ in nightly} & {"RayJob", "Job"}, nightly
    assert {("Namespace", NAMESPACE), ("ServiceAccount", "genre-pipeline-ray"), ("CronJob", "genre-label-nightly")
            } <= nightly
    for job, expected in EXPECTED_OBJECTS.items():
        objects = [(d["kind"], d["metadata"]["name"]) for d in render(job_build(env, job))]
        assert objects == expected, f"k8s/{job_build(env, job)} applies {objects}"


# ================================================================ KubeRay objects


@pytest.mark.parametrize("build", OVERLAY_BUILDS + VARIANT_BUILDS)
def test_every_rayjob_matches_the_crd_strictly(build, tmp_path):
    docs = render(build)
    objects = [d for d in docs if d["kind"] in CRD_FILES]
    if any(d["kind"] == "CronJob" for d in docs):
        objects.append(rendered_label_rayjob(docs, tmp_path))
    if build.endswith("promote"):
        assert not objects
    else:
        assert objects
    for obj in objects:
        assert_valid_crd(obj)


@pytest.mark.parametrize("head", TEMPLATE_HEADS)
def test_both_heads_of_the_label_template_render_to_valid_rayjobs(head, tmp_path):
    job = rendered_label_rayjob(render("overlays/gpu"), tmp_path, head=TEMPLATE_HEADS[head])
    assert_valid_crd(job)
    assert job["metadata"]["name"] == f"genre-label-{RUN_DATE}"


def test_strict_schema_rejects_a_misspelt_key():
    """The CRD leaves RayJob.spec open to unknown fields; the strict copy does not, so a typo is caught."""
    train = one(render("overlays/gpu/train"), "RayJob", "genre-train")
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


@pytest.mark.parametrize("build", OVERLAY_BUILDS + VARIANT_BUILDS)
def test_ray_clusters_authenticate_and_take_s3_credentials_from_the_secret(build, tmp_path):
    docs = render(build)
    optional = build_settings(build)["S3_SECRET_OPTIONAL"] == "true"
    for name, spec in job_specs(docs, tmp_path).items():
        assert spec["backoffLimit"] >= 1, name
        cluster = spec["rayClusterSpec"]
        assert cluster["rayVersion"] == "2.60.0"
        assert cluster["authOptions"] == {"mode": "token"}, "Ray token authentication stays on"
        for pod in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
            (container,) = pod["spec"]["containers"]
            assert {"secretRef": {"name": "genre-pipeline-s3", "optional": optional}} in container["envFrom"], name
            assert {"name": "metrics", "containerPort": 8080} in container["ports"]
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
            assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            assert pod["spec"]["automountServiceAccountToken"] is False


@pytest.mark.parametrize("env", ENVS)
def test_every_job_runs_on_the_one_ray_cluster(env, tmp_path):
    """Training, evaluation, the nightly RayJob (from its text template, with either head) and the RayCronJob
    variant run on the same cluster and submitter, the one base/ray-cluster.yaml defines."""
    train = one(render(job_build(env, "train")), "RayJob", "genre-train")["spec"]
    specs = {"evaluate": one(render(job_build(env, "evaluate")), "RayJob", "genre-evaluate")["spec"],
             "raycronjob": one(render_variant(env, "raycronjob"), "RayCronJob")["spec"]["jobTemplate"]}
    for head, file in TEMPLATE_HEADS.items():
        (tmp_path / head).mkdir()
        specs[f"nightly ({head})"] = rendered_label_rayjob(render(job_build(env, "nightly")), tmp_path / head,
                                                           head=file)["spec"]
    for name, spec in specs.items():
        assert spec["rayClusterSpec"] == train["rayClusterSpec"], name
        assert spec["submitterPodTemplate"] == train["submitterPodTemplate"], name


# ================================================================ cleanup and deadlines

DELETION_ORDER = ["DeleteWorkers", "DeleteCluster", "DeleteSelf"]


def deletion_rule_errors(spec: dict, suspended: bool = False) -> list[str]:
    """KubeRay 1.7's own checks of a RayJob's cleanup (ray-operator validation.go, which the CRD's schema cannot
    express): deletionRules not with shutdownAfterJobFinishes (nor its TTL), nor with onSuccess/onFailure; each
    condition one of jobStatus / jobDeploymentStatus; one rule per (condition, policy); TTLs non-decreasing along
    DeleteWorkers -> DeleteCluster -> DeleteSelf; no DeleteWorkers with the autoscaler; a TTL only with
    shutdownAfterJobFinishes; and a suspended RayJob (how Kueue creates them) only with shutdownAfterJobFinishes."""
    strategy = spec.get("deletionStrategy") or {}
    rules = strategy.get("deletionRules") or []
    errors = []
    shutdown = spec.get("shutdownAfterJobFinishes", False)
    if spec.get("ttlSecondsAfterFinished") and not shutdown:
        errors.append("ttlSecondsAfterFinished only works with shutdownAfterJobFinishes")
    if suspended and not shutdown:
        errors.append("a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended")
    if not rules:
        return errors if shutdown else errors + ["no deletionStrategy.deletionRules and no shutdownAfterJobFinishes"]
    if shutdown:
        errors.append("shutdownAfterJobFinishes and deletionRules are mutually exclusive")
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


@pytest.mark.parametrize("env", ENVS)
def test_finished_rayjobs_are_cleaned_up_and_failed_ones_kept_for_debugging(env, tmp_path):
    specs = {"train": one(render(job_build(env, "train")), "RayJob")["spec"],
             "evaluate": one(render(job_build(env, "evaluate")), "RayJob")["spec"],
             "nightly": rendered_label_rayjob(render(job_build(env, "nightly")), tmp_path)["spec"],
             "raycronjob": one(render_variant(env, "raycronjob"), "RayCronJob")["spec"]["jobTemplate"]}
    for name, spec in specs.items():
        assert deletion_rule_errors(spec) == [], name
        rules = _rules(spec)
        # Success: the cluster (and its GPUs) go within minutes.
        assert 0 < rules[("jobStatus", "SUCCEEDED")]["DeleteCluster"] <= 3600, name
        # Failure, by the job or the deployment (a deadline): GPU workers freed within minutes, the head kept a
        # while for debugging, the RayJob itself never deleted automatically.
        for condition in [("jobStatus", "FAILED"), ("jobDeploymentStatus", "Failed")]:
            assert rules[condition]["DeleteWorkers"] <= 600, (name, condition)
            assert rules[condition]["DeleteCluster"] >= 3600, (name, condition)
            assert "DeleteSelf" not in rules[condition], (name, condition)
    # Training's RayJob keeps its logs until the next run replaces it; an evaluation's and a good night's go
    # (RayCronJob has no history limit, so DeleteSelf is what prunes its RayJobs).
    assert "DeleteSelf" not in _rules(specs["train"])[("jobStatus", "SUCCEEDED")]
    assert _rules(specs["evaluate"])[("jobStatus", "SUCCEEDED")]["DeleteSelf"] >= 3600
    for nightly in ("nightly", "raycronjob"):
        assert _rules(specs[nightly])[("jobStatus", "SUCCEEDED")]["DeleteSelf"] >= 86400


def test_deletion_rule_check_rejects_what_kuberay_rejects():
    spec = one(render("overlays/gpu/train"), "RayJob", "genre-train")["spec"]
    assert deletion_rule_errors(spec) == []
    legacy = copy.deepcopy(spec) | {"shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 300}
    assert deletion_rule_errors(legacy) == ["shutdownAfterJobFinishes and deletionRules are mutually exclusive"]
    disordered = copy.deepcopy(spec)
    for rule in disordered["deletionStrategy"]["deletionRules"]:
        if rule["policy"] == "DeleteWorkers":
            rule["condition"]["ttlSeconds"] = 10**6
    assert any("must not decrease" in e for e in deletion_rule_errors(disordered))
    # Kueue creates RayJobs suspended: KubeRay refuses that without shutdownAfterJobFinishes, which it refuses
    # beside deletionRules. So a Kueue-managed RayJob cannot keep these rules (see the kueue tests).
    assert deletion_rule_errors(spec, suspended=True) == [
        "a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"]
    # The CRD schema (strict) also checks the rules' shape: an unknown policy fails there.
    train = one(render("overlays/gpu/train"), "RayJob", "genre-train")
    train["spec"]["deletionStrategy"]["deletionRules"][0]["policy"] = "DeleteEverything"
    assert any("deletionRules" in e for e in crd_errors(train))


@pytest.mark.parametrize("build", OVERLAY_BUILDS + VARIANT_BUILDS)
def test_every_rayjob_gives_up_on_a_cluster_that_never_comes_up(build, tmp_path):
    """preRunningDeadlineSeconds (KubeRay 1.7's CRD has it): a RayJob whose pods cannot all be placed (3 of 4
    GPUs, a failed pull) fails after 30 minutes and frees what it got, instead of holding it until
    activeDeadlineSeconds."""
    specs = job_specs(render(build), tmp_path)
    if build.endswith("promote"):
        assert not specs
    for name, spec in specs.items():
        assert 600 <= spec["preRunningDeadlineSeconds"] <= 3600, name
        assert spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"], name
    if os.environ.get(SCHEMAS_ENV):  # and the operator knows the field (the strict CRD checks validate the rest)
        field = _crd_schema("RayJob", strict=False)["properties"]["spec"]["properties"]["preRunningDeadlineSeconds"]
        assert field["type"] == "integer" and field["minimum"] == 1


# ================================================================ on an autoscaled cluster: disk, arch, disruption

# What a node's disk holds besides the pods' requests (k8s/README.md, "Node disk"): the job image while it is
# pulled (its unpacked layers plus the compressed ones; estimates from the wheels, section 1), the OS and the
# kubelet's own files; and the share the kubelet keeps free (eviction at nodefs.available < 10%).
IMAGE_ON_DISK_GIB = {"gpu": 10, "cpu": 3}
SYSTEM_GIB = 5
EVICTION_FREE_SHARE = 0.10


def _disk_volumes(pod: dict) -> dict[str, float]:
    """The pod's emptyDirs on the node's disk (not memory-backed): name -> sizeLimit in bytes."""
    return {v["name"]: quantity(v["emptyDir"]["sizeLimit"]) for v in pod["spec"].get("volumes", [])
            if "emptyDir" in v and v["emptyDir"].get("medium") != "Memory"}


def _ephemeral(container: dict, kind: str = "limits") -> float:
    return quantity(container["resources"][kind]["ephemeral-storage"])


@pytest.mark.parametrize("build", OVERLAY_BUILDS + VARIANT_BUILDS)
def test_every_pod_requests_the_node_disk_it_may_use(build, tmp_path):
    """The scheduler (and the autoscaler sizing a node) counts only requested ephemeral-storage; the kubelet evicts
    a pod whose containers' writes and emptyDirs pass the sum of its limits. So every container requests disk,
    every disk-backed emptyDir has a sizeLimit, and the pod's limits hold its emptyDirs with room to spare."""
    pods = pod_templates(render(build), tmp_path)
    assert pods
    for name, pod in pods.items():
        containers = pod["spec"]["containers"] + pod["spec"].get("initContainers", [])
        for container in containers:
            assert _ephemeral(container, "requests") > 0 and _ephemeral(container) > 0, (name, container["name"])
        volumes = _disk_volumes(pod)
        assert all(size > 0 for size in volumes.values()), (name, volumes)
        limit = sum(_ephemeral(c) for c in pod["spec"]["containers"])  # init containers run before, not beside
        assert limit >= sum(volumes.values()) + 16 * 2**20, f"{name}: emptyDirs {volumes} vs limits {limit}"
        if name.endswith((" head", " workers", " submitter")):
            (ray,) = pod["spec"]["containers"]
            assert _ephemeral(ray, "requests") == _ephemeral(ray), f"{name}: requests != limits"
            if "ray-tmp" in volumes:  # Ray's own writes beyond /tmp/ray (caches, logs) need room too
                assert _ephemeral(ray) - volumes["ray-tmp"] >= 2 * 2**30, name


@pytest.mark.parametrize("env", ENVS)
def test_the_workers_disk_is_the_settings(env):
    values = env_settings(env)
    (group,) = one(render(job_build(env, "train")), "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["requests"]["ephemeral-storage"] == values["WORKER_EPHEMERAL_STORAGE"]
    assert worker["resources"]["limits"]["ephemeral-storage"] == values["WORKER_EPHEMERAL_STORAGE"]
    assert _disk_volumes(group["template"])["ray-tmp"] == quantity(values["WORKER_RAY_TMP"])


def _node_disk_table() -> dict[str, dict[str, str]]:
    """k8s/README.md's "Node disk" table: node -> its columns."""
    text = (K8S / "README.md").read_text()
    section = text.split("### Node disk", 1)[1].split("\n#", 1)[0]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("|")]
    header, _, *body = rows
    return {row[0]: dict(zip(header, row, strict=True)) for row in body}


NODE_PODS = {  # a README row -> (environment, the Ray pods that land on such a node)
    "gpu: GPU node": ("gpu", ["workers"]),
    "gpu: CPU node": ("gpu", ["head", "submitter"]),
    "cpu: node": ("cpu", ["head", "workers", "submitter"]),
}


def test_the_readme_sizes_each_nodes_disk_for_its_pods_and_the_image(tmp_path):
    """The root volume the README asks for holds what lands on the node: the pods' requested disk (as rendered),
    the image being pulled, the system, and the kubelet's eviction margin."""
    table = _node_disk_table()
    assert set(table) == set(NODE_PODS), table.keys()
    for row, (env, roles) in NODE_PODS.items():
        pods = ray_pods(render(job_build(env, "nightly")), tmp_path)
        requested = sum(_ephemeral(c) for role in roles for name, pod in pods.items()
                        if name == f"nightly RayJob {role}" for c in pod["spec"]["containers"]) / 2**30
        assert quantity(table[row]["disk the pods request"]) / 2**30 == requested, (row, requested)
        needed = (requested + IMAGE_ON_DISK_GIB[env] + SYSTEM_GIB) / (1 - EVICTION_FREE_SHARE)
        at_least = re.match(r"(\d+) GiB", table[row]["root volume, at least"]).group(1)
        assert int(at_least) >= needed, f"{row}: {at_least} GiB < {needed:.0f} GiB"
        assert int(at_least) > 20, "the 20 GiB root volumes autoscalers default to hold none of these nodes"


@pytest.mark.parametrize("build", OVERLAY_BUILDS + VARIANT_BUILDS)
def test_every_pod_selects_the_images_architecture(build, tmp_path):
    """The job image is built for amd64 only: on a cluster with arm64 pools (Graviton, T2A), a pod without the
    selector may land where its image cannot run. Every pod of the pipeline states it."""
    pods = pod_templates(render(build), tmp_path)
    assert pods
    for name, pod in pods.items():
        assert pod["spec"].get("nodeSelector", {}).get("kubernetes.io/arch") == "amd64", name


@pytest.mark.parametrize("build", OVERLAY_BUILDS + VARIANT_BUILDS)
def test_autoscalers_leave_nodes_with_running_jobs_alone(build, tmp_path):
    """Karpenter's consolidation and Cluster Autoscaler's scale-down evict pods to remove nodes; evicting the head
    kills the job. Every Ray pod (and the promote Job) opts out while it runs, and the head prefers
    non-spot capacity."""
    pods = {name: pod for name, pod in pod_templates(render(build), tmp_path).items()
            if not name.startswith("CronJob")}  # the launcher runs for seconds and a retry is free
    assert pods
    for name, pod in pods.items():
        annotations = pod["metadata"].get("annotations", {})
        assert annotations.get("karpenter.sh/do-not-disrupt") == "true", name
        assert annotations.get("cluster-autoscaler.kubernetes.io/safe-to-evict") == "false", name
        if name.endswith(" head"):
            (preferred,) = pod["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            avoided = {e["key"]: e["values"] for e in preferred["preference"]["matchExpressions"]
                       if e["operator"] == "NotIn"}
            assert avoided == {"karpenter.sh/capacity-type": ["spot"], "eks.amazonaws.com/capacityType": ["SPOT"],
                               "cloud.google.com/gke-spot": ["true"]}, name
            assert "requiredDuringSchedulingIgnoredDuringExecution" not in pod["spec"]["affinity"]["nodeAffinity"]


# Node labels that exist only once a node has booted and its daemons ran (NVIDIA GPU feature discovery,
# Node Feature Discovery). A node autoscaler scaling a GPU pool from zero cannot know them, so a required
# selector on one keeps the pods Pending forever.
POST_BOOT_LABEL_PREFIXES = ("nvidia.com/", "feature.node.kubernetes.io/", "amd.com/")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _required_node_label_keys(pod: dict) -> set[str]:
    keys = set(pod.get("nodeSelector", {}))
    required = (pod.get("affinity", {}).get("nodeAffinity", {})
                .get("requiredDuringSchedulingIgnoredDuringExecution", {}))
    for term in required.get("nodeSelectorTerms", []):
        keys |= {e["key"] for e in term.get("matchExpressions", []) + term.get("matchFields", [])}
    return keys


def scale_from_zero_problems(pod: dict) -> list[str]:
    """Why an autoscaler could not start a node for this pod spec from zero."""
    problems = [f"requires post-boot node label {key}" for key in sorted(_required_node_label_keys(pod))
                if key.startswith(POST_BOOT_LABEL_PREFIXES)]
    (container,) = pod["containers"]
    if container["resources"]["limits"].get("nvidia.com/gpu", "0") != "0" and GPU_TOLERATION not in pod.get(
            "tolerations", []):
        problems.append("requests a GPU without tolerating the GPU nodes' nvidia.com/gpu:NoSchedule taint")
    return problems


@pytest.mark.parametrize("build", OVERLAY_BUILDS + VARIANT_BUILDS)
def test_gpu_workers_can_scale_from_zero(build, tmp_path):
    """No worker requires a label that only a booted GPU node has; every GPU worker tolerates the GPU taint
    (what an autoscaler provisions for). The gpu environment's builds must have GPU workers to check, the cpu
    environment's none."""
    workers = {name: pod["spec"] for name, pod in ray_pods(render(build), tmp_path).items() if name.endswith("workers")}
    gpu_workers = [name for name, pod in workers.items()
                   if pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] != "0"]
    if build.endswith("promote"):
        assert not workers
    elif ENV_OF[build] == "gpu":
        assert gpu_workers == list(workers), workers.keys()
    else:
        assert not gpu_workers
    for name, pod in workers.items():
        assert scale_from_zero_problems(pod) == [], f"k8s/{build}: {name}"


def test_scale_from_zero_check_catches_feature_discovery_labels_and_a_missing_toleration():
    (group,) = one(render("overlays/gpu/train"), "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    worker = copy.deepcopy(group["template"]["spec"])
    assert scale_from_zero_problems(worker) == []
    untolerated = copy.deepcopy(worker)
    untolerated["tolerations"] = []
    assert scale_from_zero_problems(untolerated) == [
        "requests a GPU without tolerating the GPU nodes' nvidia.com/gpu:NoSchedule taint"]
    post_boot = copy.deepcopy(worker)
    post_boot["nodeSelector"]["nvidia.com/gpu.present"] = "true"
    assert scale_from_zero_problems(post_boot) == ["requires post-boot node label nvidia.com/gpu.present"]
    # provisioning-time labels are fine
    worker["nodeSelector"]["cloud.google.com/gke-accelerator"] = "nvidia-l4"
    assert scale_from_zero_problems(worker) == []


def _workers(build: str) -> dict:
    (group,) = one(render(build), "RayJob", "genre-train")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return group


def test_gpu_environment_has_four_one_gpu_workers_on_gpu_nodes():
    group = _workers("overlays/gpu/train")
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["requests"]["nvidia.com/gpu"] == "1"
    assert worker["resources"]["requests"] == worker["resources"]["limits"]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    # Any Linux node: the GPU request and the toleration bring a GPU node.
    assert term["matchExpressions"] == [{"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]}]
    assert GPU_TOLERATION in pod["tolerations"]


def test_cpu_environment_is_small_and_has_no_gpus():
    group = _workers("overlays/cpu/train")
    assert 1 <= group["replicas"] <= 2
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"].get("nvidia.com/gpu", "0") == "0"
    assert int(worker["resources"]["limits"]["cpu"]) <= 2


@pytest.mark.parametrize("env", ENVS)
def test_gpu_jobs_run_with_the_flags_that_make_them_check_the_driver(env, tmp_path, capsys):
    """The driver guard (genre_pipeline/cuda_guard.py) runs in the label job when --num-gpus-per-actor > 0 and in
    training with --use-gpu: on the gpu environment every GPU job has them, so a node whose driver cannot run
    the image's CUDA fails the job at its start with exit 2 (tests/test_cuda_guard.py runs that)."""
    values = env_settings(env)
    gpus = int(values["WORKER_GPUS"])
    train = parse_entrypoint(one(render(job_build(env, "train")), "RayJob")["spec"]["entrypoint"],
                             "jobs/train_genre_model.py", capsys)
    nightly = parse_entrypoint(rendered_label_rayjob(render(job_build(env, "nightly")), tmp_path)["spec"]["entrypoint"],
                               "jobs/label_catalog.py", capsys)
    assert train.use_gpu is (gpus > 0)
    assert (nightly.num_gpus_per_actor > 0) is (gpus > 0)
    if gpus:  # the environment's file names the drivers its image needs
        text = (K8S / "overlays" / env / "env" / "kustomization.yaml").read_text()
        assert "R580+" in text and "--build-arg CUDA=cu128" in text and "R525+" in text


# ================================================================ images

DIGEST = r"@sha256:[0-9a-f]{64}"


@pytest.mark.parametrize("build", OVERLAY_BUILDS + VARIANT_BUILDS)
def test_the_job_image_is_pinned_by_digest(build, tmp_path):
    """Every container that runs the job image names it by digest (a re-pushed tag changes nothing), so
    IfNotPresent is exact; the IMAGE setting (the nightly template's) is the same reference."""
    docs = render(build)
    job_image = build_settings(build)["IMAGE"]
    assert re.fullmatch(rf"[a-z0-9.-]+(/[a-z0-9._-]+)*/{JOB_IMAGE_NAME}:[0-9A-Za-z._-]+{DIGEST}", job_image), job_image
    containers = [c for pod in pod_templates(docs, tmp_path).values()
                  for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", [])
                  if JOB_IMAGE_NAME in c["image"].rsplit("/", 1)[-1].split(":")[0]]
    assert containers or build in ("overlays/cpu", "overlays/gpu")
    for container in containers:
        assert container["image"] == job_image, container["name"]
        assert container["imagePullPolicy"] == "IfNotPresent", container["name"]


def release_pinned(image: str) -> bool:
    """A tag that names one release (x.y.z, optionally v-prefixed), not latest, a major or a minor line."""
    return bool(re.fullmatch(r"[a-z0-9.-]+(/[a-z0-9._-]+)*:v?\d+\.\d+\.\d+(" + DIGEST + ")?", image))


@pytest.mark.parametrize("build", CRONJOB_BUILDS)
def test_the_launchers_images_are_pinned_to_a_release_and_re_checked(build):
    pod = one(render(build), "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    for container in pod["containers"] + pod["initContainers"]:
        assert release_pinned(container["image"]), container["image"]
        if "@sha256:" not in container["image"]:  # a tag can move: pull it each time
            assert container["imagePullPolicy"] == "Always", container["name"]


def test_release_pinning_means_one_release():
    assert release_pinned("busybox:1.37.0") and release_pinned("registry.k8s.io/kubectl:v1.34.1")
    for floating in ("busybox", "busybox:latest", "busybox:1", "busybox:1.37", "registry.k8s.io/kubectl:v1.34"):
        assert not release_pinned(floating), floating


# ================================================================ service accounts and workload identity


def _assert_service_account(docs: list[dict], tmp_path: Path, account: str) -> None:
    pods = {name: pod for name, pod in pod_templates(docs, tmp_path).items() if not name.startswith("CronJob")}
    assert pods
    for name, pod in pods.items():
        assert pod["spec"].get("serviceAccountName") == account, f"{name}: {pod['spec'].get('serviceAccountName')}"
        assert pod["spec"]["automountServiceAccountToken"] is False, name


@pytest.mark.parametrize("build", OVERLAY_BUILDS + VARIANT_BUILDS)
def test_every_pod_runs_as_the_service_account_setting(build, tmp_path):
    docs = render(build)
    account = build_settings(build)["SERVICE_ACCOUNT"]
    assert account == "genre-pipeline-ray", "a dedicated account, not the namespace's default"
    if build in NAMESPACE_BUILDS:  # the namespace's owner applies the account
        sa = one(docs, "ServiceAccount", account)
        assert sa["automountServiceAccountToken"] is False
    _assert_service_account(docs, tmp_path, account)


def test_a_service_account_given_in_the_env_reaches_every_pod(tmp_path):
    """Another account (a platform's, mapped to a role): set SERVICE_ACCOUNT in the env (here, in a copy of k8s/)
    and every pod template of every job gets it."""
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    for env in ENVS:
        path = copy_root / "overlays" / env / "env" / "kustomization.yaml"
        text = path.read_text()
        assert text.count("- SERVICE_ACCOUNT=genre-pipeline-ray\n") == 1, path
        path.write_text(text.replace("- SERVICE_ACCOUNT=genre-pipeline-ray\n", "- SERVICE_ACCOUNT=platform-s3\n"))
    for build in OVERLAY_BUILDS:
        (tmp_path / build).mkdir(parents=True)
        _assert_service_account(_docs(_kustomize(copy_root / build)), tmp_path / build, "platform-s3")


def test_the_service_account_carries_no_cloud_identity_by_default():
    for build in NIGHTLY_BUILDS:
        sa = one(render(build), "ServiceAccount", "genre-pipeline-ray")
        assert not sa["metadata"].get("annotations"), sa["metadata"]


def _secret_modes(docs: list[dict], tmp_path: Path) -> set[bool]:
    modes = set()
    for pod in pod_templates(docs, tmp_path).values():
        for container in pod["spec"]["containers"]:
            for source in container.get("envFrom", []):
                if source.get("secretRef", {}).get("name") == "genre-pipeline-s3":
                    modes.add(source["secretRef"]["optional"])
    return modes


def test_workload_identity_on_eks_annotates_the_account_and_makes_the_secret_optional(tmp_path):
    """IRSA: the account gets the role of AWS_ROLE_ARN, and every pod that reads S3 (Ray pods of every job, the
    promote Job) starts without the static-keys Secret; without the component the Secret is required."""
    docs = render("optional/workload-identity")
    role = settings(docs)["AWS_ROLE_ARN"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", role), role
    sa = one(docs, "ServiceAccount", "genre-pipeline-ray")
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": role}
    (tmp_path / "nightly").mkdir()
    assert _secret_modes(docs, tmp_path / "nightly") == {True}
    for job in ("train", "evaluate", "promote"):
        (tmp_path / job).mkdir()
        variant = render_variant("gpu", job, before_settings=("workload-identity-aws",))
        assert _secret_modes(variant, tmp_path / job) == {True}, job
        assert not [d for d in variant if d["kind"] == "ServiceAccount"], "the account is the nightly's to apply"
    for build in OVERLAY_BUILDS:
        (tmp_path / build).mkdir(parents=True)
        assert _secret_modes(render(build), tmp_path / build) in ({False}, set()), build


@pytest.mark.parametrize("env", ENVS)
def test_workload_identity_on_gke_annotates_the_account_and_keeps_the_secret(env, tmp_path):
    """GKE: the account acts as GCP_SERVICE_ACCOUNT towards Google APIs; the jobs speak S3, so the Secret stays."""
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    path = copy_root / "overlays" / env / "env" / "kustomization.yaml"
    path.write_text(path.read_text().replace(
        "- GCP_SERVICE_ACCOUNT=\n", "- GCP_SERVICE_ACCOUNT=genre-pipeline@example-project.iam.gserviceaccount.com\n"))
    kustomization = copy_root / "overlays" / env / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace(
        "  - ../../components/nightly\n", "  - ../../components/nightly\n  - ../../components/workload-identity-gcp\n"))
    docs = _docs(_kustomize(copy_root / "overlays" / env))
    sa = one(docs, "ServiceAccount", "genre-pipeline-ray")
    assert sa["metadata"]["annotations"] == {
        "iam.gke.io/gcp-service-account": "genre-pipeline@example-project.iam.gserviceaccount.com"}
    assert _secret_modes(docs, tmp_path) == {False}


# ================================================================ Kueue: gang admission


@functools.cache
def kueue_queues() -> dict[str, dict]:
    return {d["kind"]: d for d in render("optional/kueue-queues") if d["kind"] != "WorkloadPriorityClass"}


def priority_classes() -> dict[str, int]:
    return {d["metadata"]["name"]: d["value"] for d in render("optional/kueue-queues")
            if d["kind"] == "WorkloadPriorityClass"}


def kueue_jobs(env: str, tmp_path: Path) -> dict[str, dict]:
    """Every RayJob of the environment as Kueue would receive it: the nightly (its CronJob renders the Kueue head
    once components/kueue is listed), training and evaluation with components/kueue."""
    nightly_docs = render("optional/kueue") if env == "gpu" else render_variant(env, "nightly", "kueue")
    jobs = {"nightly": rendered_label_rayjob(nightly_docs, tmp_path)}
    for job in ("train", "evaluate"):
        jobs[job] = one(render_variant(env, job, "kueue"), "RayJob")
    return jobs


def pod_requests(spec: dict) -> dict[str, float]:
    """What Kueue counts for a RayJob: the requests of its head, every worker replica and the submitter."""
    cluster = spec["rayClusterSpec"]
    pods = [(cluster["headGroupSpec"]["template"], 1), (spec["submitterPodTemplate"], 1)]
    pods += [(g["template"], g["replicas"]) for g in cluster["workerGroupSpecs"]]
    total: dict[str, float] = {}
    for pod, count in pods:
        for container in pod["spec"]["containers"]:
            for resource, value in container["resources"]["requests"].items():
                total[resource] = total.get(resource, 0.0) + count * quantity(value)
    return {resource: value for resource, value in total.items() if value}


@pytest.mark.parametrize("env", ENVS)
def test_with_kueue_every_rayjob_queues_and_cleans_up_as_kueue_and_kuberay_require(env, tmp_path):
    """Kueue creates the RayJob suspended and admits it whole; KubeRay accepts a suspended RayJob only with
    shutdownAfterJobFinishes, and that only without deletionRules. Each job names the LocalQueue and a priority
    that exist, and stays a valid RayJob with its deadlines."""
    local_queue = kueue_queues()["LocalQueue"]
    priorities = priority_classes()
    jobs = kueue_jobs(env, tmp_path)
    for name, job in jobs.items():
        labels = job["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] == local_queue["metadata"]["name"], name
        assert labels["kueue.x-k8s.io/priority-class"] in priorities, name
        spec = job["spec"]
        assert "deletionStrategy" not in spec and spec["shutdownAfterJobFinishes"] is True, name
        assert 0 < spec["ttlSecondsAfterFinished"] <= 3600, name
        assert deletion_rule_errors(spec, suspended=True) == [], name
        assert 0 < spec["preRunningDeadlineSeconds"] < spec["activeDeadlineSeconds"], name
        if os.environ.get(SCHEMAS_ENV):
            assert_valid_crd(job)
    # The nightly labels first; a training run yields (it resumes from its checkpoint).
    order = [priorities[jobs[j]["metadata"]["labels"]["kueue.x-k8s.io/priority-class"]]
             for j in ("nightly", "evaluate", "train")]
    assert order == sorted(order, reverse=True) and len(set(order)) == 3, order


def test_without_kueue_no_rayjob_names_a_queue(tmp_path):
    for build in OVERLAY_BUILDS:
        (tmp_path / build).mkdir(parents=True)
        for name, spec in job_specs(render(build), tmp_path / build).items():
            assert "shutdownAfterJobFinishes" not in spec, (build, name)
        for doc in render(build):
            assert "kueue.x-k8s.io/queue-name" not in doc["metadata"].get("labels", {}), build


def test_the_kueue_queues_fit_one_job_of_each_environment_and_two_gpu_jobs_never(tmp_path):
    """The ClusterQueue covers every resource the jobs request (an uncovered one, ephemeral-storage say, and Kueue
    never admits the job), holds any one job of either environment, and holds the GPUs of one gpu job only: the
    next waits in the queue instead of half-starting."""
    queues = kueue_queues()
    cluster_queue, local_queue, flavor = queues["ClusterQueue"], queues["LocalQueue"], queues["ResourceFlavor"]
    assert local_queue["metadata"]["namespace"] == NAMESPACE
    assert local_queue["spec"]["clusterQueue"] == cluster_queue["metadata"]["name"]
    assert cluster_queue["spec"]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    (group,) = cluster_queue["spec"]["resourceGroups"]
    (flavor_quota,) = group["flavors"]
    assert flavor_quota["name"] == flavor["metadata"]["name"]
    quota = {r["name"]: quantity(r["nominalQuota"]) for r in flavor_quota["resources"]}
    assert set(quota) == set(group["coveredResources"])
    for env in ENVS:
        (tmp_path / env).mkdir()
        for name, job in kueue_jobs(env, tmp_path / env).items():
            needed = pod_requests(job["spec"])
            assert set(needed) <= set(quota), f"{env} {name}: {set(needed) - set(quota)} not covered"
            for resource, amount in needed.items():
                assert amount <= quota[resource], f"{env} {name}: {resource} {amount} > {quota[resource]}"
    gpu_job = pod_requests(kueue_jobs("gpu", tmp_path / "gpu")["train"]["spec"])
    assert gpu_job["nvidia.com/gpu"] <= quota["nvidia.com/gpu"] < 2 * gpu_job["nvidia.com/gpu"]


def test_with_kueue_the_cronjob_renders_the_kueue_head(tmp_path):
    pod = one(render("optional/kueue"), "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (render_step,) = pod["initContainers"]
    assert render_step["command"][3:] == ["/template/label-rayjob-kueue.yaml", "/template/label-rayjob-cluster.yaml"]
    default = one(render("overlays/gpu"), "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert default["initContainers"][0]["command"][3] == "/template/label-rayjob.yaml"
    # the two heads differ in queueing and cleanup only
    heads = {}
    for head, file in TEMPLATE_HEADS.items():
        (tmp_path / head).mkdir()
        heads[head] = rendered_label_rayjob(render("overlays/gpu"), tmp_path / head, head=file)
    plain, kueue = heads["default"], heads["kueue"]
    assert kueue["spec"]["entrypoint"] == plain["spec"]["entrypoint"]
    for key in ("preRunningDeadlineSeconds", "activeDeadlineSeconds", "backoffLimit"):
        assert kueue["spec"][key] == plain["spec"][key], key
    assert {k: v for k, v in kueue["metadata"]["labels"].items() if not k.startswith("kueue.x-k8s.io/")} == \
        plain["metadata"]["labels"]


# ================================================================ network policies


@dataclass(frozen=True)
class Peer:
    """A pod (labels, namespace) or an address outside the pod network."""

    namespace: str | None = None
    labels: dict = field(default_factory=dict, hash=False)
    ip: str | None = None


def _selects(selector: dict, labels: dict) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present, value = expression["key"] in labels, labels.get(expression["key"])
        operator = expression["operator"]
        if (operator == "In" and value not in expression["values"]) or (
                operator == "NotIn" and present and value in expression["values"]) or (
                operator == "Exists" and not present) or (operator == "DoesNotExist" and present):
            return False
    return True


def _peer_matches(rule_peer: dict, peer: Peer, policy_namespace: str) -> bool:
    if "ipBlock" in rule_peer:
        if peer.ip is None:
            return False
        block = rule_peer["ipBlock"]
        address = ipaddress.ip_address(peer.ip)
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", []))
    if peer.ip is not None:
        return False
    if "namespaceSelector" in rule_peer:
        if not _selects(rule_peer["namespaceSelector"], {"kubernetes.io/metadata.name": peer.namespace}):
            return False
    elif peer.namespace != policy_namespace:
        return False
    return _selects(rule_peer.get("podSelector", {}), peer.labels)


def _port_matches(rule: dict, port: int, protocol: str) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    return any(p.get("protocol", "TCP") == protocol and (
        "port" not in p or (p["port"] <= port <= p.get("endPort", p["port"]))) for p in ports)


def allowed(policies: list[dict], source: Peer, destination: Peer, port: int, protocol: str = "TCP") -> bool:
    """Whether the NetworkPolicies of `policies` (all in one namespace) let `source` open a connection to
    `destination`: the source's egress and the destination's ingress must both allow it, where a pod that no
    policy of that direction selects is not isolated in it (Kubernetes' semantics)."""
    def direction(pod: Peer, kind: str, key: str, other: Peer) -> bool:
        if pod.ip is not None:
            return True  # outside the namespace: not ours to check
        selecting = [p for p in policies if p["metadata"]["namespace"] == pod.namespace
                     and kind in p["spec"]["policyTypes"] and _selects(p["spec"]["podSelector"], pod.labels)]
        if not selecting:
            return True
        return any(_port_matches(rule, port, protocol) and (
            "to" not in rule and "from" not in rule or any(
                _peer_matches(peer, other, pod.namespace) for peer in rule.get(key, [])))
            for p in selecting for rule in p["spec"].get(kind.lower(), []))
    return (direction(source, "Egress", "to", destination)
            and (destination.namespace != NAMESPACE or direction(destination, "Ingress", "from", source)))


def _netpol_world(docs: list[dict], tmp_path: Path) -> dict[str, Peer]:
    """The pods of the namespace with the labels they run with (KubeRay adds ray.io/* to heads and workers), and
    the peers they meet, from the build's settings."""
    values = settings(docs)
    pods = pod_templates(docs, tmp_path)

    def labels(name: str, **extra: str) -> dict:
        return {**pods[name]["metadata"].get("labels", {}), **extra}

    (gateway_host, gateway_port) = values["PUSHGATEWAY"].rsplit(":", 1)
    return {
        "head": Peer(NAMESPACE, labels("nightly RayJob head", **{"ray.io/is-ray-node": "yes",
                                                                 "ray.io/node-type": "head"})),
        "worker": Peer(NAMESPACE, labels("nightly RayJob workers", **{"ray.io/is-ray-node": "yes",
                                                                      "ray.io/node-type": "worker"})),
        "submitter": Peer(NAMESPACE, labels("nightly RayJob submitter")),
        "launcher": Peer(NAMESPACE, labels("CronJob genre-label-nightly")),
        "promote": Peer(NAMESPACE, {"app.kubernetes.io/name": "genre-pipeline", "app.kubernetes.io/component":
                                    "promote", "genre-pipeline/role": "promote"}),
        "operator": Peer(values["KUBERAY_NAMESPACE"], {"app.kubernetes.io/name": "kuberay-operator"}),
        "prometheus": Peer(values["MONITORING_NAMESPACE"], {"app.kubernetes.io/name": "prometheus"}),
        "pushgateway": Peer(gateway_host.split(".")[1], {"app": "pushgateway"}),
        "catalog": Peer(values["TABLE_CATALOG_NAMESPACE"], {"app": "iceberg-rest"}),
        "dns": Peer("kube-system", {"k8s-app": "kube-dns"}),
        "stranger": Peer("default", {"app": "curious"}),
        "s3": Peer(ip="52.217.10.20"),
        "api-server": Peer(ip="172.20.0.1"),
        "metadata": Peer(ip="169.254.169.254"),
        "gateway-port": int(gateway_port),
    }


# (source, destination, port, protocol, allowed): what the jobs need, and what they must not get.
FLOWS = [
    ("worker", "head", 6379, "TCP", True),          # GCS
    ("head", "worker", 41234, "TCP", True),         # a raylet / object manager port Ray picked
    ("worker", "worker", 10005, "TCP", True),       # worker processes across nodes
    ("submitter", "head", 8265, "TCP", True),       # ray job submit
    ("submitter", "head", 6379, "TCP", False),
    ("submitter", "worker", 8265, "TCP", False),
    ("operator", "head", 8265, "TCP", True),        # KubeRay reads the job's status
    ("operator", "worker", 6379, "TCP", False),
    ("prometheus", "worker", 8080, "TCP", True),    # Ray metrics
    ("prometheus", "head", 8080, "TCP", True),
    ("prometheus", "head", 8265, "TCP", False),
    ("stranger", "head", 8265, "TCP", False),
    ("stranger", "worker", 6379, "TCP", False),
    ("head", "s3", 443, "TCP", True),               # S3 (and STS, Glue, HTTPS posters)
    ("worker", "s3", 443, "TCP", True),
    ("head", "s3", 80, "TCP", False),
    ("head", "pushgateway", "gateway-port", "TCP", True),
    ("head", "pushgateway", 9999, "TCP", False),
    ("worker", "catalog", 8181, "TCP", True),       # the REST catalog (TABLE_CATALOG_PORT)
    ("worker", "catalog", 5432, "TCP", False),
    ("head", "metadata", 80, "TCP", True),          # workload identity
    ("head", "dns", 53, "UDP", True),
    ("submitter", "dns", 53, "UDP", True),
    ("submitter", "s3", 443, "TCP", False),         # the submitter only talks to the head
    ("launcher", "api-server", 443, "TCP", True),   # kubectl create
    ("launcher", "head", 8265, "TCP", False),
    ("promote", "s3", 443, "TCP", True),
    ("promote", "head", 8265, "TCP", False),
    ("worker", "stranger", 8080, "TCP", False),
]


@pytest.mark.parametrize("env", ENVS)
def test_network_policies_allow_what_the_jobs_need_and_nothing_else(env, tmp_path):
    docs = render("optional/network-policies") if env == "gpu" else render_variant(env, "nightly", "network-policies")
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    default_deny = one(policies, "NetworkPolicy", "genre-pipeline-default-deny")["spec"]
    assert default_deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    world = _netpol_world(docs, tmp_path)
    wrong = [(source, destination, port, want) for source, destination, port, protocol, want in FLOWS
             if allowed(policies, world[source], world[destination],
                        world[port] if isinstance(port, str) else port, protocol) != want]
    assert not wrong, f"flows the policies get wrong (source, destination, port, should be allowed): {wrong}"
    # without the policies (no enforcing policy selects the pods), everything flows: the evaluator is not rigged
    assert all(allowed([], world[s], world[d], world[p] if isinstance(p, str) else p, proto)
               for s, d, p, proto, _ in FLOWS)


def test_network_policies_follow_the_settings(tmp_path):
    """Move the Pushgateway to another namespace and port, the catalog to another port: the policies follow."""
    copy_root = tmp_path / "k8s"
    shutil.copytree(K8S, copy_root)
    path = copy_root / "overlays" / "gpu" / "env" / "kustomization.yaml"
    text = path.read_text()
    for old, new in [("PUSHGATEWAY=pushgateway.monitoring:9091", "PUSHGATEWAY=pushgateway.observability:9092"),
                     ("MONITORING_NAMESPACE=monitoring", "MONITORING_NAMESPACE=observability"),
                     ("TABLE_CATALOG_URI=http://iceberg-rest.iceberg:8181", "TABLE_CATALOG_URI=http://iceberg-rest.iceberg:8443"),
                     ("TABLE_CATALOG_PORT=8181", "TABLE_CATALOG_PORT=8443")]:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path.write_text(text)
    docs = _docs(_kustomize(copy_root / "optional" / "network-policies"))
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    world = _netpol_world(docs, tmp_path)
    assert world["pushgateway"].namespace == "observability" and world["gateway-port"] == 9092
    assert allowed(policies, world["head"], world["pushgateway"], 9092)
    assert not allowed(policies, world["head"], Peer("monitoring", {"app": "pushgateway"}), 9091)
    assert allowed(policies, world["worker"], world["catalog"], 8443)
    assert not allowed(policies, world["worker"], world["catalog"], 8181)
    assert allowed(policies, world["prometheus"], world["worker"], 8080)


@pytest.mark.parametrize("env", ENVS)
def test_the_network_settings_agree_with_the_addresses(env):
    """MONITORING_NAMESPACE is the Pushgateway's namespace, TABLE_CATALOG_NAMESPACE/PORT the catalog's, as the
    addresses the jobs use say: the policies open what the jobs dial."""
    values = env_settings(env)
    host, _ = values["PUSHGATEWAY"].rsplit(":", 1)
    assert host.split(".")[1] == values["MONITORING_NAMESPACE"]
    in_cluster = r"https?://([a-z0-9-]+)\.([a-z0-9-]+)(?:\.svc[.a-z]*)?:(\d+)(/.*)?"
    match = re.fullmatch(in_cluster, values["TABLE_CATALOG_URI"])
    assert match, values["TABLE_CATALOG_URI"]
    assert (match.group(2), match.group(3)) == (values["TABLE_CATALOG_NAMESPACE"], values["TABLE_CATALOG_PORT"])
    ipaddress.ip_network(values["OBJECT_STORE_CIDR"])


def test_network_policies_are_the_nightlys_only():
    """Namespace-wide: applied (and deleted) with the namespace's owner, never with a job's kustomization."""
    for env in ENVS:
        for job in ("train", "evaluate", "promote"):
            assert not [d for d in render(job_build(env, job)) if d["kind"] == "NetworkPolicy"]


# ================================================================ entrypoints vs the jobs' parsers


@pytest.mark.parametrize("env", ENVS)
def test_training_entrypoint_is_accepted_by_the_training_job(env, capsys):
    values = env_settings(env)
    entrypoint = one(render(job_build(env, "train")), "RayJob", "genre-train")["spec"]["entrypoint"]
    args = parse_entrypoint(entrypoint, "jobs/train_genre_model.py", capsys)
    bucket = values["BUCKET"]
    assert args.catalog == f"s3://{bucket}/catalog/catalog.parquet"
    assert args.storage_path == f"s3://{bucket}/runs"
    assert args.name == values["RUN_NAME"]
    assert args.pushgateway == values["PUSHGATEWAY"]
    config, _ = _job_module("jobs/train_genre_model.py").parse_config(shlex.split(entrypoint)[2:])
    # A pretrained backbone, its head first: from random weights the labels would not beat the genre prior.
    assert config.starts_pretrained and config.resolved_head_epochs > 0 and config.weights is None
    if env == "cpu":
        assert (args.arch, args.epochs, args.num_workers, args.use_gpu) == ("efficientnet_lite0", 3, 2, False)
    else:
        assert (args.arch, args.epochs, args.num_workers, args.use_gpu) == ("efficientnet_lite2", 5, 4, True)
    gpus = int(values["WORKERS"]) * int(values["WORKER_GPUS"])
    assert gpus == (args.num_workers if args.use_gpu else 0), "one GPU per DDP worker"


PRETRAINED_ARCHS = {"efficientnet_lite0", "efficientnet_lite2"}


@pytest.mark.parametrize("env", ENVS)
def test_every_training_rayjob_uses_the_pretrained_recipe(env):
    """The recipe for real posters everywhere: a pretrained EfficientNet-Lite, never a backbone from random
    weights (e.g. resnet50 or cnn with pretraining off), judged by the job's own parser (conftest.load_job)."""
    from conftest import load_job

    entrypoint = shlex.split(one(render(job_build(env, "train")), "RayJob", "genre-train")["spec"]["entrypoint"])
    assert entrypoint[:2] == ["python", "jobs/train_genre_model.py"]
    job = load_job("train_genre_model")
    args = job.build_parser().parse_args(entrypoint[2:])
    assert args.arch in PRETRAINED_ARCHS, f"{env} trains {args.arch}"
    assert args.pretrained is not False, f"{env} turns pretraining off"
    assert args.weights is None, f"{env} starts from a weights file, not the pretrained backbone"
    config, _ = job.parse_config(entrypoint[2:])
    assert config.starts_pretrained and config.resolved_head_epochs > 0


def assert_pinned_model(model: str, values: dict[str, str]) -> None:
    """The nightly --model is the MODEL_URI setting: a promoted pointer folder (jobs/promote_model.py) or a
    pinned version, never the run's model folder, whose pointer every training run moves."""
    assert model == values["MODEL_URI"], f"--model {model} is not the MODEL_URI setting"
    assert model != f"s3://{values['BUCKET']}/runs/{values['RUN_NAME']}/model"
    assert re.fullmatch(r"s3://[a-z0-9.-]+/(runs/[^/]+/versions/[^/]+|.+/production)", model), model


def assert_candidate(model: str, values: dict[str, str]) -> None:
    """What evaluate and promote act on: the CANDIDATE setting, one published version (never a pointer folder,
    which could move between evaluating and promoting)."""
    assert model == values["CANDIDATE"]
    assert re.fullmatch(r"s3://[a-z0-9.-]+/runs/[^/]+/versions/[^/]+", model), model


@pytest.mark.parametrize("build", CRONJOB_BUILDS)
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
    if ENV_OF[build] == "cpu":
        assert (args.actors, args.num_gpus_per_actor) == (2, 0)
    else:
        assert (args.actors, args.num_gpus_per_actor) == (4, 1)
    assert args.actors * args.num_gpus_per_actor == int(values["WORKERS"]) * int(values["WORKER_GPUS"])


@pytest.mark.parametrize("env", ENVS)
def test_evaluation_labels_the_candidate_into_a_table_of_its_own_and_scores_it(env, tmp_path, capsys):
    values = env_settings(env)
    entrypoint = one(render(job_build(env, "evaluate")), "RayJob", "genre-evaluate")["spec"]["entrypoint"]
    shell, flag, script = shlex.split(head_command(entrypoint))
    assert (shell, flag) == ("sh", "-c"), "one shell on the head runs both commands"
    argv = shlex.split(script)
    assert argv.count("&&") == 1, "label, then evaluate, and only if labelling succeeded"
    split = argv.index("&&")
    label = parse_command(argv[:split], "jobs/label_catalog.py", capsys)
    evaluate = parse_command(argv[split + 1:], "jobs/evaluate.py", capsys)
    nightly = parse_entrypoint(rendered_label_rayjob(render(job_build(env, "nightly")), tmp_path)["spec"]["entrypoint"],
                               "jobs/label_catalog.py", capsys)
    bucket = values["BUCKET"]
    assert label.catalog == evaluate.catalog == f"s3://{bucket}/catalog/catalog.parquet"
    assert_candidate(label.model, values)
    assert_candidate(evaluate.model, values)
    # never the nightly's table or folder, never the nightly's alerts
    assert label.output == evaluate.labels == f"s3://{bucket}/candidates/labels" != nightly.output
    assert label.table == evaluate.table != nightly.table
    assert label.table_catalog == evaluate.table_catalog == nightly.table_catalog
    assert label.pushgateway is None
    # the same pool as the nightly on the same cluster
    assert (label.actors, label.num_gpus_per_actor, label.batch_size) == (
        nightly.actors, nightly.num_gpus_per_actor, nightly.batch_size)
    assert evaluate.split == "test"
    assert evaluate.out == f"s3://{bucket}/candidates/evaluation"


@pytest.mark.parametrize("env", ENVS)
def test_promotion_promotes_the_candidate_into_the_nightlys_registry(env, capsys):
    values = env_settings(env)
    job = one(render(job_build(env, "promote")), "Job", "genre-promote")
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = parse_command(container["command"], "jobs/promote_model.py", capsys)
    assert_candidate(args.version, values)
    assert args.registry == f"s3://{values['BUCKET']}/models"
    assert f"{args.registry}/production" == values["MODEL_URI"], "the nightly must read what promotion writes"
    spec = job["spec"]
    assert spec["backoffLimit"] <= 1 and spec["activeDeadlineSeconds"] <= 3600 and spec["ttlSecondsAfterFinished"] > 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "HOME", "value": "/tmp"} in container["env"]


def _pushgateway_flags(env: str, tmp_path: Path, capsys) -> dict[str, str | None]:
    flags = {"train": parse_entrypoint(one(render(job_build(env, "train")), "RayJob")["spec"]["entrypoint"],
                                       "jobs/train_genre_model.py", capsys).pushgateway,
             "nightly": parse_entrypoint(rendered_label_rayjob(render(job_build(env, "nightly")),
                                                               tmp_path)["spec"]["entrypoint"],
                                         "jobs/label_catalog.py", capsys).pushgateway,
             "raycronjob": parse_entrypoint(one(render_variant(env, "raycronjob"), "RayCronJob")["spec"]["jobTemplate"]
                                            ["entrypoint"], "jobs/label_catalog.py", capsys).pushgateway}
    return flags


@pytest.mark.parametrize("env", ENVS)
def test_every_scheduled_or_training_entrypoint_pushes_to_the_pushgateway_setting(env, tmp_path, capsys):
    gateway = env_settings(env)["PUSHGATEWAY"]
    assert re.fullmatch(r"[a-z0-9.-]+:[0-9]+", gateway), gateway
    assert _pushgateway_flags(env, tmp_path, capsys) == {"train": gateway, "nightly": gateway, "raycronjob": gateway}


def _setting_lines(value: str) -> list[tuple[str, str]]:
    """(file:line, line) of every non-comment line under k8s/ that holds `value`."""
    found = []
    for path in sorted(p for p in K8S.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".sh", ".template")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if value in line and not line.lstrip().startswith("#"):
                found.append((f"{path.relative_to(REPO)}:{number}", line.strip()))
    return found


def test_the_pushgateway_address_is_written_only_as_the_setting():
    """Its address is in no manifest, template or script but as a PUSHGATEWAY= settings literal."""
    for env in ENVS:
        gateway = env_settings(env)["PUSHGATEWAY"]
        host = gateway.split(":")[0]
        for where, line in _setting_lines(host):
            assert line == f"- PUSHGATEWAY={gateway}", f"{where}: {line}"


# The labels table's catalog: pyiceberg's variable suffix -> the setting that fills it.
TABLE_CATALOG_SETTINGS = {"TYPE": "TABLE_CATALOG_TYPE", "URI": "TABLE_CATALOG_URI",
                          "WAREHOUSE": "TABLE_CATALOG_WAREHOUSE"}


@pytest.mark.parametrize("build", CRONJOB_BUILDS + ["optional/raycronjob"])
def test_the_label_job_commits_through_the_catalog_of_the_settings(build, tmp_path, capsys, monkeypatch):
    """An s3:// output cannot have the embedded SQLite catalog (the job refuses it): the nightly entrypoint names
    a catalog with --table-catalog, and every Ray pod of the label job configures that catalog from the
    TABLE_CATALOG_* settings, in pyiceberg's own PYICEBERG_CATALOG__<NAME>__* variables."""
    import dataclasses

    from pyiceberg.utils.config import Config

    from genre_pipeline.label.table import EMBEDDED_CATALOG, TableSettingsError, catalog_properties

    docs = render(build)
    values = settings(docs)
    (spec,) = [s for name, s in job_specs(docs, tmp_path).items() if "nightly" in name or "RayCronJob" in name]
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
    """Each environment's catalog URI is in no manifest, template or script but as its TABLE_CATALOG_URI= literal."""
    for env in ENVS:
        uri = env_settings(env)["TABLE_CATALOG_URI"]
        assert re.fullmatch(r"https?://[a-z0-9.-]+(:[0-9]+)?(/\S*)?", uri), uri
        for where, line in _setting_lines(uri):
            assert line == f"- TABLE_CATALOG_URI={uri}", f"{where}: {line}"


# ================================================================ the nightly scheduler

SCHEDULER_KINDS = ("CronJob", "RayCronJob")
# RayCronJob.spec in KubeRay 1.7.0.
RAYCRONJOB_SPEC_FIELDS = {"schedule", "timeZone", "suspend", "jobTemplate"}


@pytest.mark.parametrize("build", NAMESPACE_BUILDS)
def test_each_build_schedules_the_night_exactly_once(build):
    """The CronJob and the RayCronJob never render together (a kustomization lists components/nightly or
    components/raycronjob), and the RayCronJob variant carries none of the CronJob's helpers."""
    docs = render(build)
    schedulers = [(d["kind"], d["metadata"]["name"]) for d in docs if d["kind"] in SCHEDULER_KINDS]
    assert len(schedulers) == 1, f"k8s/{build}: {schedulers}"
    if schedulers[0][0] == "RayCronJob":
        launcher = [(d["kind"], d["metadata"]["name"]) for d in docs if "launcher" in d["metadata"]["name"]
                    or d["metadata"]["name"].startswith("genre-label-rayjob-template")]
        assert not launcher, f"k8s/{build} keeps the CronJob's helpers: {launcher}"


def raycronjob_gaps(crd_fields: set[str], spec: dict) -> list[str]:
    """What the RayCronJob component must set that its CRD offers: Forbid for concurrency and a short starting
    deadline, which the CronJob has; and any field the CRD gained that nobody has looked at yet."""
    gaps = []
    if "concurrencyPolicy" in crd_fields and spec.get("concurrencyPolicy") != "Forbid":
        gaps.append("concurrencyPolicy: Forbid")
    if "startingDeadlineSeconds" in crd_fields and not 0 < spec.get("startingDeadlineSeconds", 0) <= 3600:
        gaps.append("startingDeadlineSeconds: at most an hour")
    known = RAYCRONJOB_SPEC_FIELDS | {"concurrencyPolicy", "startingDeadlineSeconds"}
    gaps += [f"a new field to look at: {name}" for name in sorted(crd_fields - known)]
    return gaps


def test_raycronjob_sets_what_its_crd_offers():
    """KubeRay 1.7.0's RayCronJob has no concurrencyPolicy or startingDeadlineSeconds (k8s/README.md relies on the
    commit protocol instead); once a KubeRay upgrade brings them, this fails until the component sets them."""
    fields = set(_crd_schema("RayCronJob", strict=False)["properties"]["spec"]["properties"])
    spec = one(render("optional/raycronjob"), "RayCronJob", "genre-label")["spec"]
    assert raycronjob_gaps(fields, spec) == []
    assert fields == RAYCRONJOB_SPEC_FIELDS, "k8s/README.md says what 1.7.0's RayCronJob lacks: update it"


def test_raycronjob_gap_check_demands_forbid_and_a_deadline_once_the_crd_has_them():
    spec = one(render("optional/raycronjob"), "RayCronJob", "genre-label")["spec"]
    newer = RAYCRONJOB_SPEC_FIELDS | {"concurrencyPolicy", "startingDeadlineSeconds", "successfulJobsHistoryLimit"}
    assert raycronjob_gaps(newer, spec) == ["concurrencyPolicy: Forbid", "startingDeadlineSeconds: at most an hour",
                                            "a new field to look at: successfulJobsHistoryLimit"]
    set_up = spec | {"concurrencyPolicy": "Forbid", "startingDeadlineSeconds": 3600}
    assert raycronjob_gaps(newer - {"successfulJobsHistoryLimit"}, set_up) == []
    assert raycronjob_gaps(newer - {"successfulJobsHistoryLimit"}, set_up | {"concurrencyPolicy": "Allow"}) == [
        "concurrencyPolicy: Forbid"]


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
    assert not [d for d in docs if d["kind"] in ("CronJob", "Role", "RoleBinding")]


@pytest.mark.parametrize("build", CRONJOB_BUILDS)
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
    assert render_step["command"][:3] == ["/bin/sh", "/template/render.sh", "/rendered/rayjob.yaml"]
    assert {Path(f).name for f in render_step["command"][3:]} <= set(template_cm["data"])
    assert Path(render_step["command"][-1]).name == CLUSTER_TEMPLATE

    # Only the container that talks to the API server gets a token.
    (create,) = pod["containers"]
    assert create["args"][0] == "create"
    token_mounts = {c["name"] for c in [render_step, create]
                    for m in c.get("volumeMounts", []) if m["name"] == "kube-api-access"}
    assert token_mounts == {"create"}
    for container in (render_step, create):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["resources"]["limits"]


@pytest.mark.parametrize("build", CRONJOB_BUILDS)
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


def test_render_script_fails_on_an_unset_setting_or_a_bad_date_or_no_template(tmp_path):
    docs = render("overlays/cpu")
    missing = render_label_rayjob(docs, tmp_path, drop="BUCKET")
    assert missing.returncode != 0 and "BUCKET is not set" in missing.stderr
    missing_cluster_setting = render_label_rayjob(docs, tmp_path, drop="WORKER_EPHEMERAL_STORAGE")
    assert missing_cluster_setting.returncode != 0 and "WORKER_EPHEMERAL_STORAGE is not set" in \
        missing_cluster_setting.stderr
    bad_date = render_label_rayjob(docs, tmp_path, run_date="28.11.2026")
    assert bad_date.returncode != 0 and "YYYY-MM-DD" in bad_date.stderr
    no_template = subprocess.run(["sh", str(tmp_path / "render.sh"), str(tmp_path / "out.yaml")],
                                 capture_output=True, text=True, timeout=30)
    assert no_template.returncode == 2 and "usage" in no_template.stderr


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
