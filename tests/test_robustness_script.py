"""benchmarks/robustness.py end to end on a tiny prepared folder: rows, files, the predictor hook."""
from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIDE = 48

PREDICTOR_FILE = '''
import numpy as np

def make(weights, device, tta):
    """Lesion where red > 200: perfect on the synthetic images, blind once they are darkened."""
    calls.append((weights, device, tta))
    return lambda images: [(im[..., 0] > 200).astype(np.float32) for im in images]

calls = []
'''


def _script():
    spec = importlib.util.spec_from_file_location("robustness", ROOT / "benchmarks" / "robustness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from scsonet.data import prepare_dataset

    root = tmp_path_factory.mktemp("robust")
    rng = np.random.default_rng(0)
    (root / "raw" / "images").mkdir(parents=True)
    (root / "raw" / "masks").mkdir()
    yy, xx = np.mgrid[:SIDE, :SIDE]
    for k in range(16):
        r = (2, 8, 18, 30)[k % 4]  # lesions in every size band
        mask = ((yy - 24 - rng.integers(-3, 4)) ** 2 + (xx - 24) ** 2 <= r * r).astype(np.uint8)
        image = rng.integers(60, 180, (SIDE, SIDE, 3), dtype=np.uint8)
        image[..., 0] = np.where(mask > 0, 255, image[..., 0])
        Image.fromarray(image).save(root / "raw" / "images" / f"c{k:02d}.png")
        Image.fromarray(mask * 255).save(root / "raw" / "masks" / f"c{k:02d}.png")
    prepare_dataset("folder", root / "raw", root / "prepared", size=SIDE, test_ratio=0.5, val_ratio=0.0,
                    workers=1, progress=False)
    return root / "prepared"


def test_benchmark_writes_every_row_through_the_predictor_hook(prepared, tmp_path, capsys):
    script = _script()
    (tmp_path / "hook.py").write_text(PREDICTOR_FILE)
    out = tmp_path / "docs" / "r.md"
    argv = ["--weights", "a=w1", "--weights", "w2", "--data", str(prepared), "--split", "test", "--out", str(out),
            "--predictor", f"{tmp_path / 'hook.py'}:make", "--device", "cpu", "--batch-size", "3"]
    assert script.main(argv) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert list(report["weights"]) == ["a", "w2"] and report["n_images"] == 8
    names = [s["name"] for s in report["shifts"]]
    assert len(names) == 17 and names[0] == "none"
    for label in ("a", "w2"):
        rows = report["rows"][label]
        assert rows["none"] == {"n": 8, "pooled_dsc": 1.0, "mean_dice": 1.0, "failure_rate": 0.0, "failures": 0}
        assert rows["darker"]["failure_rate"] == 1.0  # the darkened images reached the predictor
        assert rows["rot90"]["pooled_dsc"] == 1.0 and rows["jpeg30"]["n"] == 8
        small = sum(f < 0.05 for f in report["lesion_fraction"])
        assert rows["small_lesions"]["n"] == rows["band <5 %"]["n"] == small > 0
        assert sum(rows[f"band {b}"]["n"] for b in ("<5 %", "5-30 %", "30-60 %", ">60 %")) == 8
        per_image = report["per_image"][label]
        assert set(per_image) == set(names) and all(len(per_image[n]["dice"]) == rows[n]["n"] for n in names)
        assert per_image["small_lesions"]["index"] == [i for i, f in enumerate(report["lesion_fraction"]) if f < 0.05]
    md = out.read_text()
    assert all(s["label"] in md for s in report["shifts"]) and "| >60 % |" in md and report["command"] in md
    with open(out.with_suffix(".csv")) as f:
        assert len(list(csv.DictReader(f))) == 2 * (17 + 4)
    out.unlink()
    assert script.main(["--weights", "a=w1", "--out", str(out), "--render"]) == 0  # from the JSON alone
    assert out.read_text() == md and json.loads(out.with_suffix(".json").read_text()) == report


def test_default_predictor_is_the_predict_path_and_bad_options_fail_cleanly(prepared, tmp_path, capsys):
    import torch

    from scsonet.models import create_model

    torch.manual_seed(0)
    checkpoint = tmp_path / "best.pt"
    torch.save({"model": create_model("scsonet").state_dict(), "model_name": "scsonet", "model_args": {},
                "preprocessing": {"resize_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}}, checkpoint)
    script = _script()
    calls = []
    real = script.predict_batch

    def spy(images, segmenter, threshold, two_pass):  # scsonet predict's function, seen on its way
        calls.append((len(images), threshold, two_pass))
        return real(images, segmenter, threshold, two_pass)

    script.predict_batch = spy
    out = tmp_path / "v.md"
    base = ["--weights", str(checkpoint), "--data", str(prepared), "--split", "test", "--out", str(out),
            "--shifts", "none,zoom_out_skin_3", "--limit", "4", "--device", "cpu", "--threshold", "0.4"]
    for extra, two_pass in (([], True), (["--no-two-pass"], False)):  # two-pass by default, as scsonet predict
        calls.clear()
        assert script.main(base + extra) == 0
        report = json.loads(out.with_suffix(".json").read_text())
        assert [s["name"] for s in report["shifts"]] == ["none", "zoom_out_skin_3"] and report["n_images"] == 4
        assert calls == [(4, 0.4, two_pass)] * 2  # the unshifted and the shifted images
        assert report["two_pass"] is two_pass
        assert ("two-pass" if two_pass else "one pass") in report["predictor"] and "predict_batch" in report["predictor"]
        assert ("two-pass" if two_pass else "one pass") in out.read_text()
    capsys.readouterr()
    for extra, needle in ((["--shifts", "nope"], "nope"), (["--predictor", "nomodule"], "--predictor"),
                          (["--out", str(tmp_path / "x.txt")], ".md")):
        argv = ["--weights", str(checkpoint), "--data", str(prepared), "--out", str(out), *extra]
        assert script.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err


def test_compare_renders_saved_reports_side_by_side_for_the_readme(prepared, tmp_path, capsys):
    script = _script()
    (tmp_path / "hook.py").write_text(PREDICTOR_FILE)
    common = ["--data", str(prepared), "--split", "test", "--predictor", f"{tmp_path / 'hook.py'}:make",
              "--shifts", "none,darker", "--device", "cpu"]
    assert script.main(["--weights", "w", "--out", str(tmp_path / "a.md"), *common]) == 0
    assert script.main(["--weights", "w", "--out", str(tmp_path / "b.md"), "--limit", "3", *common]) == 0
    capsys.readouterr()
    argv = ["--compare", f"one pass={tmp_path / 'a.json'}", "--compare", f"again={tmp_path / 'a.json'}"]
    assert script.main(argv) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0] == "| row | images | one pass pooled DSC | one pass Dice < 0.5 | again pooled DSC | again Dice < 0.5 |"
    assert lines[2] == "| as prepared | 8 | 100.00 | 0.0 % (0) | 100.00 | 0.0 % (0) |"
    assert lines[3].startswith("| darker") and lines[3].endswith("| 0.00 | 100.0 % (8) |")
    assert len(lines) == 2 + 2 + 4  # the shifts, then the four size bands
    # the README's generated block runs the same command and prints the same table
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme)
    block = f"<!-- BEGIN SCRIPT: benchmarks/robustness.py {' '.join(map(repr, argv))} -->\nstale\n<!-- END SCRIPT -->"
    assert readme.render(block) == block.replace("stale\n", table)
    assert script.main(["--compare", f"a={tmp_path / 'a.json'}", "--compare", f"b={tmp_path / 'b.json'}"]) == 2
    assert "another split, image set or seed" in capsys.readouterr().err  # never compare unlike image sets
    assert script.main(["--compare", f"a={tmp_path / 'nope.json'}"]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_truth_crop_scores_pass_2_around_the_ground_truths_lesion(prepared):
    spec = importlib.util.spec_from_file_location("twopass_eval", ROOT / "benchmarks" / "twopass_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    images, masks, ids = module.load_split(prepared, "test")
    shifts = module.get_shifts(["none", "zoom_out_flat_3"])

    class Fixed:
        input_size = (SIDE, SIDE)

        def __init__(self, rule):
            self.rule, self.seen = rule, []

        def predict_probs(self, batch):
            self.seen.append(len(batch))
            return self.rule(batch).astype(np.float32)

    red = Fixed(lambda b: b[..., 0] > 200)  # finds the synthetic lesions wherever they are
    rows = module.truth_crop_rows(red, shifts, images, masks, ids, 1.5, 0.5, batch_size=3)
    assert sum(red.seen) == 2 * len(ids)  # one pass 2 per image and shift, in batches
    assert rows["none"]["pooled_dsc"] > 0.9 and rows["zoom_out_flat_3"]["pooled_dsc"] > 0.5  # blurred by the shrink
    everything = Fixed(lambda b: np.ones(b.shape[:3], bool))  # outlines the whole crop
    crude = module.truth_crop_rows(everything, shifts, images, masks, ids, 1.5, 0.5)
    plain = [np.ones_like(m) for m in masks]
    frame = module.summarize(np.array([module._dice(p, m, 0.5)[1] for p, m in zip(plain, masks)]))[0]
    # the crop, not the frame: 1.5x the lesion's box holds more than the lesion, less than the image
    assert frame["pooled_dsc"] < crude["none"]["pooled_dsc"] < rows["none"]["pooled_dsc"]
