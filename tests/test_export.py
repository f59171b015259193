"""scsonet export (ONNX, TorchScript, int8), the torch-free ONNX Runtime segmenter, and
``scsonet predict --backend onnxruntime``, on a random-init SCSONet and synthetic images."""
from __future__ import annotations

import copy
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import scsonet
import scsonet.export as export_mod
from scsonet.cli.main import main
from scsonet.errors import ScsonetError
from scsonet.export import TORCHSCRIPT_METADATA, export_onnx, export_torchscript, random_batches
from scsonet.inference import TorchSegmenter
from scsonet.models import create_model, load_model
from scsonet.onnx_runtime import OrtSegmenter, read_metadata

PREPROCESSING = {"resize_size": [256, 256], "mean": [0.71, 0.55, 0.52], "std": [0.16, 0.17, 0.19]}


def lesion_image(seed: int, height: int = 300, width: int = 400) -> np.ndarray:
    """A dark blurred blob on skin-coloured noise, roughly like a dermoscopic photo."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (0.15 * height) ** 2))
    skin = np.array([200, 150, 130]) * (1 - 0.6 * blob[..., None]) + rng.normal(0, 8, (height, width, 3))
    return np.clip(skin, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Path:
    torch.manual_seed(0)
    path = workdir / "random.pt"
    torch.save({"model": create_model("scsonet").state_dict(), "model_name": "scsonet", "model_args": {},
                "preprocessing": PREPROCESSING}, path)
    return path


@pytest.fixture(scope="module")
def images(workdir) -> list[Path]:
    paths = []
    for seed in range(3):
        paths.append(workdir / "images" / f"lesion{seed}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(lesion_image(seed)).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def exported(workdir, checkpoint, images):
    """The ONNX export with its full check (batches 1, 3, 8, 250 x 333, and the images)."""
    return export_onnx(load_model(checkpoint), workdir / "model.onnx", check_images=images)


@pytest.mark.slow
def test_onnx_check_covers_dynamic_axes_within_tolerance(exported):
    shapes = [c.shape for c in exported.checks]
    assert shapes[:4] == [(1, 3, 256, 256), (3, 3, 256, 256), (8, 3, 256, 256), (1, 3, 250, 333)]
    assert shapes[4] == (3, 3, 256, 256)  # the three real images, one batch
    for check in exported.checks:
        assert check.error <= 1e-4 and check.passes(1e-4), check.line()
        assert check.mask_agreement >= 0.9999, check.line()
    assert exported.path.is_file()


@pytest.mark.slow
def test_onnx_graph_has_dynamic_axes_and_metadata(exported, checkpoint):
    proto = onnx.load(str(exported.path))
    for value in (*proto.graph.input, *proto.graph.output):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims[0] == "batch" and dims[2:] == ["height", "width"], dims
    meta = read_metadata(exported.path)
    assert json.loads(meta["mean"]) == PREPROCESSING["mean"]
    assert json.loads(meta["std"]) == PREPROCESSING["std"]
    assert json.loads(meta["resize_size"]) == PREPROCESSING["resize_size"]
    assert float(meta["threshold"]) == 0.5
    assert meta["arch"] == "scsonet" and meta["weights"] == str(checkpoint)
    assert "0..255" in meta["input_range"] and meta["precision"] == "float32"


@pytest.mark.slow
def test_onnx_runs_other_batches_and_sizes(exported, checkpoint):
    """Sizes the check did not try (batch 2, a tall odd image) through the dynamic session."""
    model = load_model(checkpoint).model
    segmenter = OrtSegmenter(exported.path)
    for shape in [(2, 3, 256, 256), (1, 3, 97, 45)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(x).numpy()
        got = segmenter.logits(x.numpy())
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4


@pytest.mark.slow
def test_failing_check_writes_nothing(workdir, checkpoint, monkeypatch):
    """A graph that is off by 1e-3 (a shifted head bias) must be refused, leaving no file behind."""
    monkeypatch.setattr(export_mod, "random_batches", lambda size, seed=0: random_batches((64, 64))[:1])
    write = export_mod._write_onnx

    def write_wrong_graph(model, path, *args):
        broken = copy.deepcopy(model)
        with torch.no_grad():
            broken.segmentation_head.bias += 1e-3
        write(broken, path, *args)

    monkeypatch.setattr(export_mod, "_write_onnx", write_wrong_graph)
    out = workdir / "refused" / "model.onnx"
    with pytest.raises(ScsonetError, match=r"model.onnx: export check failed, not written"):
        export_onnx(load_model(checkpoint), out)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_torchscript_round_trip(workdir, checkpoint, monkeypatch):
    monkeypatch.setattr(export_mod, "random_batches", lambda size, seed=0: random_batches((64, 64))[:2])
    out = workdir / "model.ts.pt"
    report = export_torchscript(load_model(checkpoint), out)
    assert report.checks and all(c.error <= 1e-4 for c in report.checks)
    extra = {TORCHSCRIPT_METADATA: ""}
    scripted = torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra[TORCHSCRIPT_METADATA])["mean"] == json.dumps(PREPROCESSING["mean"])
    model = load_model(checkpoint).model
    for shape in [(2, 3, 64, 96), (1, 3, 70, 50)]:  # batch and sides other than the traced ones
        x = torch.randn(shape)
        with torch.no_grad():
            assert torch.allclose(scripted(x), model(x), atol=1e-4)


@pytest.mark.slow
def test_ort_segmenter_matches_torch_segmenter(exported, checkpoint, images):
    rgb = np.stack([np.asarray(Image.open(p).resize((256, 256), Image.BILINEAR)) for p in images])
    for tta in (False, True):
        torch_probs = TorchSegmenter(load_model(checkpoint), tta=tta).predict_probs(rgb)
        ort_probs = OrtSegmenter(exported.path, threads=1, tta=tta).predict_probs(rgb)
        assert ort_probs.shape == torch_probs.shape == (3, 256, 256)
        # 5e-5, not less: with the flips, PyTorch float32 itself is 1.2e-5 from the exact (float64)
        # probabilities here, where the reparameterized export is within 1e-6
        assert np.abs(ort_probs - torch_probs).max() < 5e-5
        assert np.mean((ort_probs >= 0.5) == (torch_probs >= 0.5)) >= 0.9999
    mask = OrtSegmenter(exported.path).segment(images[0])
    assert mask.dtype == bool and mask.shape == (300, 400)


def test_ort_segmenter_rejects_bad_models(workdir):
    bad = workdir / "text.onnx"
    bad.write_text("not a model")
    with pytest.raises(ScsonetError, match="text.onnx: ONNX Runtime cannot load it"):
        OrtSegmenter(bad)
    bare = workdir / "bare.onnx"  # a valid ONNX graph without scsonet's metadata
    io = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 3, 8, 8]) for n in ("image", "logits")]
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["image"], ["logits"])], "bare", io[:1], io[1:])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8), bare)
    with pytest.raises(ScsonetError, match="bare.onnx: ONNX metadata lacks resize_size"):
        OrtSegmenter(bare)


@pytest.mark.slow
def test_cli_predict_backends_agree(exported, checkpoint, images, workdir):
    outs = {}
    for backend, weights in (("torch", checkpoint), ("onnxruntime", exported.path)):
        outs[backend] = workdir / f"pred_{backend}"
        assert main(["predict", *map(str, images), "--weights", str(weights), "--backend", backend,
                     "--out", str(outs[backend]), "--quiet"]) == 0
    for image in images:
        a, b = (np.asarray(Image.open(outs[k] / f"{image.stem}_mask.png")) for k in ("torch", "onnxruntime"))
        assert np.mean(a == b) >= 0.9999
    assert main(["predict", str(images[0]), "--weights", str(checkpoint), "--backend", "onnxruntime",
                 "--out", str(workdir / "x")]) == 2


def test_cli_export_torchscript_rejects_onnx_options(checkpoint, workdir, capsys):
    assert main(["export", "--weights", str(checkpoint), "--format", "torchscript", "--quantize", "int8",
                 "--out", str(workdir / "m.pt")]) == 2
    assert "--quantize and --no-reparameterize apply to --format onnx only" in capsys.readouterr().err


@pytest.mark.parametrize("opset", ["3", "99"])
def test_cli_export_an_opset_the_exporter_lacks_is_one_line_and_no_file(checkpoint, workdir, capfd, opset):
    out = workdir / f"opset{opset}.onnx"
    assert main(["export", "--weights", str(checkpoint), "--format", "onnx", "--opset", opset, "--out", str(out)]) == 2
    captured = capfd.readouterr()  # at the file descriptors: the exporter prints its graph dump there
    assert captured.out == "" and captured.err.splitlines() == [
        f"scsonet export: error: opset {opset}: torch {torch.__version__} cannot export the model at it "
        f"(Unsupported onnx_opset_version: {opset}); the default is 17"], captured.err
    assert not out.exists() and not list(workdir.glob(".*.tmp"))


@pytest.mark.slow
def test_int8_export_is_labelled_and_close(workdir, checkpoint, images, monkeypatch):
    monkeypatch.setattr(export_mod, "random_batches", lambda size, seed=0: random_batches(size)[:1])
    report = export_onnx(load_model(checkpoint), workdir / "int8.onnx", check_images=images, quantize="int8")
    assert not report.exact and read_metadata(report.path)["precision"] == "int8"
    assert {n.op_type for n in onnx.load(str(report.path)).graph.node} >= {"QuantizeLinear", "DequantizeLinear"}
    assert all(c.mask_agreement > 0.9 for c in report.checks)  # approximate, but the same model
    with pytest.raises(ScsonetError, match="needs real images to calibrate"):
        export_onnx(load_model(checkpoint), workdir / "int8b.onnx", check=False, quantize="int8")


# -- the ONNX Runtime path in a virtual environment without PyTorch ---------------------------

LIGHT_REQUIREMENTS = ("numpy", "pillow", "onnxruntime", "tqdm")


def _distributions(names) -> set[str]:
    """``names`` and, recursively, what they require (unconditional requirements only)."""
    seen, todo = set(), list(names)
    while todo:
        dist = md.distribution(todo.pop())
        key = dist.metadata["Name"].lower()
        if key in seen:
            continue
        seen.add(key)
        todo += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in dist.requires or [] if ";" not in r]
    return seen


def _link_distributions(names, site: Path) -> None:
    """Make the installed distributions ``names`` (and nothing else) importable from ``site``:
    the offline stand-in for ``pip install numpy pillow onnxruntime tqdm`` from a wheel cache."""
    for name in sorted(_distributions(names)):
        dist = md.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists():
                (site / top).symlink_to(source)


@pytest.mark.slow
def test_onnxruntime_predict_without_torch(exported, checkpoint, images, workdir):
    """``scsonet predict --backend onnxruntime`` in a fresh venv where torch cannot be imported."""
    assert "torch" not in _distributions(LIGHT_REQUIREMENTS)
    env_dir = workdir / "light-venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    _link_distributions(LIGHT_REQUIREMENTS, site)
    (site / "scsonet").symlink_to(Path(scsonet.__file__).parent)  # as `pip install --no-deps .` would
    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    probe = subprocess.run([str(python), "-c", "import torch"], capture_output=True, env=clean_env)
    assert probe.returncode != 0, "torch must not be importable in the light environment"

    out = workdir / "pred_light"
    result = subprocess.run([str(python), "-m", "scsonet.cli.main", "predict", *map(str, images),
                             "--backend", "onnxruntime", "--weights", str(exported.path), "--threads", "1",
                             "--out", str(out), "--quiet"], capture_output=True, text=True, env=clean_env)
    assert result.returncode == 0, result.stderr
    torch_out = workdir / "pred_torch_ref"
    assert main(["predict", *map(str, images), "--weights", str(checkpoint), "--out", str(torch_out), "--quiet"]) == 0
    for image in images:
        a, b = (np.asarray(Image.open(d / f"{image.stem}_mask.png")) for d in (torch_out, out))
        assert np.mean(a == b) >= 0.9999
