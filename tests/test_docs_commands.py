"""Every command in a fenced block of README.md, CONTRIBUTING.md and docs/*.md names something that exists: an
``anyflow`` command line parses with the CLI's own parser (its subcommand and every flag), a ``make`` target is in the
Makefile, a ``dvc repro`` target is a pipeline file or stage, a ``python -m`` module imports. The commands that run
the pipelines themselves (make demo, dvc repro) are run verbatim by CI and tests/test_e2e_toy.py; this catches the
cheap mistakes — a renamed flag, a dropped target — in the blocks nobody runs on every change. README's one example
with its output (an invalid parameter) is run and its output compared."""

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]


def commands(path: Path) -> list[tuple[str, list[str]]]:
    """(shell line, argv) of every command in the file's fenced shell blocks: continuation lines joined, comments and
    ``$ `` prompts dropped, ``VAR=value`` lines substituted into later lines of the block, heredoc bodies skipped."""
    out = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", path.read_text(), re.S):
        if lang not in ("", "bash", "sh", "console") or (lang == "" and re.search("[→─►┬┤└]", body)):
            continue  # another language, or a diagram
        env, heredoc = {}, None
        for line in body.replace("\\\n", " ").splitlines():
            if heredoc is not None:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            elif lang == "" and not re.match(r"(anyflow|make|dvc|python|\.venv/bin/)\S*\s", line):
                continue  # an unlabelled block holds output too: only lines that are commands
            m = re.search(r"<<'?(\w+)'?", line)
            if m:
                heredoc = m.group(1)
            try:
                argv = shlex.split(line, comments=True)
            except ValueError:
                continue
            if not argv or argv[0].startswith("#"):
                continue
            if len(argv) == 1 and re.fullmatch(r"[A-Z_]+=\S+", argv[0]):
                key, value = argv[0].split("=", 1)
                env[key] = value
                continue
            argv = [re.sub(r"\$(\w+)", lambda m: env.get(m.group(1), m.group(0)), a) for a in argv]
            out.append((line, argv))
    return out


ALL = [(p.name, line, argv) for p in DOCS for line, argv in commands(p)]


def _strip(argv: list[str]) -> list[str]:
    """The command proper: env assignments, ``.venv/bin/`` and a ``for … do`` prefix removed."""
    while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
        argv = argv[1:]
    if argv and argv[0] == "for" and "do" in argv:
        argv = argv[argv.index("do") + 1:]
        while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
            argv = argv[1:]
    if argv:
        argv = [argv[0].removeprefix(".venv/bin/"), *argv[1:]]
    for sep in ("&&", "|", "&", ";"):
        if sep in argv:
            argv = argv[:argv.index(sep)]
    return argv


def test_the_docs_have_commands_to_check():
    kinds = {_strip(a)[0] for _, _, a in ALL if _strip(a)}
    assert {"anyflow", "make", "dvc"} <= kinds, kinds


@pytest.mark.parametrize("doc,line,argv", [x for x in ALL if _strip(x[2])[:1] == ["anyflow"]],
                         ids=lambda x: x if isinstance(x, str) and len(x) < 60 else None)
def test_anyflow_command_lines_parse(doc, line, argv):
    from anyflow.cli import build_parser

    args = _strip(argv)[1:]
    try:
        build_parser().parse_args(args)
    except SystemExit as err:  # argparse exits 2 on an unknown command or flag
        pytest.fail(f"{doc}: `{line}` does not parse (exit {err.code})")


def test_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    for doc, line, argv in ALL:
        a = _strip(argv)
        if a[:1] == ["make"]:
            for t in (x for x in a[1:] if not x.startswith("-") and "=" not in x):
                assert t in targets, f"{doc}: `{line}`: no make target {t!r}"


def test_dvc_repro_targets_exist():
    for doc, line, argv in ALL:
        a = _strip(argv)
        if a[:2] != ["dvc", "repro"]:
            continue
        for t in (x for x in a[2:] if not x.startswith("-") and not x.startswith("<")):
            file, _, stage = t.partition(":")
            if file.endswith("dvc.yaml"):
                assert (ROOT / file).is_file(), f"{doc}: `{line}`: no pipeline {file}"
                if stage:
                    assert stage in yaml.safe_load((ROOT / file).read_text())["stages"], f"{doc}: `{line}`"
            else:
                assert t in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"], f"{doc}: `{line}`"


def test_python_modules_import():
    for doc, line, argv in ALL:
        a = _strip(argv)
        if a[:2] == ["python", "-m"]:
            importlib.import_module(a[2])
        elif a[:1] in (["torchrun"], ["accelerate"]) and "-m" in a:
            importlib.import_module(a[a.index("-m") + 1])


def test_readmes_invalid_parameter_example_prints_what_it_shows(tmp_path):
    """README's example of a bad value: run verbatim in a copy of params.yaml's directory, the message it shows."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"```\n\$ (anyflow [^\n]+)\n(anyflow: [^\n]+)\n```", text)
    assert m, "README lost its invalid-parameter example"
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    argv = shlex.split(m.group(1))
    out = subprocess.run([sys.executable, "-m", "anyflow.cli", *argv[1:]], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    shown = m.group(2)
    head, _, tail = shown.partition(" ... ")
    assert out.stderr.strip().startswith(head) and out.stderr.strip().endswith(tail), (shown, out.stderr)
