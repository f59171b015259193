"""Throughput of the training loader (``TrainLoader``): images per second, with and without augmentation.

    .venv/bin/python benchmarks/data_loading.py                      # data/isic2017 if prepared, else synthetic
    .venv/bin/python benchmarks/data_loading.py --data data/isic2017 --threads 2 --batch-size 8

The figure to set beside the model's training speed: if the loader delivers many more images per
second than a training step consumes, data never starves the model.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from scsonet.data import PreparedData, SplitArrays, TrainLoader


def synthetic_split(n: int, size: int) -> SplitArrays:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    masks = (torch.rand(n, 1, size, size, generator=g) > 0.5).to(torch.uint8)
    return SplitArrays(images, masks, [f"s{i}" for i in range(n)])


def images_per_second(loader: TrainLoader, batches: int) -> float:
    done, start = 0, time.perf_counter()
    epoch = 0
    while done < batches * loader.batch_size:
        loader.set_epoch(epoch)
        for x, _ in loader:
            done += len(x)
            if done >= batches * loader.batch_size:
                break
        epoch += 1
    return done / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data/isic2017", help="prepared dataset (synthetic 256x256 if absent)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size, the paper's (8)")
    p.add_argument("--batches", type=int, default=150, help="batches timed per setting (150)")
    p.add_argument("--device", default="cpu", help="device (cpu)")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    if Path(args.data, "manifest.json").exists():
        data = PreparedData(args.data)
        arrays, mean, std, source = data.load("train"), data.mean, data.std, args.data
    else:
        arrays, mean, std, source = synthetic_split(512, 256), (0.5,) * 3, (0.5,) * 3, "synthetic 256x256"
    print(f"source: {source} ({len(arrays)} images {tuple(arrays.images.shape[-2:])}), device {args.device}, "
          f"{args.threads} threads, batch {args.batch_size}")
    for augment in (True, False):
        loader = TrainLoader(arrays, args.batch_size, mean, std, augment=augment, shuffle=True, seed=0,
                             device=args.device, drop_last=True)
        images_per_second(loader, 5)  # warm-up
        rate = images_per_second(loader, args.batches)
        print(f"augment={str(augment):5}  {rate:8.0f} images/s  ({1000 * args.batch_size / rate:.2f} ms per batch)")


if __name__ == "__main__":
    main()
