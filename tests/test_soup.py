"""Weight averaging (scsonet.soup, `scsonet weights average`)."""
from __future__ import annotations

import pytest
import torch

from scsonet.cli.main import main
from scsonet.errors import ScsonetError
from scsonet.models import create_model, load_model
from scsonet.soup import average_weights, write_average

PRE = {"resize_size": [256, 256], "mean": [0.5] * 3, "std": [0.5] * 3}


def checkpoint(path, seed: int, model: str = "scsonet", pre: dict = PRE, **extra):
    torch.manual_seed(seed)
    state = create_model(model).state_dict()
    torch.save({"model": state, "model_name": model, "model_args": {}, "preprocessing": pre, **extra}, path)
    return path


@pytest.fixture
def pair(tmp_path):
    return (checkpoint(tmp_path / "a.pt", 0),
            checkpoint(tmp_path / "b.pt", 1, epoch=7, protocol="honest", select_split="val", best_val_dsc=0.9))


def test_the_average_is_the_weighted_mean_of_every_float_tensor(pair, tmp_path):
    a, b = (torch.load(p, weights_only=True)["model"] for p in pair)
    out = write_average([str(p) for p in pair], [0.25, 0.75], tmp_path / "soup.pt")
    soup = torch.load(out, weights_only=True)
    for key, value in soup["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.25 * a[key] + 0.75 * b[key], rtol=0, atol=1e-6)
        else:  # batch counters: the last source's
            assert torch.equal(value, b[key])
    assert [s["coefficient"] for s in soup["averaged_from"]] == [0.25, 0.75]
    # bookkeeping of the last source, but never its val score: the soup's own is unmeasured
    assert soup["epoch"] == 7 and soup["select_split"] == "val" and "best_val_dsc" not in soup
    loaded = load_model(out)  # an ordinary checkpoint for evaluate / predict / pack
    assert loaded.name == "scsonet"


def test_coefficients_one_and_zero_give_the_first_network_exactly(pair):
    soup = average_weights([str(p) for p in pair], [1.0, 0.0])
    first = torch.load(pair[0], weights_only=True)["model"]
    assert all(torch.equal(soup["model"][k], v) for k, v in first.items() if v.is_floating_point())


@pytest.mark.parametrize("coefficients, match", [([0.5], "1 given for 2 sources"), ([0.7, 0.7], "sum to 1"),
                                                 ([1.5, -0.5], ">= 0"), ([float("nan"), 1.0], ">= 0")])
def test_bad_coefficients_are_refused(pair, coefficients, match):
    with pytest.raises(ScsonetError, match=match):
        average_weights([str(p) for p in pair], coefficients)


def test_other_architectures_and_preprocessing_are_refused(pair, tmp_path):
    other = checkpoint(tmp_path / "m.pt", 0, model="malunet")
    with pytest.raises(ScsonetError, match="only one architecture"):
        average_weights([str(pair[0]), str(other)], [0.5, 0.5])
    fed_otherwise = checkpoint(tmp_path / "p.pt", 0, pre={**PRE, "mean": [0.4] * 3})
    with pytest.raises(ScsonetError, match="preprocessing differs"):
        average_weights([str(pair[0]), str(fed_otherwise)], [0.5, 0.5])


def test_cli_writes_the_soup_and_a_bad_value_is_one_line_with_nothing_written(pair, tmp_path, capsys):
    out = tmp_path / "soup.pt"
    assert main(["weights", "average", str(pair[0]), str(pair[1]), "--coefficients", "0.5", "0.5",
                 "--out", str(out)]) == 0
    assert out.is_file() and "0.5 x" in capsys.readouterr().out
    bad = tmp_path / "bad.pt"
    assert main(["weights", "average", str(pair[0]), str(pair[1]), "--coefficients", "0.9", "0.9",
                 "--out", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("scsonet weights: error:") and "sum to 1" in err[0]
    assert not bad.exists()
