"""scripts/web_model.py: the staleness check of the model the web page serves (web/, issue 14).

The page itself is tested in headless Chromium by scripts/web_test (web/test/browser.test.mjs).
"""
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def web_model():
    spec = importlib.util.spec_from_file_location("web_model", ROOT / "scripts" / "web_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_build(web_model, folder: Path, **override) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "scsonet.onnx").write_bytes(b"not really a model")
    record = {**web_model.sources(), "onnx_sha256": web_model.sha256(folder / "scsonet.onnx"),
              "export_args": web_model.EXPORT_ARGS, **override}
    (folder / "scsonet.json").write_text(json.dumps(record))
    return folder


def test_sources_hash_the_shipped_weights(web_model):
    shipped = ROOT / "src" / "scsonet" / "weights" / "scsonet_isic2017_v1.safetensors"
    found = web_model.sources()
    assert found["weights_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert found["weights_file"] == shipped.name


def test_fresh_build_has_no_problems(web_model, tmp_path):
    assert web_model.problems(_fake_build(web_model, tmp_path)) == []
    assert web_model.main(["--check", "--out-dir", str(tmp_path)]) == 0


@pytest.mark.parametrize("key", ["weights_sha256", "card_export_sha256"])
def test_other_weights_or_card_make_it_stale(web_model, tmp_path, key, capsys):
    folder = _fake_build(web_model, tmp_path, **{key: "0" * 64})
    found = web_model.problems(folder)
    assert len(found) == 1 and key in found[0]
    assert web_model.main(["--check", "--out-dir", str(folder)]) == 1
    assert "stale" in capsys.readouterr().err


def test_replaced_onnx_or_other_export_options_make_it_stale(web_model, tmp_path):
    folder = _fake_build(web_model, tmp_path)
    (folder / "scsonet.onnx").write_bytes(b"another file")
    assert any("onnx_sha256" in p for p in web_model.problems(folder))
    folder = _fake_build(web_model, tmp_path / "b", export_args=["--opset", "18"])
    assert any("exported with" in p for p in web_model.problems(folder))


def test_missing_model_is_stale(web_model, tmp_path):
    assert web_model.problems(tmp_path) and web_model.main(["--check", "--out-dir", str(tmp_path)]) == 1


def test_card_prose_does_not_count(web_model, tmp_path, monkeypatch):
    """Only the card's fields that the export reads are hashed: editing its notes keeps the model fresh."""
    from scsonet.models._loading import PRETRAINED

    weights = PRETRAINED[web_model.WEIGHTS].value
    card = json.loads(weights.card_path.read_text())
    before = web_model.sources()
    edited = tmp_path / "card.json"
    edited.write_text(json.dumps({**card, "_docs": "edited"}))
    monkeypatch.setattr(type(weights), "card_path", property(lambda self: edited))
    assert web_model.sources() == before
    edited.write_text(json.dumps({**card, "threshold": 0.4}))
    assert web_model.sources()["card_export_sha256"] != before["card_export_sha256"]


def test_served_build_is_fresh(web_model):
    """The model in the built page (web/dist, made by scripts/web_test in CI) matches the shipped weights."""
    served = ROOT / "web" / "dist" / "model"
    if not served.is_dir():
        pytest.skip("web/dist is not built (bash scripts/web_test builds and tests it)")
    assert web_model.problems(served) == []
