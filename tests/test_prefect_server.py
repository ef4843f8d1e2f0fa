"""``deploy/local.sh`` (``make prefect-up``) against a real ``prefect server`` process, not the test harness.

The script runs as documented in docs/orchestration.md, isolated: its own PREFECT_HOME and state directory in a temp
dir, a free loopback port, and ``ANYFLOW_REPO`` pointing at a temp working directory (copies of ``flows/`` and
``tasks/``, a ``params.yaml`` with the local store, an exported release with a passing gate). Asserted: the script
starts the server, creates both work pools, registers every deployment of ``deploy/prefect.yaml`` and starts a
worker; ``prefect deployment run anyflow-release/release`` is executed by that worker to Completed and the registry
shows the promotion (with the flow run's id in the release metadata); re-running the script while the stack is up
succeeds; a ``prefect deploy`` that stops half way makes the script exit 1 naming the deployments not registered.
Server and worker are stopped (their process groups killed) whatever happens.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy/local.sh"
EXPECTED = {"anyflow-distill/nightly-refresh": "anyflow-local", "anyflow-distill/cluster-distill": "anyflow-gpu",
            "anyflow-continued-training/continued-training": "anyflow-gpu", "anyflow-release/release": "anyflow-local"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(env: dict, method: str, path: str, body: dict | None = None):
    req = urllib.request.Request(env["PREFECT_API_URL"] + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read().decode())


def _script(env: dict, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _write_release(release: Path, payload: bytes) -> None:
    """What `anyflow export` leaves in artifacts/release as far as `anyflow promote` is concerned."""
    release.mkdir(parents=True, exist_ok=True)
    (release / "transformer.onnx").write_bytes(payload)
    (release / "manifest.json").write_text(json.dumps({
        "files": [{"path": "transformer.onnx", "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}],
        "git_sha": "feedbeef", "dvc_lock_digest": "0" * 64, "gate": {"passed": True}}))


def _kill_groups(state: Path) -> None:
    """Backstop after `local.sh stop`: SIGKILL whatever process group a pid file still names."""
    for pidfile in state.glob("*.pid"):
        try:
            os.killpg(int(pidfile.read_text().strip()), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    work = tmp_path_factory.mktemp("prefect_stack")
    repo, state = work / "repo", work / "state"
    for pkg in ("flows", "tasks"):
        shutil.copytree(ROOT / pkg, repo / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (repo / "params.yaml").write_text(yaml.safe_dump({"store": {"backend": "local", "local_root": "registry"}}))
    # the registry already holds r0; artifacts/release holds the next gated release
    from anyflow.store.local import LocalStore

    _write_release(work / "r0", b"weights-r0" * 64)
    store = LocalStore(repo / "registry")
    store.promote(store.put_release(work / "r0", name="r0"))
    _write_release(repo / "artifacts/release", b"weights-r1" * 64)

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(ANYFLOW_PREFECT_PORT=str(port), ANYFLOW_PREFECT_STATE=str(state), PREFECT_HOME=str(work / "home"),
               ANYFLOW_REPO=str(repo), ANYFLOW_VENV=sys.prefix, ANYFLOW_PREFECT_TIMEOUT="240",
               # a lighter server for the test: no UI, no telemetry, no scheduler (nothing runs at 02:00 by chance)
               PREFECT_SERVER_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false", PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
               PREFECT_WORKER_QUERY_SECONDS="1")
    try:
        up = _script(env, "up")
        assert up.returncode == 0, f"deploy/local.sh up failed:\n{up.stdout}\n{up.stderr}"
        env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
        yield {"env": env, "repo": repo, "state": state, "work": work, "up": up}
    finally:
        _script(env, "stop", timeout=60)
        _kill_groups(state)


def test_up_starts_server_pools_every_deployment_and_a_worker(stack):
    env = stack["env"]
    assert urllib.request.urlopen(env["PREFECT_API_URL"] + "/health", timeout=5).status == 200
    pools = {p["name"]: p for p in _api(env, "POST", "/work_pools/filter", {})}
    assert pools["anyflow-local"]["type"] == "process" and pools["anyflow-gpu"]["type"] == "kubernetes"
    assert pools["anyflow-local"]["status"] == "READY"  # a worker polls it
    flows = {f["id"]: f["name"] for f in _api(env, "POST", "/flows/filter", {})}
    deployments = {f"{flows[d['flow_id']]}/{d['name']}": d for d in _api(env, "POST", "/deployments/filter", {})}
    assert {name: d["work_pool_name"] for name, d in deployments.items()} == EXPECTED
    nightly = deployments["anyflow-distill/nightly-refresh"]
    assert [(s["schedule"]["cron"], s["active"]) for s in nightly["schedules"]] == [("0 2 * * *", True)]
    assert nightly["parameters"] == {"repo": ".", "num_shards": 2}
    release = deployments["anyflow-release/release"]
    pull = release["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == str(stack["repo"])  # {{ $ANYFLOW_REPO }} resolved at deploy time
    out = stack["up"].stdout
    assert "deployment run anyflow-release/release" in out and f"{SCRIPT} stop" in out


def test_release_flow_runs_through_the_worker_and_promotes(stack):
    env, repo = stack["env"], stack["repo"]
    run = subprocess.run([str(Path(sys.prefix) / "bin/prefect"), "deployment", "run", "anyflow-release/release",
                          "-p", "action=promote", "-p", "name=r1"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    flow_run_id = next(line.split("UUID:")[1].strip() for line in run.stdout.splitlines() if "UUID:" in line)

    # meanwhile: re-running the script with everything up must reuse it and succeed (idempotent)
    again = subprocess.Popen(["bash", str(SCRIPT), "up"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline, state = time.monotonic() + 240, None
    while time.monotonic() < deadline:
        state = _api(env, "GET", f"/flow_runs/{flow_run_id}")["state"]
        if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            break
        time.sleep(1)
    rerun_out = again.communicate(timeout=300)[0]
    worker_log = (stack["state"] / "worker.log").read_text()[-4000:]
    assert state and state["type"] == "COMPLETED", f"flow run {flow_run_id} ended {state}\n{worker_log}"
    assert again.returncode == 0, rerun_out
    assert "server already running" in rerun_out and "worker already running" in rerun_out
    assert "work pool anyflow-gpu exists" in rerun_out and "work pool anyflow-local exists" in rerun_out

    # the registry: r1 promoted on top of r0, by this flow run
    assert (repo / "registry/latest").read_text().strip() == "r1"
    history = json.loads((repo / "registry/history.json").read_text())
    assert [(e["action"], e["release"], e["previous"]) for e in history] == [("promote", "r0", None),
                                                                              ("promote", "r1", "r0")]
    meta = json.loads((repo / "registry/releases/r1/store.json").read_text())["metadata"]
    assert meta["prefect_flow_run"] == flow_run_id
    assert (repo / "registry/releases/r1/transformer.onnx").read_bytes() == b"weights-r1" * 64


def test_a_deploy_that_stops_half_way_fails_loudly(stack):
    """Prefect's `deploy --all` exits at the first deployment it cannot create and never registers the rest: the
    script must exit non-zero and name every deployment that is not registered."""
    env = dict(stack["env"])
    doc = yaml.safe_load((ROOT / "deploy/prefect.yaml").read_text())
    release = next(d for d in doc["deployments"] if d["name"] == "release")
    doc["deployments"] = [release, {**release, "name": "ghost", "entrypoint": "flows/missing.py:nothing"},
                          {**release, "name": "after-ghost"}]
    broken = stack["work"] / "broken-prefect.yaml"
    broken.write_text(yaml.safe_dump(doc, sort_keys=False))
    env["ANYFLOW_PREFECT_YAML"] = str(broken)
    out = _script(env, "up")
    assert out.returncode == 1, out.stdout + out.stderr
    # Prefect stopped at `ghost`: `after-ghost` was never even tried, and both are named
    assert "NOT registered" in out.stderr, out.stderr
    assert " ghost(pool anyflow-local)" in out.stderr and " after-ghost(pool anyflow-local)" in out.stderr, out.stderr
    names = {d["name"] for d in _api(env, "POST", "/deployments/filter", {})}
    assert "ghost" not in names and "after-ghost" not in names
