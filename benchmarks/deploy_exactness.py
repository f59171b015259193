"""How exact the exported ONNX models are, with and without ``scsonet.deploy.reparameterize``.

    .venv/bin/python benchmarks/deploy_exactness.py --data data/isic2017 --images 650 --random 32 \
        --out docs/benchmarks/deploy_exactness.md

Exports the weights twice (the model's own graph, and its reparameterized twin, the default of
``scsonet export``), runs both through the pinned ONNX Runtime sessions of ``scsonet predict
--backend onnxruntime`` and PyTorch float32 on real test images (and on standard-normal inputs),
and compares every result with PyTorch float64, the exact result to ~1e-12. Prints per backend the
largest, 99.99th-percentile and mean absolute logit error, and the share of pixels whose mask
(logit >= 0) differs from float64's. The largest error is dominated by the SRU gate's jump at
w = 0.5: float32 rounding moves a few w across it, in PyTorch float32 as in ONNX Runtime.
"""
from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from scsonet._io import write_text_atomic
from scsonet.data import PreparedData
from scsonet.export import export_onnx
from scsonet.models import load_model
from scsonet.onnx_runtime import OrtSegmenter


def error_row(name: str, got: np.ndarray, exact: np.ndarray) -> str:
    err = np.abs(got - exact)
    flips = np.mean((got >= 0) != (exact >= 0))
    return (f"| {name} | {err.max():.1e} | {np.quantile(err, 0.9999):.1e} | {err.mean():.1e} | "
            f"{100 * flips:.5f} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default="scsonet-isic2017", help="weights name, .pt or .safetensors (scsonet-isic2017)")
    p.add_argument("--data", type=Path, default=Path("data/isic2017"), help="prepared dataset (data/isic2017)")
    p.add_argument("--images", type=int, default=100, help="real images, the first of the test split (100)")
    p.add_argument("--random", type=int, default=16, help="standard-normal inputs (16)")
    p.add_argument("--out", help="also write the command and its output to this Markdown file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    loaded = load_model(args.weights)
    model, model64 = loaded.model.eval(), copy.deepcopy(loaded.model).double().eval()
    images = torch.as_tensor(np.asarray(PreparedData(args.data, verify=False).load("test").images[:args.images]))
    inputs = {"real": torch.cat([loaded.preset(images[i:i + 8]) for i in range(0, len(images), 8)]),
              "random": torch.randn(args.random, 3, *loaded.preset.resize_size, generator=torch.Generator().manual_seed(0))}
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        segmenters = {}
        for name, lean in (("onnxruntime, model graph", False), ("onnxruntime, reparameterized", True)):
            path = Path(tmp) / f"{lean}.onnx"
            export_onnx(loaded, path, check=False, reparameterize=lean)
            segmenters[name] = OrtSegmenter(path, threads=1)
        for kind, x in inputs.items():
            batches = x.split(8)
            with torch.inference_mode():
                exact = torch.cat([model64(b.double()) for b in batches]).numpy()
                results = {"torch float32": torch.cat([model(b) for b in batches]).numpy()}
            for name, segmenter in segmenters.items():
                results[name] = np.concatenate([segmenter.logits(b.numpy()) for b in batches])
            lines = [f"{kind} inputs ({len(x)} images): absolute logit error to PyTorch float64", "",
                     "| backend | max | 99.99 % | mean | mask flips % |", "| --- | ---: | ---: | ---: | ---: |"]
            lines += [error_row(name, got, exact) for name, got in results.items()]
            tables.append("\n".join(lines) + "\n")
            print(tables[-1], flush=True)
    if args.out:
        command = shlex.join(["python", "benchmarks/deploy_exactness.py", *(sys.argv[1:] if argv is None else argv)])
        write_text_atomic(args.out, f"```\n$ {command}\n```\n\n" + "\n".join(tables))


if __name__ == "__main__":
    main()
