"""Shipped weights: the enum and card schema, loading, and the card's figures against evaluate."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from scsonet.errors import ScsonetError
from scsonet.models import PRETRAINED, SCSONet_Weights, create_model, load_pretrained

REQUIRED_META = ("arch", "model_args", "preprocessing", "num_params", "categories", "min_size", "recipe",
                 "_metrics", "_ops_macs", "_file_size_mb", "_docs", "input_size", "mean", "std",
                 "interpolation", "license", "first_conv", "classifier", "protocol")
ROOT = Path(__file__).resolve().parents[1]


def test_enum_names_are_upper_case_with_default():
    names = [n for n in SCSONet_Weights.__members__ if n != "DEFAULT"]
    assert names and all(n == n.upper() for n in names)
    assert SCSONet_Weights.DEFAULT is SCSONet_Weights.ISIC2017_V1
    assert SCSONet_Weights.verify("ISIC2017_V1") is SCSONet_Weights.ISIC2017_V1
    assert SCSONet_Weights.verify("scsonet-isic2017") is SCSONet_Weights.ISIC2017_V1  # the pretrained name too
    with pytest.raises(ScsonetError, match="unknown weights"):
        SCSONet_Weights.verify("imagenet")


@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_card_schema_matches_the_weights(name):
    weights = PRETRAINED[name]
    meta = weights.meta
    assert [k for k in REQUIRED_META if k not in meta] == []
    model = create_model(meta["arch"], weights=weights)
    assert (meta["first_conv"], meta["classifier"]) == (model.first_conv_name, model.classifier_name)
    assert meta["num_params"] == sum(p.numel() for p in model.parameters())
    assert meta["protocol"] == "honest" and meta["recipe"]["selected_on"] == "val"
    report = meta["_metrics"]["ISIC2017-test"]
    assert report["n_images"] == 650 and report["pooled"]["dsc"] >= 0.88
    assert meta["_file_size_mb"] == pytest.approx(weights.path.stat().st_size / 2**20, abs=1e-3)


def test_load_pretrained_carries_its_preprocessing():
    loaded = load_pretrained("scsonet-isic2017")
    assert not loaded.model.training
    assert tuple(loaded.preset.resize_size) == (256, 256)
    assert loaded.preset.mean == tuple(SCSONet_Weights.DEFAULT.meta["preprocessing"]["mean"])
    with torch.no_grad():
        out = loaded.model(loaded.preset(torch.zeros(1, 3, 300, 200, dtype=torch.uint8)))
    assert out.shape == (1, 1, 256, 256)
    with pytest.raises(ScsonetError, match="unknown pretrained"):
        load_pretrained("scsonet-isic1999")


@pytest.mark.slow
def test_readme_figures_are_what_their_commands_print():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "update_readme.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PRETRAINED))
def test_card_figures_equal_a_fresh_evaluation(name, isic2017_prepared):
    from scsonet.data import PreparedData
    from scsonet.evaluation import evaluate

    card = PRETRAINED[name].meta["_metrics"]["ISIC2017-test"]
    report, _ = evaluate(load_pretrained(name), PreparedData(isic2017_prepared).load("test"),
                         batch_size=16, hd95=False, split="test")
    assert report["pooled"] == pytest.approx(card["pooled"], abs=1e-6)
    assert report["per_image"] == pytest.approx(card["per_image"], abs=1e-6)
    assert report["pooled"]["dsc"] >= 0.88
