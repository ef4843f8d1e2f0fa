"""Issue [I]'s ablation (``anyflow ablate``, ``ablation/dvc.yaml``): each variant reverts what it says, through params
that validate; the DMD weight scales the generator's DMD term; the table joins the variants' gate rows with one
dead-dimension rule. (The training itself is the stages' own, tested in test_stage1/test_stage2.)"""

from types import SimpleNamespace

import pytest
import torch

import anyflow.train.stage2 as st2
from anyflow.config import Config, ConfigError, build, to_dict, with_overrides
from anyflow.objectives.dmd import DMDOut
from anyflow.stages import ablate


def test_every_variant_is_a_valid_config_that_differs_from_the_default_only_where_it_says():
    cfg = build({})  # the toy profile (params.yaml's)
    base = to_dict(cfg)
    for name in ablate.VARIANTS:
        over = ablate.variant_overrides(cfg, name)
        got = to_dict(with_overrides(cfg, over))
        changed = {f"{s}.{k}" for s in base if isinstance(base[s], dict) for k in base[s] if base[s][k] != got[s][k]}
        changed |= {f"{s}.optim.{k}" for s in ("stage1", "stage2") for k in base[s]["optim"]
                    if base[s]["optim"][k] != got[s]["optim"][k]}
        changed -= {"stage1.optim", "stage2.optim"}
        assert changed == set(over), name  # each override changes its value (none is the default already)
    assert ablate.variant_overrides(cfg, "real_score_w_plus_1") == {"stage2.real_guidance_scale":
                                                                    cfg.stage1.guidance_scale + 1}
    fixes = [n for n in ablate.VARIANTS if n not in ("final", "before_all", *ablate.CHOICES)
             and not n.startswith("seed_")]
    union = {k: v for n in fixes for k, v in ablate.variant_overrides(cfg, n).items()}
    assert len(fixes) == 6  # [I] 1-6, one variant each
    assert ablate.variant_overrides(cfg, "before_all") == union and len(union) == 7


def test_choice_variants_set_the_reference_values_back():
    """The project's post-[I] choices, each reverted to the reference's value: CFG at every t (NVlabs/AnyFlow and
    Wan2.1 sample so; the wan profiles keep it), the co-trained stage-1 term at weight 1 over the earlier 300 steps."""
    cfg = build({})
    assert cfg.model.guidance_min_t > 0 and cfg.stage2.stage1_weight != 1.0
    assert ablate.variant_overrides(cfg, "guidance_everywhere") == {"model.guidance_min_t": 0.0}
    assert ablate.variant_overrides(cfg, "stage2_300_steps_weight_1") == {"stage2.max_steps": 300,
                                                                          "stage2.stage1_weight": 1.0}
    assert ablate.VARIANTS["guidance_everywhere"][2] and not ablate.VARIANTS["stage2_300_steps_weight_1"][2]
    from anyflow.profiles import PROFILES

    for name in ("wan-1.3b", "wan-14b"):
        wan = PROFILES[name]()
        assert wan.model.guidance_min_t == 0.0 and wan.stage2.stage1_weight == 1.0, name


def test_an_unknown_override_names_the_key():
    with pytest.raises(ConfigError, match="stage2.dmd_wieght: unknown key"):
        with_overrides(Config(), {"stage2.dmd_wieght": 0.5})
    with pytest.raises(ValueError, match="unknown variant 'x'"):
        ablate.variant_overrides(Config(), "x")


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_dmd_weight_scales_the_generators_dmd_term(monkeypatch, weight):
    monkeypatch.setattr(st2, "generator_dmd_loss", lambda *a: DMDOut(torch.tensor(3.0), 0.0, a[3]))
    monkeypatch.setattr(st2, "use_adapter", lambda *a, **k: None)
    cfg = with_overrides(build({}), {"stage2.dmd_weight": weight})
    batch = SimpleNamespace(latents=torch.zeros(2, 1, 1, 1, 1), prompt_embeds=torch.zeros(2, 1, 1),
                            index=torch.arange(2))
    rollout = st2.Rollout(model=None, simulate=lambda noise, text, n, k, trainable: noise)
    loss, parts = st2.generator_loss(None, cfg, batch, torch.zeros(1, 1, 1), torch.Generator().manual_seed(0),
                                     stage1_loss_fn=lambda: torch.tensor(2.0), rollout=rollout)
    # DMD × dmd_weight + the stage-1 term × stage2.stage1_weight (4 on the toy)
    assert float(loss) == pytest.approx(3.0 * weight + cfg.stage2.stage1_weight * 2.0) and parts["dmd"] == 3.0


def _entry(total_shift: float, shape: float) -> dict:
    d = 0.01 * total_shift  # every live dimension moves with the variant (a constant one would be dead)
    dims = {"color": 1.0 - d, "direction": 0.9 - d, "shape": shape, "temporal_flickering": 0.95 - d,
            "subject_consistency": 0.9 - d, "dynamic_degree": 1.0 - d, "background_cleanliness": 1.0 - d}
    return {"by_nfe": {n: {"dimensions": {**dims, "motion_smoothness": 0.9 - total_shift * int(n) / 32},
                           "fidelity": {"latent_distance": 1.0 / int(n), "frechet": 0.1 / int(n)}, "total": 0.0}
                       for n in ("1", "2")}}


def test_table_joins_the_variants_with_one_dead_dimension_rule(tmp_path):
    cfg = with_overrides(build({}), {"paths.root": str(tmp_path), "gate.nfes": [1, 2]})
    out = tmp_path / ablate.OUT
    out.mkdir()
    from anyflow.utils.io import write_json

    teacher = _entry(0.0, 0.4)
    for i, name in enumerate(ablate.VARIANTS):
        write_json(out / f"{name}.json", {
            "variant": name, "reverts": ablate.VARIANTS[name][0], "overrides": {}, "retrained_stage1": False,
            "entries": {"stage1": _entry(0.1 * i, 0.4), "stage2": _entry(0.2 * i, 0.4)},
            "teacher": {"dimensions": teacher["by_nfe"]["2"]["dimensions"]},
            "teacher_at_budget": teacher["by_nfe"]})
    t = ablate.table(cfg)
    assert set(t["dead_dimensions"]) == {"shape"}  # the teacher scores 0.4 < floor 0.5: dropped from every Total
    assert len(t["rows"]) == 2 * len(ablate.VARIANTS)
    # a variant with more motion-smoothness loss scores a lower Total, at every NFE, the same way in every row
    totals = [t["rows"][f"{n}/stage2"]["total"]["2"] for n in ablate.VARIANTS]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]
    assert t["rows"]["final/stage1"]["latent_distance"] == {"1": 1.0, "2": 0.5}
    seeded = ["final"] + [f"seed_{s}" for s in ablate.SEEDS]
    totals_by = {n: t["rows"][f"{n}/stage2"]["total"]["2"] for n in seeded}
    assert t["seed_spread"]["stage2"]["total"]["2"] == pytest.approx(max(totals_by.values()) - min(totals_by.values()))
    md = ablate.markdown(t)
    assert md.count("| final | stage2 |") == 3 and "teacher N steps × CFG" in md
    (out / "final.json").unlink()
    with pytest.raises(FileNotFoundError, match="final"):
        ablate.table(cfg)


def test_the_ablation_pipeline_loads_and_has_a_stage_per_variant():
    """DVC loads every pipeline of the repository together (no output claimed by two stages) and
    ablation/dvc.yaml runs each variant once, the table reading every variant's result."""
    from pathlib import Path

    import yaml
    from dvc.repo import Repo

    root = Path(__file__).resolve().parents[1]
    assert len(Repo(str(root)).index.stages) > 0  # raises on a duplicated output or a broken dvc.yaml
    stages = yaml.safe_load((root / "ablation" / "dvc.yaml").read_text())["stages"]
    assert {k for k in stages if k.startswith("ablate_")} == {f"ablate_{n}" for n in ablate.VARIANTS}
    for n in ablate.VARIANTS:
        assert stages[f"ablate_{n}"]["outs"] == [f"artifacts/ablation/{n}.json"], n
        assert f"--variant {n} " in stages[f"ablate_{n}"]["cmd"] + " ", n
    assert sorted(stages["ablation_table"]["deps"][2:]) == sorted(f"artifacts/ablation/{n}.json"
                                                                  for n in ablate.VARIANTS)
