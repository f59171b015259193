"""One weights API: every name form, the errors, in_chans / head adaptation, the listing."""
import json

import pytest
import torch
import torch.nn as nn

import scsonet
from scsonet.cli.main import main
from scsonet.errors import ScsonetError
from scsonet.models import (SCSONet_Weights, create_model, get_model_weights, list_models, list_pretrained,
                            load_pretrained)
from scsonet.models._registry import model_entrypoint
from scsonet.models._weights import Weights, declared_weights

from test_train import prepared  # noqa: F401  (a prepared synthetic 32x32 dataset, reused)

NAME = "scsonet-isic2017"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny forwards: on a busy 2-core machine several threads are ~100x slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict()


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = _state(a), _state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_name_form_loads_the_same_weights():
    ref = load_pretrained(NAME).model
    forms = [SCSONet_Weights.DEFAULT, "DEFAULT", NAME, "SCSONet_Weights.DEFAULT"]
    for form in forms:
        assert _same_state(create_model("scsonet", weights=form), ref), form
    assert not _same_state(create_model("scsonet"), ref)  # the comparison can fail


def test_each_version_has_its_own_name_and_the_default_has_the_short_one():
    names = declared_weights()
    for member in SCSONet_Weights:
        assert names[member.versioned_name] is member
        version = member.name.rsplit("_", 1)[1]
        assert _same_state(create_model("scsonet", weights=member.versioned_name),
                           create_model("scsonet", weights=member.name)), version
        assert member.versioned_name == f"scsonet-isic2017-{version.lower()}"
    assert names[NAME] is SCSONet_Weights.DEFAULT and SCSONet_Weights.DEFAULT.pretrained_name == NAME
    others = [m for m in SCSONet_Weights if m is not SCSONet_Weights.DEFAULT]
    assert all(m.pretrained_name == m.versioned_name for m in others)
    assert names["malunet-isic2017-v1"] is names["malunet-isic2017"]


def test_unknown_or_foreign_weights_name_the_valid_ones():
    with pytest.raises(ScsonetError, match=r"unknown weights 'imagenet' for scsonet; choose from "
                                           r"ISIC2017_V1, .*DEFAULT, scsonet-isic2017, scsonet-isic2017-v1"):
        create_model("scsonet", weights="imagenet")
    with pytest.raises(ScsonetError, match="'malunet-isic2017' are for malunet, not scsonet"):
        create_model("scsonet", weights="malunet-isic2017")
    with pytest.raises(ScsonetError, match="are for scsonet, not malunet"):
        create_model("malunet", weights=SCSONet_Weights.DEFAULT)
    with pytest.raises(ScsonetError, match=f"unet has no pretrained weights \\(pretrained: {NAME}"):
        create_model("unet", weights=NAME)


def test_weights_not_installed_name_what_is():
    missing = [n for n in list_pretrained(include_missing=True) if n not in list_pretrained()]
    if not missing:
        pytest.skip("every declared weights file is installed")
    member = declared_weights()[missing[0]]
    with pytest.raises(ScsonetError, match=f"'{missing[0]}' are not installed .*; installed: .*{NAME}"):
        create_model(member.value.arch, weights="DEFAULT")


def test_a_class_count_the_weights_lack_is_one_clear_error():
    with pytest.raises(ScsonetError) as err:
        create_model("scsonet", weights=NAME, num_classes=2)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{NAME} has 1 class (lesion); num_classes=2 ")
    assert "pass weights=None" in msg and "reset_head=True" in msg
    assert create_model("scsonet", weights=NAME, num_classes=1).num_classes == 1  # the weights' own count is fine
    with pytest.raises(ScsonetError, match=r"the weights do not fit scsonet-isic2017 \(.*size mismatch[^\n]*$"):
        create_model("scsonet", weights=NAME, embed_dims=(8, 16, 24, 32, 48, 96))  # another architecture


def test_reset_head_keeps_every_other_weight():
    ref = _state(create_model("scsonet", weights=NAME))
    model = create_model("scsonet", weights=NAME, num_classes=2, reset_head=True)
    state = _state(model)
    head = [k for k in state if k.startswith("segmentation_head.")]
    assert head and state["segmentation_head.weight"].shape[0] == 2
    assert all(torch.equal(state[k], ref[k]) for k in state if k not in head)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def _rgb_and_adapted(arch: str, weights, in_chans: int) -> tuple[nn.Module, nn.Module]:
    rgb = create_model(arch, weights=weights).eval()
    return rgb, create_model(arch, weights=weights, in_chans=in_chans).eval()


@torch.no_grad()
def _check_adaptation(arch: str, weights) -> None:
    """in_chans=1 on a grey image is the RGB model on that image in 3 equal channels; in_chans=6 on
    an RGB image twice is the RGB model on it once."""
    torch.manual_seed(0)
    grey, rgb_img = torch.randn(2, 1, 64, 48), torch.randn(2, 3, 64, 48)
    rgb, one = _rgb_and_adapted(arch, weights, 1)
    expected = rgb(grey.repeat(1, 3, 1, 1))
    assert expected.abs().max() > 0.1  # a real output, not a constant
    torch.testing.assert_close(one(grey), expected, atol=1e-4, rtol=1e-4)
    six = create_model(arch, weights=weights, in_chans=6).eval()
    torch.testing.assert_close(six(rgb_img.repeat(1, 2, 1, 1)), rgb(rgb_img), atol=1e-4, rtol=1e-4)


def test_in_chans_adapts_the_first_conv_of_the_shipped_weights():
    _check_adaptation("scsonet", NAME)


@pytest.fixture
def fake_installed(tmp_path, monkeypatch):
    """Weights files of every architecture with an enum, random but written like pack_weights'."""
    from safetensors.torch import save_file

    monkeypatch.setattr(Weights, "path", property(lambda self: tmp_path / self.filename))
    for member in declared_weights().values():
        torch.manual_seed(1)
        model = create_model(member.value.arch)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(member.path))
        card = {"arch": member.value.arch, "model_args": {}, "categories": ["background", "lesion"],
                "first_conv": model.first_conv_name, "classifier": model.classifier_name}
        member.value.card_path.write_text(json.dumps(card))
    return declared_weights()


def test_each_architectures_layer_names_adapt_its_weights(fake_installed):
    for name, member in fake_installed.items():
        arch = member.value.arch
        assert get_model_weights(arch) is type(member)
        assert _same_state(create_model(arch, weights=name), create_model(arch, weights=member))
        _check_adaptation(arch, name)
        with pytest.raises(ScsonetError, match=f"{member.pretrained_name} has 1 class \\(lesion\\); num_classes=3"):
            create_model(arch, weights=name, num_classes=3)
        out = create_model(arch, weights=name, num_classes=3, reset_head=True).eval()(torch.rand(1, 3, 32, 32))
        assert out.shape == (1, 3, 32, 32)


def test_a_card_naming_a_wrong_layer_is_an_error(fake_installed):
    member = fake_installed["unext_s-isic2017"]
    card = json.loads(member.value.card_path.read_text())
    member.value.card_path.write_text(json.dumps({**card, "first_conv": "encoder.0.block"}))  # SCSONet's name
    with pytest.raises(ScsonetError, match="first_conv='encoder.0.block' is not a conv of UNeXt"):
        create_model("unext_s", weights=member, in_chans=1)


@pytest.mark.parametrize("arch", ["unext_s", "egeunet"])
def test_a_packed_card_names_the_layers_of_its_own_model(arch, prepared, tmp_path, monkeypatch):
    """pack_weights writes each model's own first_conv / classifier, and the API adapts with them."""
    from scsonet.publish import pack_weights

    monkeypatch.setattr(Weights, "path", property(lambda self: tmp_path / self.filename))
    torch.manual_seed(0)
    model = create_model(arch)
    ckpt = {"model": model.state_dict(), "model_name": arch, "model_args": {}, "epoch": 0, "protocol": "honest",
            "select_split": "val", "preprocessing": {"resize_size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3}}
    torch.save(ckpt, tmp_path / "best.pt")
    card = pack_weights(tmp_path / "best.pt", prepared, tmp_path / f"{arch}_isic2017_v1.safetensors",
                        dataset_name="ISIC2017")
    first_conv = {"unext_s": "encoder.0.conv", "egeunet": "encoder.0.block"}[arch]  # not SCSONet's for all
    assert (card["first_conv"], card["classifier"]) == (first_conv, "segmentation_head")
    assert card["input_size"] == [3, 32, 32]
    assert f"{arch}-isic2017" in list_pretrained()
    _check_adaptation(arch, f"{arch}-isic2017")


@pytest.mark.parametrize("arch", list_models())
def test_every_builder_takes_weights_and_names_its_layers(arch):
    model = model_entrypoint(arch)(weights=None, num_classes=3, in_chans=2)
    first, head = model.get_submodule(model.first_conv_name), model.get_submodule(model.classifier_name)
    assert isinstance(first, nn.Conv2d) and first.in_channels == 2
    assert isinstance(head, nn.Conv2d) and head.out_channels == 3
    if get_model_weights(arch) is None:
        with pytest.raises(ScsonetError, match=f"{arch} has no pretrained weights"):
            model_entrypoint(arch)(weights="DEFAULT")


def test_listing_of_pretrained_weights(capsys):
    assert scsonet.list_pretrained is list_pretrained and "list_pretrained" in dir(scsonet)
    installed, declared = list_pretrained(), list_pretrained(include_missing=True)
    assert NAME in installed and set(installed) <= set(declared) == set(declared_weights())
    assert list_pretrained("scsonet*") == sorted([NAME, *(m.versioned_name for m in SCSONet_Weights)])
    assert main(["weights", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == declared
    assert {r["name"] for r in rows if r["installed"]} == set(installed)
    row = next(r for r in rows if r["name"] == NAME)
    assert row["weights"] == f"SCSONet_Weights.{SCSONet_Weights.DEFAULT.name}" and row["model"] == "scsonet"
    assert row["dsc"] == SCSONet_Weights.DEFAULT.meta["_metrics"]["ISIC2017-test"]["pooled"]["dsc"]
    assert main(["weights", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "model", "weights", "installed", "test", "DSC"]
    line = next(line for line in lines if line.startswith(NAME))
    assert f"{100 * row['dsc']:.2f} % (ISIC2017-test)" in line and " yes " in line


def test_the_torch_free_names_of_the_shipped_onnx_models_match_the_weights_enum():
    """scsonet.inference spells the shipped versions out (it must not import torch): they agree."""
    from scsonet.inference import DEFAULT_VERSION, SHIPPED_ONNX, SHIPPED_VERSIONS

    names = declared_weights()
    assert DEFAULT_VERSION == {NAME: SCSONet_Weights.DEFAULT.versioned_name}
    for name, onnx in SHIPPED_ONNX.items():
        assert names[name].path.with_suffix(".onnx").name == onnx, name
    installed = {m.versioned_name for m in SCSONet_Weights if m.value.installed}
    assert set(SHIPPED_VERSIONS) == installed  # every shipped version has its ONNX export
