"""Throughput of the training loader (``TrainLoader``): ms per batch with the paper's augmentation, a robust one, none.

    .venv/bin/python benchmarks/data_loading.py                      # data/isic2017 if prepared, else synthetic
    .venv/bin/python benchmarks/data_loading.py --data data/isic2017 --threads 2 --batch-size 8 \\
        --robust configs/ablation/robust_all.yaml --out docs/benchmarks/data_loading.md

Batches are timed one by one; the median is the figure to report. The figure to set beside the model's training speed: if the loader delivers many more images per
second than a training step consumes, data never starves the model. ``--robust`` adds a row with
the ``robust_augment`` probabilities of a training config (``RobustAugment`` after the paper's).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from scsonet._io import write_text_atomic
from scsonet.data import PreparedData, SplitArrays, TrainLoader


def synthetic_split(n: int, size: int) -> SplitArrays:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    masks = (torch.rand(n, 1, size, size, generator=g) > 0.5).to(torch.uint8)
    return SplitArrays(images, masks, [f"s{i}" for i in range(n)])


def batch_seconds(loader: TrainLoader, batches: int) -> list[float]:
    """Wall time of each of ``batches`` batches, over as many epochs as that takes."""
    times, epoch = [], 0
    while len(times) < batches:
        loader.set_epoch(epoch)
        start = time.perf_counter()
        for _ in loader:
            times.append(time.perf_counter() - start)
            if len(times) == batches:
                break
            start = time.perf_counter()
        epoch += 1
    return times


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/isic2017", help="prepared dataset (synthetic 256x256 if absent)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size, the paper's (8)")
    p.add_argument("--batches", type=int, default=150, help="batches timed per setting (150)")
    p.add_argument("--device", default="cpu", help="device (cpu)")
    p.add_argument("--robust", help="training config whose robust_augment adds a row (e.g. configs/ablation/robust_all.yaml)")
    p.add_argument("--out", help="also write the command and its output to this Markdown file")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if Path(args.data, "manifest.json").exists():
        data = PreparedData(args.data)
        arrays, mean, std, source = data.load("train"), data.mean, data.std, args.data
    else:
        arrays, mean, std, source = synthetic_split(512, 256), (0.5,) * 3, (0.5,) * 3, "synthetic 256x256"
    settings = [("paper", True, None), ("none", False, None)]
    if args.robust:
        from scsonet.train import load_config

        settings.insert(1, (f"robust ({args.robust})", True, load_config(args.robust).robust_augment))
    lines = [f"source: {source} ({len(arrays)} images {tuple(arrays.images.shape[-2:])}), device {args.device}, "
             f"{args.threads} threads, batch {args.batch_size}, torch {torch.__version__}, "
             f"load average {os.getloadavg()[0]:.1f} at the start"]
    print(lines[0])
    for label, augment, robust in settings:
        loader = TrainLoader(arrays, args.batch_size, mean, std, augment=augment, shuffle=True, seed=0,
                             device=args.device, drop_last=True, robust_augment=robust)
        batch_seconds(loader, 5)  # warm-up
        times = sorted(batch_seconds(loader, args.batches))
        # The median resists other processes sharing the cores; the best batch shows the ceiling.
        median, best = times[len(times) // 2], times[0]
        lines.append(f"augment={label}: {1000 * median:.2f} ms per batch median ({args.batch_size / median:.0f} "
                     f"images/s), {1000 * best:.2f} ms best")
        print(lines[-1])
    if args.out:
        command = " ".join(["python benchmarks/data_loading.py", *(argv if argv is not None else sys.argv[1:])])
        write_text_atomic(args.out, "```\n$ " + command + "\n```\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
