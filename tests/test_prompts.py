"""Prompts for real models (`data.prompts_file`): a user file, or VBench's suite read from the installed `vbench`
package without importing it; a clear error naming the field and both options otherwise."""

import json
import sys

import pytest

from anyflow.config import ConfigError, build
from anyflow.data import prompts as P
from anyflow.stages import synthesize

SUITE = [{"prompt_en": "a dog running on the beach", "dimension": ["subject_consistency"]},
         {"prompt_en": "a red car", "dimension": ["color"], "auxiliary_info": {"color": {"color": "red"}}},
         {"prompt_en": "a dog running on the beach", "dimension": ["dynamic_degree"]},  # VBench repeats prompts
         {"prompt_en": " a bird flying, camera pans left ", "dimension": ["camera_motion"]}]


def _wan(prompts_file):
    return build({"model": {"pretrained_dir": "unused"}, "data": {"prompts_file": prompts_file}}, profile="wan-1.3b")


@pytest.fixture
def fake_vbench(tmp_path, monkeypatch):
    """A `vbench` package on sys.path whose import would fail: reading the suite must not import it."""
    pkg = tmp_path / "site" / "vbench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('vbench must not be imported to read its prompts')\n")
    (pkg / "VBench_full_info.json").write_text(json.dumps(SUITE))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "vbench", raising=False)
    return pkg


@pytest.fixture
def no_vbench(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vbench" else real(name, *a))


def test_user_prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("  a cat on a sofa  \n\n\ta panda eating bamboo\nzoom in on a lighthouse\n")
    assert synthesize.load_prompts(_wan(str(f))) == ["a cat on a sofa", "a panda eating bamboo",
                                                     "zoom in on a lighthouse"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(P.PromptsError, match=r"data.prompts_file .*empty.txt: no prompts"):
        P.load_prompts(str(tmp_path / "empty.txt"))


def test_vbench_suite_from_the_installed_package_without_importing_it(fake_vbench):
    assert P.vbench_info_path() == fake_vbench / "VBench_full_info.json"
    got = synthesize.load_prompts(_wan("vbench"))
    assert got == ["a dog running on the beach", "a red car", "a bird flying, camera pans left"]  # unique, in order
    assert "vbench" not in sys.modules


def test_wan_profiles_default_to_the_vbench_suite(fake_vbench):
    for profile in ("wan-1.3b", "wan-14b"):
        cfg = build({"model": {"pretrained_dir": "unused"}}, profile=profile)
        assert synthesize.load_prompts(cfg)[0] == "a dog running on the beach"


def test_missing_sources_name_the_field_and_both_options(tmp_path, no_vbench):
    both = r"text file with one prompt per line, or to 'vbench'.*installed `vbench` package"
    with pytest.raises(P.PromptsError, match=rf"data.prompts_file .*nope.txt: not found; set data.prompts_file.*{both}"):
        synthesize.load_prompts(_wan(str(tmp_path / "nope.txt")))
    with pytest.raises(P.PromptsError, match=rf"data.prompts_file: 'vbench': the vbench package is not installed; .*"
                                             rf"{both}"):
        synthesize.load_prompts(_wan("vbench"))
    with pytest.raises(P.PromptsError, match=rf"data.prompts_file: not set .*{both}"):
        P.load_prompts(None)
    assert isinstance(P.PromptsError("x"), FileNotFoundError)  # the CLI prints it as one line, exit 1


def test_vbench_installed_without_its_suite(fake_vbench):
    (fake_vbench / "VBench_full_info.json").unlink()
    with pytest.raises(P.PromptsError, match="the vbench package ships no VBench_full_info.json"):
        P.load_prompts("vbench")
    (fake_vbench / "VBench_full_info.json").write_text(json.dumps([{"dimension": ["color"]}]))
    with pytest.raises(P.PromptsError, match="record 0 has no 'prompt_en'"):
        P.load_prompts("vbench")


def test_config_requires_a_prompt_source_for_real_models():
    with pytest.raises(ConfigError, match="data.prompts_file: required when model.source=local: a text file .* "
                                          "or 'vbench'"):
        _wan(None)
    assert build().data.prompts_file is None  # toy: its own generated prompts
