"""Offline checks of deploy/: each manifest against the schema its tool applies,
plus the links between files that no schema sees (install extras, entrypoints,
ports, labels). No cluster, no network."""

from __future__ import annotations

import copy
import json
import re
import shlex
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.requirements import Requirement
from ray._private.runtime_env.packaging import _get_excludes
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
KUBERAY_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay-v1.7.0"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
# What must reach the cluster in working_dir for `python -m polyak ...` to run there.
SHIPPED = ["service/__init__.py", "workers/mlp.py", "client/models.py", "examples/digits.yaml"]
LEFT_BEHIND = [".venv/bin/python", ".git/HEAD", ".polyak/polyak.db", "service/__pycache__/x.pyc", "w.npz"]

# The CRD files are large; the C loader keeps reading them well under a second.
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(name: str):
    return yaml.load((DEPLOY / name).read_text(), Loader=Loader)


def load_all(name: str) -> list[dict]:
    return list(yaml.load_all((DEPLOY / name).read_text(), Loader=Loader))


def errors(validator: jsonschema.protocols.Validator, instance) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(instance)
    ]


# ---------------------------------------------------------------- cluster launcher


@pytest.fixture(scope="module")
def ray_validator():
    assert RAY_SCHEMA.is_file(), f"the installed ray ({ray.__version__}) ships no {RAY_SCHEMA}"
    return jsonschema.Draft7Validator(json.loads(RAY_SCHEMA.read_text()))


@pytest.fixture(scope="module")
def cluster() -> dict:
    return load("cluster.yaml")


def effective_setup(prepared: dict, node_type: str) -> list[str]:
    """The setup commands a node of this type runs, by the autoscaler's rule: the head
    runs setup + head_setup; a worker type's own worker_setup_commands replace the
    merged global ones (StandardAutoscaler._get_node_type_specific_fields)."""
    if node_type == prepared["head_node_type"]:
        return prepared["head_setup_commands"]
    return prepared["available_node_types"][node_type].get(
        "worker_setup_commands", prepared["worker_setup_commands"]
    )


def test_cluster_yaml_is_valid_for_ray_up(cluster, ray_validator):
    assert errors(ray_validator, cluster) == []
    # What `ray up` does before touching the cloud: merge the provider's defaults and
    # check the result (head type exists, min_workers fit max_workers, ...).
    validate_config(prepare_config(copy.deepcopy(cluster)))


@pytest.mark.parametrize(
    "breakage, culprit",
    [
        pytest.param(lambda c: c.update(max_workers="eight"), "max_workers", id="string-for-integer"),
        pytest.param(lambda c: c.pop("provider"), "provider", id="missing-provider"),
        pytest.param(
            lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=0.5),
            "GPU",
            id="fractional-gpu",
        ),
        pytest.param(lambda c: c.update(idle_timeout="10m"), "idle_timeout", id="unknown-key"),
    ],
)
def test_ray_schema_rejects_broken_cluster_yaml(cluster, ray_validator, breakage, culprit):
    broken = copy.deepcopy(cluster)
    breakage(broken)
    found = errors(ray_validator, broken)
    assert found and all(culprit in e for e in found), found


def test_cluster_has_head_cpu_and_gpu_node_types(cluster):
    types = cluster["available_node_types"]
    assert cluster["cluster_name"] == "polyak"
    assert cluster["provider"]["type"] == "aws"
    assert cluster["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    gpu = [name for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1]
    cpu = [name for name, t in workers.items() if not t["resources"].get("GPU")]
    assert gpu and cpu, f"want CPU and GPU worker types, got {sorted(workers)}"


def test_gpu_workers_install_the_gpu_extra_and_cpu_nodes_do_not(cluster):
    prepared = prepare_config(copy.deepcopy(cluster))
    mount = next(remote for remote, local in cluster["file_mounts"].items() if local == ".")
    install = re.compile(rf"""pip install ["']?{re.escape(mount)}(\[[\w,]+\])?["']?(\s|$)""")
    for name, node_type in prepared["available_node_types"].items():
        extras = [m.group(1) for cmd in effective_setup(prepared, name) if (m := install.search(cmd))]
        assert len(extras) == 1, (
            f"{name} should pip install {mount} exactly once, runs {effective_setup(prepared, name)}"
        )
        installed = set((extras[0] or "[]").strip("[]").split(",")) - {""}
        wants_gpu = node_type["resources"].get("GPU", 0) >= 1
        assert ("gpu" in installed) == wants_gpu, f"{name}: installs {mount}{extras[0] or ''}"
        assert "train" in installed or "all" in installed, f"{name} runs gradient workers: it needs [train]"


def test_every_ray_start_uses_token_auth_with_the_shipped_token(cluster):
    starts = [
        c
        for c in cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
        if "ray start" in c
    ]
    assert len(starts) == 2
    assert all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    head = next(c for c in starts if "--head" in c)
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "--dashboard-host=0.0.0.0" in head


# --------------------------------------------------------------------- runtime_env


@pytest.fixture(scope="module")
def runtime_env() -> dict:
    return load("runtime_env.yaml")


def test_runtime_env_fields_are_ones_ray_knows(runtime_env, monkeypatch):
    assert set(runtime_env) <= RuntimeEnv.known_fields, set(runtime_env) - RuntimeEnv.known_fields
    # `ray job submit` is run from the repository root, where working_dir "." points.
    monkeypatch.chdir(REPO)
    RuntimeEnv(**runtime_env)


def test_ray_rejects_a_broken_runtime_env(runtime_env, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(TypeError, match="excludes"):
        RuntimeEnv(**{**runtime_env, "excludes": "/.venv"})


def test_runtime_env_ships_the_packages_and_drops_local_state(runtime_env):
    excluded = _get_excludes(REPO, runtime_env["excludes"])
    assert runtime_env["working_dir"] == "."
    for rel in SHIPPED:
        path = REPO / rel
        dropped = [p for p in [path, *path.parents] if REPO in p.parents and excluded(p)]
        assert not dropped, f"{rel} would not reach the cluster: {dropped[0].relative_to(REPO)} is excluded"
    for rel in LEFT_BEHIND:
        path = REPO / rel
        assert any(excluded(p) for p in [path, *path.parents] if REPO in p.parents), (
            f"{rel} would be uploaded"
        )


def test_runtime_env_pip_is_what_training_needs_without_ray(runtime_env):
    """pyproject's base dependencies and its train extra, less Ray (the cluster's own must be used)."""
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["train"]
    wanted = {Requirement(d).name.lower() for d in deps} - {"ray"}
    listed = {Requirement(p).name.lower() for p in runtime_env["pip"]}
    assert listed == wanted


# ------------------------------------------------------------------------- KubeRay


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    path = KUBERAY_SCHEMAS / CRD_FILES[kind]
    if not path.is_file():
        pytest.skip(f"the KubeRay v1.7.0 CRD schemas (shared/schemas/kuberay-v1.7.0, {CRD_FILES[kind]}) are not "
                    f"available; the {kind} manifest is not validated against them")
    crd = yaml.load(path.read_text(), Loader=Loader)
    assert crd["spec"]["names"]["kind"] == kind
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(strict(schema))


def test_missing_crd_schemas_are_named_in_words(monkeypatch, tmp_path):
    monkeypatch.setitem(globals(), "KUBERAY_SCHEMAS", tmp_path / "absent")
    with pytest.raises(pytest.skip.Exception) as skipped:
        crd_validator.__wrapped__("RayJob")  # past the cache: the real schemas may be loaded already
    assert skipped.value.msg == (
        "the KubeRay v1.7.0 CRD schemas (shared/schemas/kuberay-v1.7.0, ray.io_rayjobs.yaml) are not available; "
        "the RayJob manifest is not validated against them"
    )


def strict(schema):
    """Forbid fields a schema does not declare, as the API server does under kubectl's
    default strict field validation; CRD schemas leave that implicit, so jsonschema
    alone would let a misspelt field through."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k not in ("enum", "required", "default") else v for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load("kuberay/rayjob.yaml")


@pytest.fixture(scope="module")
def service_docs() -> dict[str, dict]:
    docs = load_all("kuberay/raycluster-service.yaml")
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one document per kind"
    return by_kind


def test_rayjob_matches_the_crd(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert errors(crd_validator("RayJob"), rayjob) == []


def test_raycluster_matches_the_crd(service_docs):
    assert service_docs["RayCluster"]["apiVersion"] == "ray.io/v1"
    assert errors(crd_validator("RayCluster"), service_docs["RayCluster"]) == []


@pytest.mark.parametrize(
    "kind, breakage, culprit",
    [
        pytest.param(
            "RayJob",
            lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas="two"),
            "minReplicas",
            id="rayjob-string-for-integer",
        ),
        pytest.param(
            "RayJob",
            lambda m: m["spec"].update(ttlSecondsAfterFinish=60),
            "ttlSecondsAfterFinish",
            id="rayjob-misspelt-field",
        ),
        pytest.param(
            "RayCluster",
            lambda m: m["spec"].pop("headGroupSpec"),
            "headGroupSpec",
            id="raycluster-missing-head",
        ),
        pytest.param(
            "RayCluster",
            lambda m: m["spec"]["workerGroupSpecs"][0].pop("groupName"),
            "groupName",
            id="raycluster-nameless-group",
        ),
    ],
)
def test_crds_reject_broken_manifests(rayjob, service_docs, kind, breakage, culprit):
    broken = copy.deepcopy(rayjob if kind == "RayJob" else service_docs["RayCluster"])
    breakage(broken)
    found = errors(crd_validator(kind), broken)
    assert found and all(culprit in e for e in found), found


def pod_templates(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [g["template"]["spec"] for g in groups]


def images(cluster, rayjob, service_docs) -> dict[str, tuple[str, bool]]:
    """Every Ray image in deploy/, with whether its node or pod has a GPU."""
    found = {}
    docker = cluster["docker"]
    for name, node_type in cluster["available_node_types"].items():
        image = node_type.get("docker", {}).get("worker_image", docker["image"])
        found[f"cluster.yaml:{name}"] = (image, node_type["resources"].get("GPU", 0) >= 1)
    for label, spec in [
        ("rayjob", rayjob["spec"]["rayClusterSpec"]),
        ("raycluster", service_docs["RayCluster"]["spec"]),
    ]:
        for i, pod in enumerate(pod_templates(spec)):
            container = pod["containers"][0]
            gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
            found[f"{label}:{i}:{container['name']}"] = (container["image"], int(gpus) > 0)
    return found


def test_every_image_is_this_ray_and_gpu_nodes_get_gpu_images(cluster, rayjob, service_docs):
    # One Ray version everywhere: `ray up` and job clients refuse or misbehave across versions.
    versions = {
        rayjob["spec"]["rayClusterSpec"]["rayVersion"],
        service_docs["RayCluster"]["spec"]["rayVersion"],
    }
    assert versions == {ray.__version__}
    for where, (image, has_gpu) in images(cluster, rayjob, service_docs).items():
        assert image.startswith(f"rayproject/ray:{ray.__version__}-"), f"{where}: {image}"
        assert image.endswith("-gpu") == has_gpu, (
            f"{where}: {image} on a node with{'' if has_gpu else 'out'} a GPU"
        )


def test_rayjob_runs_polyak_train_with_code_and_gpu_extra(rayjob):
    spec = rayjob["spec"]
    assert shlex.split(spec["entrypoint"])[:4] == ["python", "-m", "polyak", "train"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int)
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert {"working_dir", "pip"} <= set(env)
    # A remote working_dir must be a package Ray can fetch (.zip, ...); RuntimeEnv checks it.
    RuntimeEnv(**env)
    pip = [Requirement(p) for p in env["pip"]]
    assert any(r.name == "polyak" and {"train", "gpu"} <= r.extras for r in pip), env["pip"]


def test_service_exposes_the_port_the_head_serves_on(service_docs):
    cluster, service = service_docs["RayCluster"], service_docs["Service"]
    assert service["apiVersion"] == "v1"
    assert service["spec"]["selector"] == {
        "ray.io/cluster": cluster["metadata"]["name"],
        "ray.io/node-type": "head",
    }

    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    container = head["containers"][0]
    script = " ".join(container.get("command", []) + container.get("args", []))
    serve = shlex.split(script[script.index("python -m polyak serve") :])
    flag = {k: v for k, v in zip(serve, serve[1:], strict=False) if k.startswith("--")}
    assert flag["--host"] == "0.0.0.0" and flag["--ray-address"] == "auto"

    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    (port,) = service["spec"]["ports"]
    target = port["targetPort"]
    assert named_ports.get(target, target) == int(flag["--port"]) == port["port"]

    # Binding 0.0.0.0 needs a token: it comes from the Secret in this file.
    env = {e["name"]: e for e in container["env"]}
    ref = env["POLYAK_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = service_docs["Secret"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]

    # The data dir lives on the claim this file creates.
    mount = next(m for m in container["volumeMounts"] if flag["--data-dir"].startswith(m["mountPath"]))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert (
        volume["persistentVolumeClaim"]["claimName"]
        == service_docs["PersistentVolumeClaim"]["metadata"]["name"]
    )


def test_container_commands_start_ray_themselves(service_docs):
    # Without the annotation KubeRay would run our command first and its own
    # `ray start` after it: the head would start the service before Ray.
    cluster = service_docs["RayCluster"]
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    for pod in pod_templates(cluster["spec"]):
        assert "KUBERAY_GEN_RAY_START_CMD" in " ".join(pod["containers"][0]["args"])
