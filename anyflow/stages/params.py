"""``anyflow params``: show the effective parameters, or write a profile's full ``params.yaml``."""

from __future__ import annotations

import argparse

from anyflow.config import Config, dump_yaml
from anyflow.utils.io import atomic_write_text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None, help="start from this profile's defaults (toy, wan-1.3b, wan-14b) "
                   "instead of the params file")
    p.add_argument("--write", metavar="FILE", help="write the parameters to FILE (a complete params.yaml)")


def main(cfg: Config, args: argparse.Namespace) -> int:
    if args.write:
        text = ("# Complete parameters for the %r profile; DVC stages track these keys.\n"
                "# Regenerate with: anyflow params --profile %s --write params.yaml\n" % (cfg.profile, cfg.profile)
                + dump_yaml(cfg))
        atomic_write_text(args.write, text)
        print(f"wrote {args.write}")
    else:
        print(dump_yaml(cfg), end="")
    return 0
