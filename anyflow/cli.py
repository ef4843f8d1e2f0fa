"""``anyflow <command>``: one subcommand per pipeline stage (each is a DVC stage's ``cmd``) plus ops commands.

Each command lives in ``anyflow/stages/<module>.py`` and exposes ``add_arguments(parser)`` (optional) and
``main(cfg, args) -> int``. The config is loaded here, once, at the edge: ``--params`` file, ``--profile`` and
``--set key=value`` overrides. Only the chosen command's module is imported (its options are added to the parser
then), so a stage does not pay for the imports of every other one (torch, diffusers, onnx, dvc, ...) and
``anyflow --help`` imports none of them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

import yaml

COMMANDS: dict[str, tuple[str, str]] = {
    "teacher": ("teacher", "train the toy Wan teacher (or verify a local Wan2.1 directory)"),
    "synthesize": ("synthesize", "teacher ODE samples -> latent shards"),
    "stage1": ("stage1", "forward flow-map training of the any-step student"),
    "stage2": ("stage2", "on-policy flow-map distillation (backward simulation + DMD)"),
    "gate": ("gate", "quality across step budgets; exits non-zero when the gate fails"),
    "gate-reference": ("gate_reference", "the gate's teacher rows (teacher 50×CFG and N×CFG), computed once"),
    "gate-baseline": ("gate_baseline", "the gate's baseline rows (the consistency student), computed beside stage 2"),
    "gate-sanity": ("gate_sanity", "the gate's scorers must rank known-better videos higher; exits 1 if not"),
    "export": ("export", "merge LoRA, save diffusers dir, export ONNX, write the release manifest"),
    "generate": ("generate", "any-step generation from an exported release (torch/onnxruntime/tensorrt)"),
    "domain": ("domain", "continued training of the distilled student on a new domain"),
    "encode-clips": ("encode_clips", "encode a folder of mp4s + captions into latent shards"),
    "promote": ("promote", "promote a gated release to the store (local or lakeFS)"),
    "pull": ("pull", "fetch a release from the store and verify every sha256"),
    "params": ("params", "print the effective parameters (or write a profile's params.yaml)"),
    "bench": ("bench", "benchmarks recorded as DVC metrics (simulation cost, inference latency)"),
    "fvd-net": ("fvd_net", "train the toy FVD's feature network (distribution fidelity for the gate)"),
    "repro": ("repro", "dvc repro with independent stages side by side (--jobs, default 2)"),
    "ablate": ("ablate", "issue [I]'s per-change ablation: one variant's training and gate rows, or the table"),
    "fixture": ("fixture", "write a random-weight test fixture (wan-mini: the Wan2.1-T2V-1.3B-Diffusers layout)"),
    "wan-smoke": ("smoke", "the wan-1.3b profile end to end on the wan-mini fixture, in a temporary workspace"),
}


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected key=value (e.g. stage1.max_steps=10)")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter, e.g. --set stage1.max_steps=10 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true")


def command_in(argv: list[str]) -> str | None:
    """The command named in ``argv`` (after the global options), or None."""
    pre = argparse.ArgumentParser(add_help=False)
    _global_options(pre)
    pre.add_argument("command", nargs="?")
    known, _ = pre.parse_known_args(argv)
    return known.command if known.command in COMMANDS else None


def build_parser(only: str | None | bool = True) -> argparse.ArgumentParser:
    """Every command's subparser; the options of ``only`` (a command name), of every command (True), or of none
    (None: what ``anyflow --help`` and an unknown command need)."""
    parser = argparse.ArgumentParser(prog="anyflow", description=__doc__.splitlines()[0])
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if only is not True and name != only:
            continue
        try:
            mod = importlib.import_module(f"anyflow.stages.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"anyflow.stages.{module}":
                raise
            p.set_defaults(_missing=True)
            continue
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    from anyflow.config import ConfigError, build, load, nest

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=command_in(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if getattr(args, "_missing", False):
        print(f"anyflow {args.command}: not available in this build", file=sys.stderr)
        return 2
    mod = importlib.import_module(f"anyflow.stages.{args._module}")
    try:
        if not getattr(mod, "USES_PARAMS", True):  # e.g. `anyflow fixture`: no params file needed
            cfg = build({})
        elif args.command == "params" and getattr(args, "profile", None):
            cfg = build(nest(_parse_set(args.overrides)), profile=args.profile)  # bootstrapping a params file
        else:
            cfg = load(args.params, overrides=_parse_set(args.overrides))
    except ConfigError as err:
        print(f"anyflow: invalid parameters: {err}", file=sys.stderr)
        return 2
    try:
        return int(mod.main(cfg, args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        if args.verbose:
            raise
        print(f"anyflow {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
