"""The default SCSONet: size handling, gradients, determinism, options and complexity."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from scsonet.cli.main import main as cli_main
from scsonet.complexity import count_macs, count_params
from scsonet.models import create_model, load_model
from scsonet.layers import SRU


def _train_step(model, batch: int, size=(64, 64)):
    model.train()
    x = torch.randn(batch, 3, *size)
    y = (torch.rand(batch, 1, *size) > 0.5).float()
    loss = F.binary_cross_entropy_with_logits(model(x), y)
    loss.backward()
    return loss


def test_every_parameter_gets_a_nonzero_gradient():
    torch.manual_seed(0)
    model = create_model("scsonet")
    _train_step(model, batch=2)
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_hard_gate_leaves_sru_norms_without_gradient():
    torch.manual_seed(0)
    model = create_model("scsonet", gate="hard")
    _train_step(model, batch=2)
    sru_norm_grads = [m.gn.weight.grad for m in model.modules() if isinstance(m, SRU)]
    assert sru_norm_grads and all(g is None or g.abs().sum() == 0 for g in sru_norm_grads)


def test_batch_size_one_trains():
    torch.manual_seed(0)
    model = create_model("scsonet")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = _train_step(model, batch=1)
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("size", [(256, 256), (250, 333), (64, 96)])
def test_output_has_input_size(size):
    model = create_model("scsonet").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, *size))
    assert out.shape == (1, 1, *size)
    assert torch.isfinite(out).all()


def test_eval_output_independent_of_batch():
    torch.manual_seed(1)
    model = create_model("scsonet").eval()
    x = torch.randn(4, 3, 96, 128)
    with torch.no_grad():
        batched = model(x)
        alone = model(x[2:3])
    assert (batched[2:3] - alone).abs().max() < 1e-5


def test_same_seed_builds_identical_weights():
    torch.manual_seed(42)
    a = create_model("scsonet").state_dict()
    torch.manual_seed(42)
    b = create_model("scsonet").state_dict()
    torch.manual_seed(43)
    c = create_model("scsonet").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("options", [{"gate": "hard"}, {"kernel_num": 4}, {"gate": "hard", "kernel_num": 4}])
def test_options_build_and_run(options):
    model = create_model("scsonet", **options)
    loss = _train_step(model, batch=2, size=(64, 64))
    assert torch.isfinite(loss)
    if options.get("kernel_num", 1) > 1:
        assert any(n.endswith("kernel_fc.weight") for n, _ in model.named_parameters())


def test_default_complexity_matches_published_model():
    model = create_model("scsonet")
    assert count_params(model) == 159_439
    assert abs(count_macs(model, (256, 256)) - 82.8e6) / 82.8e6 < 0.03


def test_complexity_cli_json(capsys):
    assert cli_main(["complexity", "--model", "scsonet", "--size", "256", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["params"] == 159_439
    assert 80e6 < report["macs"] < 86e6
    assert 0.14 < report["paper_params_m"] < 0.16
    assert "note" in report


def test_unknown_model_error_lists_names(capsys):
    assert cli_main(["complexity", "--model", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "scsonet" in err and err.count("\n") == 1


def _pattern_image() -> torch.Tensor:
    """A smooth deterministic (1, 3, 64, 96) input, the same on every machine (no RNG)."""
    c = torch.arange(3, dtype=torch.float64).view(3, 1, 1)
    h = torch.arange(64, dtype=torch.float64).view(1, 64, 1)
    w = torch.arange(96, dtype=torch.float64).view(1, 1, 96)
    return (torch.sin(0.11 * (c + 1) * h) * torch.cos(0.07 * w + c) * 1.5).unsqueeze(0)


def test_shipped_weights_load_strictly_and_give_the_recorded_logits():
    """The float64 logits of the shipped checkpoint, recorded before the model code was reorganised
    (tests/data): a renamed key fails the strict load, a changed computation the comparison."""
    model = load_model("scsonet-isic2017").model.double().eval()
    expected = np.load(Path(__file__).parent / "data" / "scsonet_isic2017_v1_logits.npy")
    with torch.no_grad():
        got = model(_pattern_image()).numpy()
    assert got.shape == expected.shape == (1, 1, 64, 96)
    assert np.abs(got - expected).max() < 1e-9


@pytest.mark.slow  # a subprocess or an export: seconds
def test_the_plain_models_import_no_twin():
    """Building and running the plain models loads neither the fast training twin nor the export twin."""
    code = ("import sys, torch; from scsonet.models import create_model; "
            "create_model('scsonet')(torch.zeros(1, 3, 32, 32)); "
            "print([m for m in sys.modules if m.startswith(('scsonet.fast', 'scsonet.deploy', 'scsonet._native', "
            "'scsonet._twins', 'scsonet.export'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
