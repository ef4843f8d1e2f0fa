"""Synthesis: deterministic, resumable after a crash (byte-identical shards), distributable, verified on load."""

import dataclasses

import pytest

from anyflow.data.shards import ShardError, ShardSet
from anyflow.stages import synthesize
from anyflow.utils.io import sha256_file

pytestmark = pytest.mark.slow


def _files(root):
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.safetensors"))}


def test_resume_and_shards_byte_identical(toy_teacher_dir, tmp_path):
    cfg, teacher = toy_teacher_dir
    full = tmp_path / "full"
    m = synthesize.run(cfg, teacher, full, progress=False)
    assert m["shards_written"] == 3 and m["samples"] == 6
    with pytest.raises(RuntimeError, match="simulated crash"):
        synthesize.run(cfg, teacher, tmp_path / "resumed", progress=False, fail_after=1)
    m2 = synthesize.run(cfg, teacher, tmp_path / "resumed", progress=False)
    assert m2["shards_skipped"] == 1 and m2["shards_written"] == 2
    assert _files(full) == _files(tmp_path / "resumed")
    for i in range(2):  # --shard i/2 runs in the same directory merge into the same data
        synthesize.run(cfg, teacher, tmp_path / "split", shard=(i, 2), progress=False)
    assert _files(full) == _files(tmp_path / "split")
    batch = ShardSet(full).load_all()
    assert batch.latents.shape == (6, cfg.model.vae_z_dim, 5, 8, 8)
    assert batch.prompts[:2] == synthesize.load_prompts(cfg)[:2]


def test_corrupt_or_missing_shard_names_file(toy_teacher_dir, tmp_path):
    cfg, teacher = toy_teacher_dir
    cfg = dataclasses.replace(cfg, synthesize=dataclasses.replace(cfg.synthesize, num_samples=2))
    synthesize.run(cfg, teacher, tmp_path, progress=False)
    shard = tmp_path / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-00000.safetensors"):
        ShardSet(tmp_path).load_all()
    # a re-run detects the mismatch against its sidecar and regenerates the shard
    synthesize.run(cfg, teacher, tmp_path, progress=False)
    ShardSet(tmp_path).load_all()
    shard.unlink()
    with pytest.raises(ShardError, match="shard-00000.safetensors.*missing"):
        ShardSet(tmp_path).load_all()


def test_bad_shard_argument():
    assert synthesize.parse_shard("1/3") == (1, 3)
    with pytest.raises(ValueError, match="--shard"):
        synthesize.parse_shard("3/3")
