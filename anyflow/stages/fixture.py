"""``anyflow fixture wan-mini --out DIR``: write a random-weight test fixture (no parameters file needed).

``wan-mini``: the file layout and classes of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` with few channels
(:mod:`anyflow.models.wan_fixture`); seeded, so the same ``--seed`` writes the same tensors.
"""

from __future__ import annotations

import logging
import time

from anyflow.config import Config

log = logging.getLogger(__name__)

USES_PARAMS = False  # anyflow/cli.py: runs without a params.yaml (the fixture depends on --seed only)
FIXTURES = ("wan-mini",)


def add_arguments(parser) -> None:
    parser.add_argument("name", choices=FIXTURES, help="which fixture to write")
    parser.add_argument("--out", required=True, metavar="DIR", help="directory to write (replaced if it exists)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the tokenizer corpus")


def main(cfg: Config, args) -> int:
    from anyflow.models import wan_fixture

    t0 = time.time()
    out = wan_fixture.write(args.out, seed=args.seed)
    log.info("fixture %s: wrote %s in %.1f s", args.name, out, time.time() - t0)
    print(out)
    return 0
