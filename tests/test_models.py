"""Every registered model (peers and ablation variants): sizes, gradients, batch independence,
parameter and operation counts against the paper's tables, and the options the variants are built from."""
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from scsonet.benchmark import PUBLISHED
from scsonet.complexity import count_macs, count_params, thop_counts
from scsonet.layers import EMA, PConv, SCAttentionBridge, SCFBlock
from scsonet.models import EGEUNet, create_model, deep_supervision_loss, list_models

ALL_MODELS = list_models()


def scsonet_quick(names):
    """Parameters over ``names``: SCSONet's stays in the quick subset, the others (seconds each) are slow."""
    return [n if n == "scsonet" else pytest.param(n, marks=pytest.mark.slow) for n in names]


# Params (M) and GFLOPs at 256 x 256 as the paper prints them: Table 1 (the peers), Table 2 (the
# ablation; Base is MALUNet), Table 3 (the SCF block variants). Text, because the decimals printed
# are the precision a count must meet ("0.10" is two).
PAPER_COMPLEXITY = {
    "unet": ("7.77", "13.76"),
    "unext_s": ("0.32", "0.10"),
    "malunet": ("0.175", "0.083"),
    "egeunet": ("0.053", "0.072"),
    "scsonet": ("0.149", "0.056"),
    "ablation_base": ("0.175", "0.083"),
    "ablation_convstem": ("0.164", "0.057"),
    "ablation_scf": ("0.150", "0.078"),
    "scf_scconv": ("0.131", "0.072"),
    "scf_scconv_pconv": ("0.148", "0.075"),
    "scf_scconv_dwsep": ("0.141", "0.074"),
    "scf_scconv_dilated": ("0.181", "0.082"),
}
# Which count gives each printed figure at its precision: "exact" (every parameter / 10^6, PyTorch's
# MACs / 10^9) or "thop" (the paper's script: thop's module-hook counts / 2^20 and 2^30). Otherwise
# neither does, and the entry is our exact figure at the paper's precision, pinned all the same.
# The gaps: thop's count depends on which operations are modules, so ours (0.055 GFLOPs) is not
# the published code's (59.8 M MACs, 0.056); MALUNet's published code has 177,943 parameters, not
# 0.175 M; the paper's UNet is another configuration (same parameters, more operations); the
# ablation variants' code was never published, and Table 3 does not add up (EMA adds operations,
# yet its row has fewer GFLOPs).
REPRODUCED_BY = {
    "unet": ("exact", "12.07"),
    "unext_s": ("0.25", "thop"),
    "malunet": ("0.178", "exact"),
    "egeunet": ("exact", "exact"),
    "scsonet": ("thop", "0.083"),
    "ablation_base": ("0.178", "exact"),
    "ablation_convstem": ("0.179", "0.083"),
    "ablation_scf": ("thop", "0.083"),
    "scf_scconv": ("0.140", "0.077"),
    "scf_scconv_pconv": ("0.158", "0.080"),
    "scf_scconv_dwsep": ("0.150", "0.079"),
    "scf_scconv_dilated": ("0.210", "0.089"),
}


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


@pytest.mark.parametrize("name", scsonet_quick(ALL_MODELS))
def test_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    x = torch.randn(2, 3, 64, 64)
    y = (torch.rand(2, 1, 64, 64) > 0.5).float()
    _bce(model(x), y).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


@pytest.mark.parametrize("name", scsonet_quick(ALL_MODELS))
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


@functools.lru_cache(maxsize=None)
def _complexity(name: str) -> dict[str, tuple[float, float]]:
    """(params in M, GFLOPs) of the model at 256 x 256, counted both ways."""
    model = create_model(name)
    thop_macs, thop_params = thop_counts(model)
    return {"exact": (count_params(model) / 1e6, count_macs(model) / 1e9),
            "thop": (thop_params / 2**20, thop_macs / 2**30)}


def _as_printed(value: float, printed: str) -> str:
    return f"{value:.{len(printed.split('.')[1])}f}"


@pytest.mark.parametrize("name", scsonet_quick(PAPER_COMPLEXITY))
def test_complexity_against_the_paper(name):
    pytest.importorskip("thop")
    counts = _complexity(name)
    for i, (printed, how) in enumerate(zip(PAPER_COMPLEXITY[name], REPRODUCED_BY[name])):
        ours = {convention: _as_printed(c[i], printed) for convention, c in counts.items()}
        if how in ours:
            assert ours[how] == printed
        else:
            assert ours["exact"] == how
            assert printed not in ours.values()  # reproduced after all: name the convention above


def test_benchmark_tables_carry_the_paper_figures():
    for table in PUBLISHED.values():
        for name, (params, gflops, _, _) in table.items():
            assert (params, gflops) == tuple(float(f) for f in PAPER_COMPLEXITY[name]), name


def test_exact_parameter_counts():
    counts = {n: count_params(create_model(n)) for n in ("malunet", "egeunet", "unet", "unext_s")}
    assert counts == {"malunet": 177_943, "egeunet": 53_374, "unet": 7_765_985, "unext_s": 253_561}


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
