"""Test-set accuracy of the exported models: PyTorch eager vs ONNX Runtime float32 vs int8.

    .venv/bin/python benchmarks/onnx_accuracy.py --weights scsonet-isic2017 --data data/isic2017

Exports the weights (float32, checked as ``scsonet export`` does; int8 calibrated on
``--calibration`` images of the TRAIN split, never the evaluated one), then scores each backend
with ``scsonet.evaluation.evaluate`` (pooled and per-image DSC, as ``scsonet evaluate`` prints
them) and counts the pixels whose thresholded mask differs from PyTorch's.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from scsonet.data import PreparedData
from scsonet.evaluation import evaluate
from scsonet.export import export_onnx, quantize_int8
from scsonet.models import load_model
from scsonet.onnx_runtime import OrtSegmenter


class OrtModule(nn.Module):
    """An ONNX Runtime model behind ``nn.Module.forward`` (normalised images -> logits), for ``evaluate``."""

    def __init__(self, path: Path):
        super().__init__()
        self.segmenter = OrtSegmenter(path, threads=torch.get_num_threads())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.segmenter.logits(x.cpu().numpy()))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="scsonet-isic2017", help="weights name, .pt or .safetensors (scsonet-isic2017)")
    p.add_argument("--data", type=Path, default=Path("data/isic2017"), help="prepared dataset (data/isic2017)")
    p.add_argument("--split", default="test", help="evaluated split (test)")
    p.add_argument("--calibration", type=int, default=64, help="train images that calibrate int8 (64)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(args.weights)
    data = PreparedData(args.data, verify=False)
    arrays, train = data.load(args.split), data.load("train")
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(loaded, fp32)
        pick = np.random.default_rng(0).choice(len(train), size=min(args.calibration, len(train)), replace=False)
        images = torch.as_tensor(np.asarray(train.images)[np.sort(pick)])
        calibration = [loaded.preset(images[i:i + 8]).numpy() for i in range(0, len(images), 8)]
        quantize_int8(fp32, int8, calibration)
        backends = {"torch eager": loaded.model, "onnxruntime float32": OrtModule(fp32), "onnxruntime int8": OrtModule(int8)}
        results = {name: evaluate(model, arrays, loaded.preset, hd95=False, split=args.split)
                   for name, model in backends.items()}
    reference = np.stack([[r["tp"], r["fp"], r["fn"]] for r in results["torch eager"][1]])
    print(f"{args.weights} on {args.data} split {args.split} ({len(arrays.ids)} images), threshold 0.5\n")
    print("| backend | DSC pooled % | DSC per-image % | IoU pooled % | change in pooled DSC (points) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base = results["torch eager"][0]["pooled"]["dsc"]
    for name, (report, rows) in results.items():
        pooled, per_image = report["pooled"], report["per_image"]
        print(f"| {name} | {100 * pooled['dsc']:.3f} | {100 * per_image['dice_mean']:.3f} | {100 * pooled['miou']:.3f} | "
              f"{100 * (pooled['dsc'] - base):+.3f} |")
    for name, (_, rows) in results.items():
        counts = np.stack([[r["tp"], r["fp"], r["fn"]] for r in rows])
        print(f"{name}: |TP, FP, FN count change| vs torch summed over images {int(np.abs(counts - reference).sum())}")


if __name__ == "__main__":
    main()
