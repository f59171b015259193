"""Small synthetic datasets for the data tests: every pair carries its index in its pixels.

Image k is a flat colour whose red channel is ``red(k)``; its mask marks the top ``rows(k)`` rows
of the prepared image. A prepared pair is therefore correct if and only if its image and mask
agree on k, whatever the file names or listing order.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

OUT = 16  # prepared side used by the tests


def red(k: int) -> int:
    return 20 + 9 * k


def rows(k: int) -> int:
    return 2 + k % 10


def image_array(k: int, h: int = 24, w: int = 20) -> np.ndarray:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = red(k), 100, 50
    return arr


def mask_array(k: int, scale: int = 2) -> np.ndarray:
    """At ``scale`` times the prepared size; nearest resizing keeps exactly ``rows(k)`` rows."""
    mask = np.zeros((OUT * scale, OUT * scale), np.uint8)
    mask[: rows(k) * scale] = 255
    return mask


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 98} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


def write_zip(path: Path, top: str, files: dict[str, bytes]) -> None:
    """An archive like the official ones: every member inside the folder ``top/``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}/", b"")
        for name, data in files.items():
            zf.writestr(f"{top}/{name}", data)


def folder_dataset(root: Path, n: int = 10, mask_suffix: str = "_mask") -> Path:
    """``root/images/{id}.png`` and ``root/masks/{id}{mask_suffix}.png``, ids img0..img{n-1}."""
    write_files(root / "images", {f"img{k}.png": encode(image_array(k)) for k in range(n)})
    write_files(root / "masks", {f"img{k}{mask_suffix}.png": encode(mask_array(k)) for k in range(n)})
    return root


def isic_parts(first: int, n: int) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """Official-style image and ground-truth files for IDs ISIC_{first:07d}.. (plus licence files)."""
    images = {f"ISIC_{k:07d}.jpg": encode(image_array(k), "JPEG") for k in range(first, first + n)}
    masks = {f"ISIC_{k:07d}_segmentation.png": encode(mask_array(k)) for k in range(first, first + n)}
    images["LICENSE.txt"] = masks["ATTRIBUTION.txt"] = b"CC-0\n"
    return images, masks


def check_pairs(images: np.ndarray, masks: np.ndarray, ids: list[str]) -> None:
    """Assert every prepared pair (uint8 (N, H, W, 3) and (N, H, W)) is its ID's image and mask."""
    for image, mask, image_id in zip(images, masks, ids):
        k = int("".join(c for c in image_id if c.isdigit()))
        assert abs(int(image[..., 0].mean()) - red(k)) <= 3, image_id
        assert mask.sum(1).astype(bool).sum() == rows(k), image_id
        assert set(np.unique(mask)) <= {0, 1}


def random_scsonet_checkpoint(path: Path) -> Path:
    """A random-init SCSONet (seed 0) saved as a training checkpoint at 256x256."""
    import torch

    from scsonet.models import create_model

    torch.manual_seed(0)
    torch.save({"model": create_model("scsonet").state_dict(), "model_name": "scsonet", "model_args": {},
                "preprocessing": {"resize_size": [256, 256], "mean": [0.5] * 3, "std": [0.5] * 3}}, path)
    return path
