"""The base install (numpy, Pillow, onnxruntime; no PyTorch): segmenting through the shipped ONNX
export, one error line for what needs the torch extra, and the shipped export's freshness.

No torch is simulated in-process cheaply: a subprocess whose first act is a meta path finder that
refuses ``torch`` (and the rest of the extra), then runs the CLI. The slow test builds a real
virtual environment from the local package index.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BLOCK = textwrap.dedent("""
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "safetensors", "scipy", "thop", "torchvision"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, _NoTorch())
""")


def _no_torch(*code: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + "\n".join(code)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def _cli(*args: str) -> str:
    return f"from scsonet.cli.main import main; sys.exit(main({list(args)!r}))"


def _masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) > 127 for p in sorted(folder.glob("*_mask.png"))}


@pytest.fixture(scope="module")
def torch_masks(tmp_path_factory):
    from scsonet.cli.main import main

    out = tmp_path_factory.mktemp("torch")
    assert main(["predict", "--samples", "--out", str(out), "--quiet", "--backend", "torch"]) == 0
    return out


def test_predict_without_torch_matches_the_torch_path(tmp_path, torch_masks):
    out = tmp_path / "light"
    done = _no_torch(_cli("predict", "--samples", "--out", str(out), "--quiet"))
    assert done.returncode == 0, done.stderr
    light, reference = _masks(out), _masks(torch_masks)
    assert light.keys() == reference.keys() and light
    same = sum(int((light[k] == reference[k]).sum()) for k in light)
    total = sum(m.size for m in light.values())
    assert same / total >= 0.9999, same / total
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert settings["backend"] == "onnxruntime" and settings["weights"] == "scsonet-isic2017"
    assert settings["reliability"]  # the reliability model rides in the shipped export


@pytest.mark.parametrize("argv, what", [
    (["train", "--help"], None),
    (["train", "--set", "epochs=1"], "training"),
    (["evaluate", "--weights", "scsonet-isic2017", "--data", "nowhere"], "evaluation"),
    (["export", "--out", "x.onnx"], "export"),
    (["predict", "--samples", "--out", "o", "--backend", "torch"], "--backend torch"),
])
def test_commands_that_need_torch_say_so_in_one_line(tmp_path, argv, what):
    done = _no_torch(_cli(*argv), cwd=tmp_path)
    if what is None:  # help never needs torch
        assert done.returncode == 0 and "usage" in done.stdout, done.stderr
        return
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.strip().splitlines() == [
        f"scsonet {argv[0]}: error: {what} needs PyTorch: pip install 'scsonet[torch]' (no module 'torch')"], done.stderr
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_segment_and_models_without_torch(tmp_path):
    from scsonet.inference import sample_images

    sample = str(sample_images()[0])
    done = _no_torch("import scsonet, numpy as np",
                     f"m = scsonet.segment({sample!r})",
                     "print(m.dtype, m.shape, int(m.sum()) > 0, 'torch' in sys.modules)",
                     _cli("models"))
    assert done.stdout.splitlines()[0].startswith("bool (") and done.stdout.splitlines()[0].endswith("True False")
    # The registry needs torch: `scsonet models` says so in one line.
    assert done.returncode == 2 and done.stderr.strip().endswith("needs PyTorch: pip install 'scsonet[torch]' "
                                                                  "(no module 'torch')"), done.stderr


def test_the_shipped_onnx_export_is_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("shipped_onnx", ROOT / "scripts" / "shipped_onnx.py")
    shipped = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shipped)
    assert shipped.problems() == [], "stale: run .venv/bin/python scripts/shipped_onnx.py"
    # ... and the check would see a change of the reliability model (or weights, or card).
    expected = {**shipped.sources(), "reliability_sha256": "0" * 64}
    assert any("reliability_sha256" in line for line in shipped.problems(expected=expected))
    copy = tmp_path / "m.onnx"
    copy.write_bytes(shipped.MODEL.read_bytes() + b"\0")
    assert any("onnx_sha256 differs" in line for line in shipped.problems(model=copy))


@pytest.mark.slow
def test_a_fresh_venv_without_torch_segments_the_samples(tmp_path):
    """pip install . into a plain venv (from the configured package index): no torch installed."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], capture_output=True,
                         text=True, timeout=900, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    if pip.returncode != 0:
        pytest.skip(f"cannot install into a fresh venv here: {pip.stderr.strip().splitlines()[-1:]}")
    python = str(venv / "bin" / "python")
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0
    out = tmp_path / "out"
    done = subprocess.run([str(venv / "bin" / "scsonet"), "predict", "--samples", "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(_masks(out)) == len(list((ROOT / "src" / "scsonet" / "samples").glob("*.jpg")))
    train = subprocess.run([str(venv / "bin" / "scsonet"), "train", "--set", "epochs=1"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    assert train.returncode == 2 and train.stderr.strip() == (
        "scsonet train: error: training needs PyTorch: pip install 'scsonet[torch]' (no module 'torch')")
