#!/usr/bin/env python
"""Draw training samples through a config's augmentation, mask outlines on, into one picture.

    .venv/bin/python scripts/augment_examples.py --config configs/isic2017_scsonet_robust.yaml \\
        --out docs/augment_examples.png

A visual check that ``RobustAugment`` makes plausible photos and that the masks follow: 16 train
samples by default (a fixed choice, ``--seed``), each through the paper's flips and rotation and
the config's ``robust_augment``. Also prints the share of lesion per sample before and after over
a larger draw (``--stats N``), to show that the size distribution stays broad.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from scsonet._io import atomic_path
from scsonet.data import PaperAugment, PreparedData, RobustAugment
from scsonet.data.show import make_grid
from scsonet.errors import ScsonetError
from scsonet.train import load_config


def _augment(cfg, images, masks, seed):
    aug = RobustAugment(cfg.robust_augment, PaperAugment() if cfg.augment else None) if cfg.robust_augment \
        else (PaperAugment() if cfg.augment else None)
    x, y = images.float(), masks.float()
    if aug is not None:
        x, y = aug(x, y, torch.Generator().manual_seed(seed))
    return x.round().clamp(0, 255).to(torch.uint8), y


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/isic2017_scsonet_robust.yaml", help="training config (robust)")
    p.add_argument("--data", default=None, help="prepared dataset (the config's data)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, as scsonet train --set does (e.g. robust_augment={zoom_in: 0.4})")
    p.add_argument("--out", type=Path, default=Path("docs/augment_examples.png"), help="PNG to write")
    p.add_argument("--n", type=int, default=16, help="samples in the picture (16)")
    p.add_argument("--seed", type=int, default=0, help="choice of samples and augmentation draws (0)")
    p.add_argument("--stats", type=int, default=512, help="samples for the lesion-share statistics (512; 0 = none)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides + ([f"data={args.data}"] if args.data else []))
        arrays = PreparedData(cfg.data).load("train")
        rng = np.random.default_rng(args.seed)
        pick = torch.from_numpy(np.sort(rng.choice(len(arrays), min(args.n, len(arrays)), replace=False)))
        x, y = _augment(cfg, arrays.images[pick], arrays.masks[pick], args.seed)
        sheet = make_grid(x.permute(0, 2, 3, 1).numpy(), y[:, 0].numpy().astype(np.uint8),
                          [arrays.ids[i] for i in pick.tolist()])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.out) as tmp:
            sheet.save(tmp, format="PNG")
        print(f"wrote {args.out}")
        if args.stats:
            pick = torch.from_numpy(rng.choice(len(arrays), min(args.stats, len(arrays)), replace=False))
            before = arrays.masks[pick].float().mean((1, 2, 3))
            after = torch.cat([_augment(cfg, arrays.images[c], arrays.masks[c], args.seed + 1 + k)[1].mean((1, 2, 3))
                               for k, c in enumerate(pick.split(8))])
            bands = [0.0, 0.05, 0.30, 0.60, 1.01]
            print("lesion share of the image   <5 %   5-30 %  30-60 %  >60 %")
            for name, share in (("before", before), ("after", after)):
                counts = np.histogram(share.numpy(), bins=bands)[0] / len(share) * 100
                print(f"{name:<27}" + "".join(f"{c:7.1f}%" for c in counts))
    except ScsonetError as err:
        print(f"augment_examples.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
