"""Worker for tests/test_stage1.py::test_two_rank_ddp_step_equals_one_process (run under torch.distributed.run)."""

import sys

import torch

from dataclasses import replace

from stage1_fixtures import CFG, make_trainer

if __name__ == "__main__":
    out, target = sys.argv[1], sys.argv[2]
    trainer = make_trainer(ckpt_dir=None, cfg=replace(CFG, stage1=replace(CFG.stage1, guidance_target=target)))
    trainer.train(2, progress=False)
    if trainer.acc.is_main_process:
        torch.save({"params": trainer.adapter_state(), "loss": [r["loss"] for r in trainer.state.history],
                    "world": trainer.acc.num_processes}, out)
    trainer.acc.wait_for_everyone()
