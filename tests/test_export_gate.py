"""``anyflow export --gate``: which verdict a release ships with, and where its metrics go (no model needed)."""

import argparse
import json
from pathlib import Path

import pytest

from anyflow.stages.export import add_arguments, gate_verdict, metrics_name


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def reports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # reports name adapters relative to the repository root, as the stages write them
    stage2, domain = Path("artifacts/stage2/ema_adapter.safetensors"), Path("artifacts/domain/ema_adapter.safetensors")
    gate = _write(Path("artifacts/gate/report.json"),
                  {"passed": True, "failed": [], "candidate": {"adapter": str(stage2), "paradigm": "flowmap"}})
    dom = _write(Path("artifacts/domain/report.json"),
                 {"passed": True, "failed": [], "candidate": {"adapter": str(domain), "base_adapter": str(stage2)}})
    return stage2, domain, gate, dom


def test_the_verdict_ships_only_with_the_adapter_it_judged(reports):
    stage2, domain, gate, dom = reports
    assert gate_verdict([gate], stage2)["passed"] is True
    assert gate_verdict([dom], domain)["passed"] is True
    # same file, spelled differently (absolute vs relative) is the same adapter
    assert gate_verdict([gate], stage2.resolve())["passed"] is True

    wrong = gate_verdict([gate], domain)  # the domain student under stage 2's verdict
    assert wrong["passed"] is False
    assert str(stage2) in wrong["reason"] and str(domain) in wrong["reason"] and str(gate) in wrong["reason"]
    assert gate_verdict([dom], stage2)["passed"] is False


def test_a_failing_verdict_stays_failed_and_reports_without_an_adapter_keep_their_verdict(reports, tmp_path):
    stage2, domain, gate, dom = reports
    _write(dom, {"passed": False, "failed": ["forgetting@1"], "candidate": {"adapter": str(domain)}})
    out = gate_verdict([dom], domain)
    assert out["passed"] is False and out["failed"] == ["forgetting@1"] and "reason" not in out
    # metrics/gate.json names no adapter: its verdict is taken as it is (today's behaviour)
    bare = _write(tmp_path / "metrics/gate.json", {"passed": True, "candidate": {"total": 0.8}})
    assert gate_verdict([bare], domain)["passed"] is True
    assert gate_verdict([tmp_path / "missing.json"], domain)["passed"] is False


def test_metrics_file_follows_the_release_directory():
    assert metrics_name(Path("artifacts/release")) == "export"
    assert metrics_name(Path("artifacts/release_domain")) == "export_domain"
    assert metrics_name(Path("/tmp/x/candidate")) == "export_candidate"
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--adapter", "a.safetensors", "--gate", "artifacts/domain/report.json",
                         "--out", "artifacts/release_domain"])
    assert (args.gate, args.out) == ("artifacts/domain/report.json", "artifacts/release_domain")
    assert p.parse_args([]).gate is None
