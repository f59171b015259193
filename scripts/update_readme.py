#!/usr/bin/env python
"""Regenerate the figures in README.md from the commands that produce them.

A block ``<!-- BEGIN GENERATED: scsonet ARGS -->`` ... ``<!-- END GENERATED -->`` holds the output of
``scsonet ARGS``; ``<!-- BEGIN FILE: PATH -->`` ... ``<!-- END FILE -->`` holds a saved benchmark
output (timings vary from run to run, so they are re-measured by hand, and the benchmark's own
``--out`` writes the file: never typed);
``<!-- BEGIN STUDY: SPEC -->`` ... ``<!-- END STUDY -->`` holds a study's summary rebuilt from its
committed run records (what ``scsonet benchmark --study SPEC --no-train`` writes to ``summary.md``,
with links relative to the README); ``<!-- BEGIN SCRIPT: PATH ARGS -->`` ... ``<!-- END SCRIPT -->`` holds
what the committed script PATH (under benchmarks/ or scripts/) prints with ARGS, run from the
repository root; such a command must only read committed files (e.g. ``benchmarks/robustness.py
--compare`` renders saved reports), never run a model.
``--check`` exits 1 when README.md differs from what the commands print now.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- BEGIN (GENERATED|FILE|STUDY|SCRIPT): (.+?) -->\n)(.*?)(<!-- END \2 -->)", re.S)


def _scsonet_output(command: str) -> str:
    from scsonet.cli.main import main

    args = shlex.split(command)
    if args[0] != "scsonet":
        raise SystemExit(f"generated block must run scsonet, got {command!r}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(args[1:])
    if status:
        raise SystemExit(f"{command!r} exited {status}")
    return out.getvalue().strip()


def _script_output(command: str) -> str:
    """What ``main(ARGS)`` of the committed script prints, run in this process from the root."""
    import importlib.util

    path, *args = shlex.split(command)
    if Path(path).parts[0] not in ("benchmarks", "scripts") or not (ROOT / path).is_file():
        raise SystemExit(f"script block must name a script under benchmarks/ or scripts/, got {path!r}")
    spec = importlib.util.spec_from_file_location(f"_readme_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    out, cwd = io.StringIO(), os.getcwd()
    os.chdir(ROOT)  # its arguments' paths are relative to the repository root
    try:
        spec.loader.exec_module(module)
        with contextlib.redirect_stdout(out):
            status = module.main(args)
    finally:
        os.chdir(cwd)
    if status:
        raise SystemExit(f"{command!r} exited {status}")
    return out.getvalue().strip()


def _study_summary(spec: str) -> str:
    """The study's summary from its records alone (no training, nothing written), linked from the root."""
    from scsonet.study import load_study, rebuild

    cwd = os.getcwd()
    os.chdir(ROOT)  # a spec's paths are relative to the repository root
    try:
        study = load_study(spec)
        return rebuild(study, link_prefix=f"{study.out.as_posix()}/")["summary.md"].strip()
    finally:
        os.chdir(cwd)


def render(text: str) -> str:
    def fill(match: re.Match) -> str:
        begin, kind, arg, _, end = match.groups()
        if kind == "STUDY":
            return f"{begin}{_study_summary(arg)}\n{end}"
        if kind == "SCRIPT":
            return f"{begin}{_script_output(arg)}\n{end}"
        body = _scsonet_output(arg) if kind == "GENERATED" else (ROOT / arg).read_text().strip()
        if kind == "GENERATED" and not body.startswith("|"):
            body = f"```text\n{body}\n```"
        return f"{begin}{body}\n{end}"

    return BLOCK.sub(fill, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if README.md is stale")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    current = readme.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print("README.md is stale: run python scripts/update_readme.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
