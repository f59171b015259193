"""The command line and the package follow the ecosystem's habits: --version, readable model
card, help texts that name real commands, lazy names in dir(), one version source, the
repository's LICENSE/CITATION/py.typed, and an export check table that explains itself."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import scsonet
from scsonet.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _subparser(*names: str):
    parser = build_parser()
    for name in names:
        parser = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[name]
    return parser


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--help"])
    assert stop.value.code == 0
    return capsys.readouterr().out


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out == f"scsonet {scsonet.__version__}\n"


def test_pyproject_reads_the_one_version_without_importing_the_package():
    pytest.importorskip("setuptools.config.pyprojecttoml")
    code = ("import sys; sys.modules['torch'] = None; sys.modules['scsonet'] = None\n"
            "from setuptools.config.pyprojecttoml import read_configuration\n"
            "print(read_configuration('pyproject.toml')['project']['version'])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == scsonet.__version__
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and "\nversion =" not in text.split("[tool.setuptools.dynamic]")[0]


def test_weights_show_is_readable_and_json_is_the_raw_card(capsys):
    from scsonet.models import PRETRAINED
    from scsonet.publish import card_markdown, load_card

    card = load_card(PRETRAINED["scsonet-isic2017"].value.card_path)
    assert main(["weights", "show"]) == 0
    text = capsys.readouterr().out
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert text.startswith("scsonet-isic2017\n")
    for needle in (f"{card['num_params']:,} parameters", "RGB resized to 256x256", "protocol honest",
                   "Test metrics:", "DSC, pooled", "How these weights were made:",
                   "scsonet weights show scsonet-isic2017 --json"):
        assert needle in text, needle
    assert len(text.splitlines()) < 60 and max(map(len, text.splitlines())) <= 130

    assert main(["weights", "show", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == card
    # The README's generated block runs this: it stays the metrics table alone.
    assert main(["weights", "show", "--markdown"]) == 0
    assert capsys.readouterr().out == card_markdown(card) + "\n"
    with pytest.raises(SystemExit) as stop:
        main(["weights", "show", "--json", "--markdown"])
    assert stop.value.code == 2


def test_weights_show_of_an_unknown_name_is_one_line(capsys):
    assert main(["weights", "show", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scsonet weights: error: pretrained weights 'nope'") and err.count("\n") == 1


def test_help_texts_name_real_commands_and_print_plain_percent(capsys):
    evaluate = _help(capsys, "evaluate")
    assert "scsonet data prepare" in evaluate and "scsonet prepare" not in evaluate
    export = _help(capsys, "export")
    assert "99.99 % of pixels" in " ".join(export.split()) and "%%" not in export


@pytest.mark.parametrize("command", [("models",), ("complexity",), ("train",), ("weights", "pack"),
                                     ("weights", "show"), ("benchmark",), ("evaluate",), ("export",),
                                     ("predict",), ("data", "prepare")])
def test_every_command_has_a_description(command):
    description = _subparser(*command).description
    assert description and len(description) > 60, command


def test_dir_shows_the_lazy_names_and_import_stays_light():
    for name in ("segment", "load_pretrained", "create_model", "__version__"):
        assert name in dir(scsonet)
    code = "import sys, scsonet; names = dir(scsonet); print('segment' in names, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]


def test_export_check_table_says_what_each_row_compares_and_why_it_passes():
    from scsonet.export import MIN_MASK_AGREEMENT, CheckResult, check_table

    close = CheckResult("random batch 1", (1, 3, 256, 256), 3e-5, 7e-5, 6e-5, 1.0)
    # Above the tolerance, but PyTorch float32 itself is as far from float64: passes, and says why.
    rounding = CheckResult("real a.jpg +5", (6, 3, 256, 256), 1.1e-1, 6.7e-2, 1.1e-1, 0.99998)
    wrong = CheckResult("random batch 8", (8, 3, 256, 256), 2e-1, 2e-1, 1e-2, 0.999)
    assert close.passes(1e-4) and rounding.passes(1e-4) and not wrong.passes(1e-4)
    lines = check_table([close, rounding, wrong], 1e-4).splitlines()
    assert lines[0].split()[:3] == ["check", "input", "vs"] and "verdict" in lines[0]
    assert lines[1].endswith("pass: within 1e-04")
    assert lines[2].endswith("pass: as close to float64 as torch float32")
    assert lines[3].endswith("FAIL")
    note = " ".join(" ".join(lines[4:]).split())
    assert "within --tolerance (1e-04)" in note and "no further from float64 than PyTorch float32" in note
    assert "here by up to 1.1e-01" in note and f"{100 * MIN_MASK_AGREEMENT:.2f} %" in note
    int8 = check_table([rounding], 1e-4, exact=False)
    assert "not gated" in int8.splitlines()[1] and "within --tolerance" not in int8


def test_repository_basics():
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License") and "the scsonet authors" in license_text
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["type"] == "software" and citation["version"] == scsonet.__version__
    paper = citation["preferred-citation"]
    assert paper["doi"] == "10.3389/fphy.2024.1388364" and paper["authors"][0]["family-names"] == "Chen"
    assert paper["title"].startswith("SCSONet: spatial-channel synergistic optimization net")
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## Unreleased" in changelog and f"## {scsonet.__version__}" in changelog
    assert (Path(scsonet.__file__).parent / "py.typed").is_file()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_gitignore_covers_what_the_documented_commands_write():
    outputs = ["scsonet.onnx", "scsonet-int8.onnx", "scsonet.pt", "eval/scsonet-isic2017-test/report.json",
               ".venv-ort/bin/python", "out/samples/x_mask.png", "results/results.csv", "runs/exp/best.pt",
               "bench/table.md", "grid.png", "data/isic2017/meta.json"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *outputs], cwd=ROOT, capture_output=True, text=True)
    assert sorted(done.stdout.split()) == sorted(outputs)


@pytest.mark.slow  # a subprocess or an export: seconds
def test_closed_stdout_ends_quietly():
    """`scsonet models | head -0`: no BrokenPipeError traceback, status 128 + SIGPIPE."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)
    proc = subprocess.run([sys.executable, "-m", "scsonet.cli.main", "models"],
                          stdout=write_end, stderr=subprocess.PIPE, timeout=120)
    os.close(write_end)
    assert proc.returncode == 141, proc.stderr.decode()
    assert proc.stderr == b""
