import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

# `make test` runs the suite on two workers (pytest-xdist, --dist loadfile: a file stays on one worker, so its
# module fixtures are built once). With --no-loadscope-reorder files are handed out in collection order (xdist's
# default reorders them by their number of tests, which started the one-test 6-minute e2e file near the end), so
# the longest go first — otherwise one of them starts last and the other worker idles. Longest first, from `pytest --durations` on the 2-core CI
# machine (2026-12-02); files not listed keep their order after these.
LONGEST_FIRST = ("test_e2e_toy.py", "test_far_training.py", "test_kill_resume.py", "test_gate_stage.py",
                 "test_flows.py", "test_prefect_server.py", "test_far_release_onnx.py", "test_far_onnx.py",
                 "test_stage2.py", "test_far_stage2.py", "test_domain.py", "test_stage1.py", "test_export_onnx.py",
                 "test_repro.py", "test_synthesis_dask.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: in-file order kept

# A tiny Wan transformer with the toy profile's geometry (random weights): for tests that need a model but not a
# trained teacher. Latents are (B, C=8, F=5, H=8, W=8); text embeddings (B, L=8, D=64).
TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=8,
                text_dim=64, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, eps=1e-6,
                rope_max_seq_len=64)


def make_tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(**TINY_WAN).eval()
    # diffusers zero-inits nothing we rely on, but make the output layer non-trivial so tests can't pass vacuously
    with torch.no_grad():
        model.proj_out.weight.normal_(0, 0.05)
    return model


@pytest.fixture
def one_thread():
    """torch on one thread for the test (restored after): the FAR tests time and compare on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_wan():
    return make_tiny_wan()


# One Prefect API for the whole session (it takes ~20 s to start): flow and deployment tests share it.
@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def shared_build(tmp_path_factory, name: str, build):
    """Build an expensive, read-only test artefact ONCE per test session, also across pytest-xdist workers: the
    first worker to ask runs ``build(dir)`` under a file lock in the session's shared temp root and marks it
    complete; the others wait and reuse it. (Per-worker session fixtures built the toy teacher and the FAR release
    once per worker and module: ~5 min of the suite's CPU on 2 cores.) Callers must not write into ``dir``."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker has its own basetemp under one shared parent
        root = root.parent
    target = root / f"shared-{name}"
    with FileLock(str(target) + ".lock"):
        if not (target / ".complete").is_file():
            import shutil

            shutil.rmtree(target, ignore_errors=True)  # a build that raised part-way is started over
            target.mkdir(parents=True)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                build(target)
            finally:
                torch.set_num_threads(threads)
            (target / ".complete").touch()
    return target


# [F] export: one tiny exported release (random tiny teacher + random student LoRA → anyflow export), shared by
# tests/test_export_onnx.py and tests/test_generate.py (~30 s on 2 cores, built once per session across workers;
# read-only — test_failed_export_leaves_previous_release_untouched runs a failing export at it, which must not touch
# it, and is what checks that).
@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    from export_fixtures import tiny_config, write_tiny_artifacts

    from anyflow.stages.export import ExportOutputs, metrics_name, run

    def export(root):
        run(write_tiny_artifacts(root))

    root = shared_build(tmp_path_factory, "tiny_release", export)
    cfg = tiny_config(root)
    release = root / "artifacts" / "release"
    return cfg, root, ExportOutputs(release, release / "manifest.json",
                                    root / "metrics" / f"{metrics_name(release)}.json")


# [A] toy teacher: a MINIMAL toy teacher trained through the real code path (anyflow.models.toy_teacher.train, few
# steps; ~2.5 min on the 2-core CI machine) and saved as a WanPipeline directory, built once per session across xdist
# workers (shared_build; read-only). Reuse it wherever a test needs a
# *trained* teacher dir (load with anyflow.models.teacher.load_teacher). Returns (cfg, path). Its VAE keeps colour
# and position (tests/test_teacher.py); its transformer is barely trained (do not test semantics with it).
@pytest.fixture(scope="session")
def toy_teacher_dir(tmp_path_factory):
    from anyflow.config import build
    from anyflow.models import toy_teacher

    cfg = build({"teacher": {"vae_image_steps": 300, "vae_image_batch_size": 16, "vae_steps": 0, "vae_batch_size": 2,
                             "vae_lr": 3e-3, "steps": 40, "batch_size": 8},
                 "synthesize": {"num_samples": 6, "samples_per_shard": 2, "batch_size": 2, "steps": 4,
                                "threads": 1}})  # tests run on one thread beside the other xdist worker

    def train(root):
        teacher, _ = toy_teacher.train(cfg, progress=False)
        toy_teacher.save(teacher, root / "teacher")

    return cfg, shared_build(tmp_path_factory, "toy_teacher", train) / "teacher"
