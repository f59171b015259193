"""scsonet.deploy.reparameterize: the lean twin computes the original's logits (float64, to 1e-10),
leaves the original alone, and exports to a smaller ONNX graph that passes the export check."""
from __future__ import annotations

import copy

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from scsonet.cli.main import main
from scsonet.deploy import LeanSCSONet, TraceableODConv2d, _upsample2x, reparameterize, traceable
from scsonet.export import export_onnx
from scsonet.models import LoadedModel, create_model, load_model
from scsonet.layers import EncoderStage
from scsonet.onnx_runtime import read_metadata, session_options
from scsonet.transforms import SegmentationPreset

SHAPES = [(1, 256, 256), (3, 256, 256), (1, 250, 333), (3, 250, 333)]
# the variants only widen coverage: one shape each (MALUNet's blocks are slow in float64); 20 x 45
# pads to 32 x 64, leaving 1 x 2 maps in the deepest stage
VARIANT_SHAPES = {"random": SHAPES + [(2, 20, 45)], "random-variant": [(3, 250, 333)], "malunet": [(2, 64, 96)]}


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every parameter and BatchNorm statistic perturbed, and some GroupNorm scales
    of the pooling stages negative (they turn those stages' max-pool into a min-pool)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.uniform_(0.5, 1.5, generator=gen)
            if isinstance(m, EncoderStage) and isinstance(m.norm, torch.nn.GroupNorm):
                m.norm.weight[::3] *= -1
    return model.eval()


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "random": randomized(create_model("scsonet")),
        # hard gate, kernel attention and the published bridge residual
        "random-variant": randomized(create_model("scsonet", gate="hard", kernel_num=2, bridge_residual="attended"), 1),
        "trained": load_model("scsonet-isic2017").model,
        "malunet": randomized(create_model("malunet"), 2),  # SCSONet's frame (SCBridgeUNet) with other blocks
    }


@pytest.mark.parametrize("name", ["random", "random-variant", pytest.param("trained", marks=pytest.mark.slow),
                                  "malunet"])
def test_lean_twin_computes_the_same_logits_in_float64(models, name):
    model = copy.deepcopy(models[name]).double()
    lean = reparameterize(model)
    assert isinstance(lean, LeanSCSONet)
    gen = torch.Generator().manual_seed(0)
    for batch, height, width in VARIANT_SHAPES.get(name, SHAPES):
        x = torch.randn(batch, 3, height, width, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            expected, got = model(x), lean(x)
        assert got.shape == expected.shape == (batch, 1, height, width)
        assert (got - expected).abs().max().item() < 1e-10, (name, batch, height, width)


def test_the_original_model_is_left_untouched(models):
    model = models["random"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lean = reparameterize(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.encoder[0], EncoderStage) and model.encoder[0].norm.weight.requires_grad
    assert not any(p.requires_grad for p in lean.parameters()) and not lean.training
    memory = {t.data_ptr() for t in model.state_dict().values() if t.numel()}
    assert not memory & {t.data_ptr() for t in lean.state_dict().values() if t.numel()}


def test_other_models_come_back_as_equal_copies():
    torch.manual_seed(0)
    model = create_model("egeunet").eval()
    copy_ = reparameterize(model)
    assert copy_ is not model and type(copy_) is type(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(copy_(x), model(x))


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (7, 3), (64, 64), (65, 10)])
def test_matmul_upsampling_is_bilinear_with_aligned_corners(size):
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    expected = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
    assert (_upsample2x(x, 64) - expected).abs().max().item() < 1e-12


def _pinned_node_count(path, tmp_path) -> int:
    """Nodes ONNX Runtime runs in the session ``scsonet predict`` uses for one 256 x 256 image."""
    options = session_options(1, (256, 256), 1)
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return len(onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.slow
def test_export_of_the_lean_twin_passes_the_check_with_fewer_nodes(models, tmp_path):
    loaded = LoadedModel(models["random-variant"], SegmentationPreset((256, 256)), "scsonet", "random")
    report = export_onnx(loaded, tmp_path / "lean.onnx")  # raises unless within the check's tolerances
    assert report.metadata["reparameterized"] == "true" and report.checks
    assert all(check.passes(1e-4) for check in report.checks)
    plain = export_onnx(loaded, tmp_path / "plain.onnx", check=False, reparameterize=False)
    assert plain.metadata["reparameterized"] == "false"
    assert _pinned_node_count(report.path, tmp_path) < 0.95 * _pinned_node_count(plain.path, tmp_path)


@pytest.mark.slow
def test_cli_no_reparameterize(tmp_path, capsys):
    out = tmp_path / "plain.onnx"
    assert main(["export", "--out", str(out), "--no-reparameterize", "--no-check"]) == 0
    assert read_metadata(out)["reparameterized"] == "false"
    assert main(["export", "--format", "torchscript", "--out", str(tmp_path / "m.pt"), "--no-reparameterize"]) == 2
    assert "--no-reparameterize apply to --format onnx only" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["scsonet", "unet"])
@pytest.mark.slow
def test_traceable_twin_traces_once_and_runs_at_any_batch_and_size(name):
    """The export-time swap of the plain graph: traced at one batch and size (multiples of the
    padding), it gives the eager logits at others, padding and cropping included."""
    torch.manual_seed(0)
    model = create_model(name, **({"embed_dims": (4, 8, 16, 32, 64)} if name == "unet" else {})).eval()
    with torch.no_grad():
        traced = torch.jit.trace(traceable(model), torch.zeros(1, 3, 64, 64), check_trace=False)
        for batch, height, width in [(1, 64, 64), (3, 50, 70), (2, 33, 97)]:
            x = torch.randn(batch, 3, height, width)
            torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, TraceableODConv2d) for m in model.modules())  # the model is left alone
