"""The child side of tests/test_kill_resume.py: ``anyflow.cli.main(argv)`` in a process of its own that the test
SIGKILLs at a deterministic point.

Processes are forked from a ``multiprocessing`` forkserver that imported this module (and with it torch, diffusers,
peft, onnx and every stage module) once, so a run costs the stage's work and not ~15 s of imports; each run is still
a separate OS process running the real CLI, killed with a real SIGKILL.

Kill points are ``hooks``: ``(module, attribute, nth, "before"|"after")`` wraps that function (or class method);
on its ``nth`` call (before or after the call) the child writes ``marker`` and blocks, so the test kills it in a
known state instead of after a sleep.
"""

from __future__ import annotations

import functools
import importlib
import os
import sys
import time

import anyflow.cli  # noqa: F401  (the forkserver preloads everything a stage imports)
import anyflow.stages.domain  # noqa: F401
import anyflow.stages.encode_clips  # noqa: F401
import anyflow.stages.export  # noqa: F401
import anyflow.stages.gate  # noqa: F401
import anyflow.stages.promote  # noqa: F401
import anyflow.stages.stage2  # noqa: F401
import anyflow.stages.synthesize  # noqa: F401
import anyflow.train.selfdistill  # noqa: F401
import anyflow.train.stage2  # noqa: F401


def _preload_heavy() -> None:
    """What the stages import lazily (torch, diffusers, peft, onnx …): imported here, once, before any fork."""
    import diffusers  # noqa: F401
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    from diffusers import AnyFlowPipeline, AutoencoderKLWan, WanPipeline, WanTransformer3DModel  # noqa: F401

    for mod in ("anyflow.models.student", "anyflow.models.teacher", "anyflow.sampling", "anyflow.eval.report",
                "anyflow.eval.vbench_like", "anyflow.eval.fidelity", "anyflow.export.onnx_export",
                "anyflow.export.manifest", "anyflow.export.runtime", "anyflow.export.far_release",
                "anyflow.store", "anyflow.store.local", "anyflow.data.shards", "anyflow.objectives.flowmap",
                "matplotlib.pyplot", "imageio.v2", "tqdm.auto"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


_preload_heavy()


def _pause(marker: str) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    tmp = marker + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(str(os.getpid()))
    os.replace(tmp, marker)
    while True:  # the test SIGKILLs us here
        time.sleep(60)


def _install(module: str, attribute: str, nth: int, when: str, marker: str) -> None:
    owner = importlib.import_module(module)
    *parents, name = attribute.split(".")
    for p in parents:
        owner = getattr(owner, p)
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth and when == "before":
            _pause(marker)
        out = original(*args, **kwargs)
        if calls[0] == nth and when == "after":
            _pause(marker)
        return out

    setattr(owner, name, wrapper)


def run_cli(cwd: str, argv: list[str], log: str, hooks=(), marker: str | None = None) -> None:
    """Child entry point: ``anyflow <argv>`` in ``cwd``, stdout/stderr to ``log``, exit with its return code."""
    os.chdir(cwd)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    import torch

    torch.set_num_threads(1)
    for module, attribute, nth, when in hooks:
        _install(module, attribute, nth, when, marker)
    rc = 1
    try:
        rc = anyflow.cli.main(list(argv))
    except SystemExit as err:
        rc = err.code if isinstance(err.code, int) else 1
    except BaseException:  # noqa: BLE001 — the traceback goes to the log
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(int(rc or 0))
