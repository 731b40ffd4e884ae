"""The KubeRay and MLflow manifests can work as shipped: shared storage on every pod, checkpoints on S3, the CLIP
weights' cache mounted for offline pods, an MLflow server that accepts its service name; the RayJob's recipe
overrides validate, and a real `mlflow server` started with the manifest's host list serves that name."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"


def load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((INFRA / name).read_text()) if doc]


def pods(cluster_spec: dict) -> list[dict]:
    """The pod specs of a RayCluster spec: the head's and every worker group's."""
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [group["template"]["spec"] for group in groups]


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container["env"]}


def mounts_of(pod: dict) -> dict[str, str]:
    """mountPath -> PVC claim name (or volume kind) of the pod's first container."""
    volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName", "non-pvc") for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in pod["containers"][0]["volumeMounts"]}


def shared_claim() -> str:
    (claim,) = load("kuberay/shared-storage.yaml")
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    return claim["metadata"]["name"]


def mlflow_allowed_hosts() -> list[str]:
    deployment = next(d for d in load("mlflow/kubernetes.yaml") if d["kind"] == "Deployment")
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    return next(a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts=")).split(",")


@pytest.mark.parametrize("name", ["kuberay/rayjob.yaml", "kuberay/raycluster.yaml"])
def test_every_pod_shares_storage_and_reaches_offline_weights_and_mlflow(name):
    (doc,) = load(name)
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    claim = shared_claim()
    for pod in pods(spec):
        env = env_of(pod["containers"][0])
        assert mounts_of(pod)["/shared"] == claim, "every pod mounts the same ReadWriteMany volume"
        assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"].startswith("/shared/"), "CLIP weights: shared cache"
        service = urlsplit(env["MLFLOW_TRACKING_URI"]).netloc
        assert service in mlflow_allowed_hosts(), f"the MLflow server must accept {service}, the name the pods use"
        assert all(env[k].startswith("/shared/") for k in ("MSRVTT_DIR", "DIDEMO_DIR", "ANET_DIR"))


def rayjob_arguments() -> list[str]:
    (job,) = load("kuberay/rayjob.yaml")
    return shlex.split(job["spec"]["entrypoint"])


def test_rayjob_recipe_writes_to_shared_storage_and_checkpoints_to_s3(tmp_path, monkeypatch):
    from pipeline.recipe import load_recipe, run_recipe

    argv = rayjob_arguments()
    assert argv[:2] == ["python", "/workspace/jobs/run_recipe.py"]  # the image's checkout (infra/Dockerfile)
    recipe_path, overrides = argv[2].replace("/workspace", str(REPO), 1), argv[3:]
    values = dict(o.split("=", 1) for o in overrides)
    assert values["out_dir"].startswith("/shared/"), "exports must be on the volume every node mounts"
    assert values["settings.checkpoint.path"].startswith("s3://"), "checkpoints on S3, not the recipe's placeholder"
    # The overrides validate every step's config (a dry run writes nothing; out_dir moved to a writable place).
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    moved = [o if not o.startswith("out_dir=") else f"out_dir={tmp_path / 'out'}" for o in overrides]
    recipe = load_recipe(recipe_path, moved)
    lines: list[str] = []
    run_recipe(recipe, dry_run=True, log=lines.append)
    assert lines[-1].startswith(f"dry run: {len(recipe.steps)} step config(s) validated")
    assert recipe.settings["checkpoint"]["path"] == values["settings.checkpoint.path"]
    assert all("YOUR_BUCKET" not in shard for shard in recipe.settings["data"]["train_shards"])


def test_compose_mlflow_accepts_the_names_its_clients_use():
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yml").read_text())
    command = shlex.split(compose["services"]["mlflow"]["command"])
    hosts = command[command.index("--allowed-hosts") + 1].split(",")
    assert {"localhost:5000", "127.0.0.1:5000", "mlflow:5000"} <= set(hosts)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_with_host(port: int, host: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1",
                                     headers={"Host": host})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except urllib.error.URLError:  # not listening yet
        return 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_real_mlflow_server_with_the_manifest_hosts_serves_the_service_name(tmp_path):
    """MLflow 3.17 answers 403 to a Host it does not list; with the manifest's list the service name gets through."""
    port = free_port()
    hosts = ",".join(mlflow_allowed_hosts())
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db", f"--allowed-hosts={hosts}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        while status_with_host(port, "localhost:5000") != 200:
            assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not come up"
            time.sleep(1)
        assert status_with_host(port, "mlflow.mlflow.svc:5000") == 200
        assert status_with_host(port, "elsewhere.example.com:5000") == 403  # the check is on: unlisted names fail
    finally:
        server.terminate()
        server.wait(timeout=30)
