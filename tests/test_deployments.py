"""``deploy/prefect.yaml`` loads through Prefect's own deploy-config code, its entrypoints import as flows whose
parameters match, its schedules are valid cron, and work pools are defined once and shared through aliases."""

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PREFECT_YAML = ROOT / "deploy/prefect.yaml"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def configs():
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from prefect.cli.deploy._models import PrefectYamlModel
    from rich.console import Console

    PrefectYamlModel.model_validate(yaml.safe_load(PREFECT_YAML.read_text()))  # raises on a schema error
    deployments, actions = _load_deploy_configs_and_actions(PREFECT_YAML, console=Console(quiet=True))
    return deployments, actions


def test_every_flow_has_a_deployment_and_the_pull_step_is_set(configs):
    deployments, actions = configs
    entrypoints = {d["entrypoint"] for d in deployments}
    assert entrypoints == {"flows/distill.py:distill", "flows/continued_training.py:continued_training",
                           "flows/release.py:release"}
    assert len({d["name"] for d in deployments}) == len(deployments)
    assert actions["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]


def test_entrypoints_load_as_flows_and_parameters_validate(configs):
    from prefect.flows import load_flow_from_entrypoint

    deployments, _ = configs
    for d in deployments:
        path, func = d["entrypoint"].split(":")
        flow = load_flow_from_entrypoint(str(ROOT / path) + ":" + func)
        assert flow.name.startswith("anyflow-")
        flow.validate_parameters(d.get("parameters", {}))  # unknown or mistyped parameters raise


def test_schedules_are_valid_cron_and_the_refresh_is_scheduled(configs):
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule

    deployments, _ = configs
    by_name = {d["name"]: d for d in deployments}
    nightly = [_schedule_config_to_deployment_schedule(s) for s in by_name["nightly-refresh"]["schedules"]]
    assert nightly[0]["schedule"].cron == "0 2 * * *" and nightly[0]["active"] is True
    for d in deployments:
        for s in d.get("schedules") or []:
            _schedule_config_to_deployment_schedule(s)  # CronSchedule validates the expression
    with pytest.raises(Exception):
        _schedule_config_to_deployment_schedule({"cron": "61 25 * * *"})


def test_weekly_domain_refresh_runs_the_encode_clips_stage(configs):
    """The continued-training deployment encodes the domain data first (stages run --single-item, so domain alone
    would train on stale artifacts/domain_data), and the stage it runs exists in continued/dvc.yaml."""
    from flows.continued_training import ENCODE_STAGE

    deployments, _ = configs
    params = {d["name"]: d.get("parameters", {}) for d in deployments}["continued-training"]
    assert params["encode_clips"] is True
    pipeline, stage = ENCODE_STAGE.split(":")
    assert stage in yaml.safe_load((ROOT / pipeline).read_text())["stages"]


def test_work_pools_are_defined_once_and_reused(configs):
    text = PREFECT_YAML.read_text()
    assert text.count("name: anyflow-local") == 1 and text.count("name: anyflow-gpu") == 1
    deployments, _ = configs
    pools = {d["name"]: d["work_pool"]["name"] for d in deployments}
    assert pools == {"nightly-refresh": "anyflow-local", "cluster-distill": "anyflow-gpu",
                     "continued-training": "anyflow-gpu", "release": "anyflow-local"}


# `prefect deploy --all` as an operator runs it (through deploy/local.sh, against a real `prefect server`, every
# deployment's flow/name, pool, schedule and parameters checked): tests/test_prefect_server.py.


def test_layering_flows_never_import_torch_and_the_library_never_imports_prefect():
    import subprocess

    check_flows = ("import sys, flows.distill, flows.release, flows.continued_training, tasks.stages; "
                   "assert 'torch' not in sys.modules, 'a flow imported torch'")
    check_lib = ("import sys, anyflow.store, anyflow.store.local, anyflow.store.lakefs, anyflow.stages.promote, "
                 "anyflow.stages.pull; assert 'prefect' not in sys.modules and 'torch' not in sys.modules")
    for code in (check_flows, check_lib):
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    offenders = [str(p) for p in (ROOT / "anyflow").rglob("*.py")
                 if "import prefect" in p.read_text() or "from prefect" in p.read_text()]
    assert offenders == []
