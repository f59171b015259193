"""Every registered model (peers and ablation variants): sizes, gradients, batch independence,
parameter counts against the published ones, and the options the variants are built from."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scsonet.complexity import count_params
from scsonet.layers import EMA, PConv, SCAttentionBridge, SCFBlock
from scsonet.models import EGEUNet, create_model, deep_supervision_loss, list_models

ALL_MODELS = list_models()

# Published parameter counts (issue 5 acceptance: exact counts within 3%; UNeXt-S a range).
PUBLISHED_PARAMS = {"malunet": 177_943, "egeunet": 53_374, "unet": 7_770_000}


def _bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, target)


@pytest.mark.parametrize("name", ALL_MODELS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_of_one_at_odd_size(name, training):
    torch.manual_seed(0)
    model = create_model(name).train(training)
    with torch.set_grad_enabled(training):
        out = model(torch.randn(1, 3, 45, 67))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (1, 1, 45, 67)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ALL_MODELS)
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    x = torch.randn(2, 3, 64, 64)
    y = (torch.rand(2, 1, 64, 64) > 0.5).float()
    _bce(model(x), y).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


@pytest.mark.parametrize("name", ALL_MODELS)
def test_eval_output_does_not_depend_on_the_batch(name):
    torch.manual_seed(0)
    model = create_model(name)
    model.train()(torch.randn(2, 3, 64, 64))  # move BatchNorm running statistics off their init
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batched = model(x)
        alone = model(x[1:2])
    assert (batched[1:2] - alone).abs().max() < 1e-5


@pytest.mark.parametrize("name, published", sorted(PUBLISHED_PARAMS.items()))
def test_parameters_within_three_percent_of_published(name, published):
    assert abs(count_params(create_model(name)) - published) / published < 0.03


def test_exact_parameter_counts():
    counts = {n: count_params(create_model(n)) for n in ("malunet", "egeunet", "unet", "unext_s")}
    assert counts == {"malunet": 177_943, "egeunet": 53_374, "unet": 7_765_985, "unext_s": 253_561}
    assert 250_000 <= counts["unext_s"] <= 330_000


def test_table2_ablation_steps_compose():
    params = {n: count_params(create_model(n)) for n in ("ablation_base", "ablation_convstem", "ablation_scf", "scsonet")}
    assert params["ablation_base"] == count_params(create_model("malunet"))
    # ConvStem and SCF blocks touch disjoint stages: their effects on the size add up.
    convstem = params["ablation_convstem"] - params["ablation_base"]
    assert params["scsonet"] - params["ablation_scf"] == convstem


@pytest.mark.parametrize(
    "name, has_pconv, has_ema, mixer_type",
    [
        ("scf_scconv", False, False, None),
        ("scf_scconv_pconv", True, False, PConv),
        ("scf_scconv_dwsep", False, False, nn.Sequential),
        ("scf_scconv_dilated", False, False, nn.Conv2d),
        ("scsonet", True, True, PConv),
    ],
)
def test_scf_micro_ablations_change_only_the_scf_blocks(name, has_pconv, has_ema, mixer_type):
    model = create_model(name)
    blocks = [m for m in model.modules() if isinstance(m, SCFBlock)]
    assert len(blocks) == 6
    assert any(isinstance(m, PConv) for m in model.modules()) == has_pconv
    assert any(isinstance(m, EMA) for m in model.modules()) == has_ema
    encoder_block = blocks[0].body  # SCConv, [mixer], conv, [EMA]
    assert len(encoder_block) == 2 + (mixer_type is not None) + has_ema
    if mixer_type is not None:
        assert type(encoder_block[1]) is mixer_type
    if name == "scf_scconv_dilated":
        assert encoder_block[1].dilation == (2, 2)
    # Outside the SCF blocks the variants are the full model.
    outside = lambda m: {k for k in m.state_dict() if ".block." not in k}  # noqa: E731
    assert outside(model) == outside(create_model("scsonet"))


def test_scf_block_rejects_unknown_mixer():
    with pytest.raises(ValueError, match="mixer"):
        SCFBlock(8, 16, mixer="nope")


def test_bridge_residual_attended_is_published_form():
    torch.manual_seed(0)
    chs = [8, 16]
    feats = [torch.randn(2, c, 16 // (i + 1), 16 // (i + 1)) for i, c in enumerate(chs)]
    sab_form = SCAttentionBridge(chs)
    attended_form = SCAttentionBridge(chs, cab_residual="attended")
    attended_form.load_state_dict(sab_form.state_dict())
    # out = CAB(s) + r with s = t*a + t: the two forms differ by exactly t.
    for a, b, t in zip(sab_form(feats), attended_form(feats), feats):
        assert torch.allclose(a - b, t, atol=1e-6)
    with pytest.raises(ValueError, match="cab_residual"):
        SCAttentionBridge(chs, cab_residual="nope")
    assert create_model("malunet").bridge.cab_residual == "attended"
    assert create_model("scsonet").bridge.cab_residual == "sab"


def test_egeunet_side_outputs_in_training_only():
    torch.manual_seed(0)
    model = create_model("egeunet")
    x = torch.randn(2, 3, 45, 67)
    y = (torch.rand(2, 1, 45, 67) > 0.5).float()
    logits = model.train()(x)
    aux = model.aux_logits
    assert len(aux) == len(EGEUNet.aux_weights) == 5
    assert all(a.shape == logits.shape for a in aux)
    loss = deep_supervision_loss(aux, y, _bce)
    expected = sum(w * _bce(a, y) for w, a in zip((0.1, 0.2, 0.3, 0.4, 0.5), aux))
    assert torch.allclose(loss, expected)
    (loss + _bce(logits, y)).backward()
    assert model.aux_heads[0].weight.grad.abs().sum() > 0
    model.eval()
    assert model.aux_logits == []
    with torch.no_grad():
        model(x)
    assert model.aux_logits == []
    with pytest.raises(ValueError, match="side outputs"):
        deep_supervision_loss(aux[:4], y, _bce)
