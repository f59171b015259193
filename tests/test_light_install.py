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


def test_predict_of_one_jpeg_loads_only_what_it_needs(tmp_path):
    """Start-up: no torch, no tqdm without a terminal, only Pillow's common plugins for a JPEG."""
    from scsonet.inference import sample_images

    run = _cli("predict", str(sample_images()[0]), "--out", str(tmp_path / "out"))
    done = _no_torch(f"try:\n    {run}\nfinally:\n"
                     "    print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'tqdm')),"
                     " sorted(m for m in sys.modules if m.startswith('PIL.') and m.endswith('ImagePlugin')))")
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.splitlines()[-1]
    assert loaded.startswith("[] [") and "TiffImagePlugin" not in loaded and "JpegImagePlugin" in loaded, loaded


def test_the_onnxruntime_backend_builds_one_session_and_reads_the_metadata_from_the_file(monkeypatch):
    import onnxruntime as ort

    from scsonet import onnx_runtime
    from scsonet.inference import shipped_onnx

    model, real, built = shipped_onnx("scsonet-isic2017"), ort.InferenceSession, []

    def counting(path, options, **kwargs):
        built.append(options.graph_optimization_level)
        return real(path, options, **kwargs)

    monkeypatch.setattr(onnx_runtime.ort, "InferenceSession", counting)
    images = np.random.default_rng(0).integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    optimized = onnx_runtime.OrtSegmenter(model).predict_probs(images)
    plain = onnx_runtime.OrtSegmenter(model, optimize=False).predict_probs(images)
    level = ort.GraphOptimizationLevel
    assert built == [level.ORT_ENABLE_ALL, level.ORT_DISABLE_ALL]  # none built only to read the metadata
    assert np.abs(optimized - plain).max() < 1e-4
    options = ort.SessionOptions()
    options.graph_optimization_level = level.ORT_DISABLE_ALL
    session = real(str(model), options, providers=["CPUExecutionProvider"])
    assert onnx_runtime.read_metadata(model) == dict(session.get_modelmeta().custom_metadata_map)


def test_the_cli_builds_an_unoptimised_session_for_a_few_images(tmp_path, monkeypatch):
    from scsonet import onnx_runtime
    from scsonet.cli import predict as cli_predict
    from scsonet.cli.main import main

    built = []

    class Recording:  # stands in for OrtSegmenter: records how it was asked to build its session
        input_size, reliability = (16, 16), None

        def __init__(self, path, threads=None, tta=False, optimize=True):
            built.append(optimize)

        def predict_probs(self, images):
            return np.full((len(images), *self.input_size), 0.9, np.float32)

    monkeypatch.setattr(onnx_runtime, "OrtSegmenter", Recording)
    monkeypatch.setattr(cli_predict, "FEW_IMAGES", 2)
    (tmp_path / "in").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 14), (200, 40, 40)).save(tmp_path / "in" / f"{i}.png")
    for inputs in ([tmp_path / "in" / "0.png"], [tmp_path / "in"]):
        assert main(["predict", *map(str, inputs), "--out", str(tmp_path / "out"), "--quiet",
                     "--backend", "onnxruntime"]) == 0
    assert built == [False, True]  # 1 image: start-up counts most; 3 (> FEW_IMAGES): the runs do


@pytest.mark.slow
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


def _photo(path: Path, width: int, height: int) -> Path:
    """A smooth JPEG photo with a dark blob off-centre (so the model finds a lesion)."""
    y, x = np.mgrid[0:height, 0:width]
    blob = ((x - 0.4 * width) ** 2 + (y - 0.5 * height) ** 2) < (0.15 * height) ** 2
    rgb = np.stack([200 - 120 * blob, 150 - 90 * blob, 130 - 80 * blob], axis=-1).astype(np.uint8)
    Image.fromarray(rgb).save(path, quality=90)
    return path


@pytest.mark.slow  # a subprocess or an export: seconds
def test_big_jpeg_mask_at_full_size_overlay_at_preview_size(tmp_path):
    from scsonet.inference import PREVIEW_SIDE, predict_files, shipped_onnx
    from scsonet.onnx_runtime import OrtSegmenter

    photo = _photo(tmp_path / "photo.jpg", 3000, 2000)
    segmenter = OrtSegmenter(shipped_onnx("scsonet-isic2017"))
    for side, out in ((PREVIEW_SIDE, tmp_path / "preview"), (None, tmp_path / "full")):
        [row] = predict_files([photo], segmenter, out, progress=False, two_pass=True, overlay_side=side)
        assert row["status"] == "ok", row
        assert Image.open(out / "photo_mask.png").size == (3000, 2000)
        overlay = Image.open(out / "photo_overlay.png").size
        assert overlay == ((3000, 2000) if side is None else (1024, 683)), overlay  # from the 1/2-scale decode
    full_masks = _masks(tmp_path / "full")
    assert np.array_equal(full_masks["photo_mask.png"], _masks(tmp_path / "preview")["photo_mask.png"])


def test_lazy_image_decodes_a_big_jpeg_coarsely_and_crops_close_to_the_full_decode(tmp_path):
    from scsonet.imageio import read_draft, read_image
    from scsonet.postprocess import crop_resized, resize_image

    photo = _photo(tmp_path / "photo.jpg", 4000, 3000)
    lazy = read_draft(photo, (512, 512))
    assert lazy.shape == (3000, 4000, 3) and lazy.draft.shape == (750, 1000, 3) and not lazy.decoded_fully
    full = read_image(photo)
    for window in ((0, 0, 4000, 3000), (1000, 500, 3000, 2500), (1000, 1000, 2200, 2200)):
        coarse = crop_resized(lazy, window, (256, 256)).astype(int)
        exact = crop_resized(full, window, (256, 256)).astype(int)
        assert coarse.shape == (256, 256, 3) and np.abs(coarse - exact).mean() < 2.0, window
    assert not lazy.decoded_fully  # a 1200-px crop is decoded at 1/2 scale, not in full
    crop_resized(lazy, (1500, 1300, 1800, 1600), (256, 256))
    assert lazy.decoded_fully  # a 300-px one needs every pixel
    assert np.array_equal(resize_image(lazy, (256, 256)), lazy.resized((256, 256)))


def test_lazy_image_of_a_rotated_jpeg_has_the_shape_read_image_gives(tmp_path):
    from scsonet.imageio import read_draft, read_image

    photo = _photo(tmp_path / "plain.jpg", 4000, 3000)
    exif = Image.Exif()
    exif[0x0112] = 6  # turned a quarter: shown 3000 wide, 4000 high
    rotated = tmp_path / "rotated.jpg"
    Image.open(photo).save(rotated, quality=90, exif=exif)
    lazy = read_draft(rotated, (512, 512))
    full = read_image(rotated)
    assert lazy.shape == full.shape == (4000, 3000, 3) and lazy.draft.shape == (1000, 750, 3)
    assert np.array_equal(lazy[100:200, 50:60], full[100:200, 50:60])
