"""Source layouts: where a dataset keeps its images and masks, and how the two are paired.

Pairs are matched by image ID (the file stem, less a mask suffix such as ``_segmentation``),
never by listing order. Each layout is a list of parts, an image folder with its mask folder;
each folder may also be the official ``<folder>.zip``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection

from ..errors import ScsonetError
from ..imageio import IMAGE_SUFFIXES
from .sources import FileRef, find_part, list_files

# Stripped from a mask's stem to find its image ID, tried in this order.
MASK_SUFFIXES = ("_segmentation", "_mask", "-mask", "_seg", "_gt")


@dataclass(frozen=True)
class Pair:
    id: str
    image: FileRef
    mask: FileRef


@dataclass(frozen=True)
class Problem:
    """A bad input: fatal unless ``--skip-bad``."""

    file: str
    reason: str
    id: str = ""  # the image ID it concerns, where there is one

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass
class Listing:
    pairs: list[Pair] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Layout:
    """``parts`` = (image folder, mask folder) names under the source; ``required`` parts must exist."""

    title: str
    parts: tuple[tuple[str, str], ...]
    required: bool = False
    # Files that belong to the official archives but are not data (licences, superpixel maps).
    ignored_suffixes: tuple[str, ...] = ()
    ignored_stem_endings: tuple[str, ...] = ()


LAYOUTS = {
    "isic2017": Layout("ISIC 2017", (
        ("ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
        ("ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
        ("ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth"),
    ), ignored_suffixes=(".txt", ".csv"), ignored_stem_endings=("_superpixels",)),
    "isic2018": Layout("ISIC 2018", (
        ("ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
        ("ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
        ("ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth"),
    ), ignored_suffixes=(".txt", ".csv")),
    "folder": Layout("folder", (("images", "masks"),), required=True),
}


def mask_id(stem: str, image_ids: Collection[str]) -> str:
    """The image ID a mask stem belongs to: the stem itself, or the stem less a known suffix."""
    if stem in image_ids:
        return stem
    lowered = stem.lower()
    for suffix in MASK_SUFFIXES:
        if lowered.endswith(suffix) and stem[: -len(suffix)] in image_ids:
            return stem[: -len(suffix)]
    return stem


def _data_files(part: Path, layout: Layout, listing: Listing) -> list[FileRef]:
    """Image files of a part; other files are problems unless the layout knows to ignore them."""
    files = []
    for ref in list_files(part):
        if ref.suffix in layout.ignored_suffixes or ref.stem.endswith(layout.ignored_stem_endings):
            continue
        if ref.suffix in IMAGE_SUFFIXES:
            files.append(ref)
        else:
            listing.problems.append(Problem(str(ref), "not an image file", ref.stem))
    if not files:
        raise ScsonetError(f"{part}: no image files found")
    return files


def _index(refs: list[FileRef], key, listing: Listing, kind: str) -> tuple[dict[str, FileRef], set[str]]:
    """Index refs by ``key(ref)``; an ID seen twice is a problem, and is dropped and returned."""
    index: dict[str, FileRef] = {}
    duplicated: set[str] = set()
    for ref in refs:
        k = key(ref)
        if k in index or k in duplicated:
            listing.problems.append(Problem(str(ref), f"duplicate {kind} ID {k!r} (also {index.get(k, '')})", k))
            duplicated.add(k)
        else:
            index[k] = ref
    for k in duplicated:
        index.pop(k, None)
    return index, duplicated


def list_pairs(dataset: str, src: str | Path) -> Listing:
    """Find and pair every image with its mask in ``src`` laid out as ``dataset``."""
    layout = LAYOUTS[dataset]
    src = Path(src)
    if not src.is_dir():
        raise ScsonetError(f"{src}: source folder not found")
    listing = Listing()
    image_refs, mask_refs = [], []
    for image_name, mask_name in layout.parts:
        image_part, mask_part = find_part(src, image_name), find_part(src, mask_name)
        if image_part is None or mask_part is None:
            if layout.required:
                missing = image_name if image_part is None else mask_name
                raise ScsonetError(f"{src}: no {missing}/ folder (or {missing}.zip)")
            if image_part is not None:
                listing.notes.append(f"{image_part.name} has no {mask_name}: not used (unlabelled)")
            elif mask_part is not None:
                listing.problems.append(Problem(str(mask_part), f"masks without their images {image_name}"))
            continue
        image_refs += _data_files(image_part, layout, listing)
        mask_refs += _data_files(mask_part, layout, listing)
    if not image_refs:
        expected = ", ".join(f"{i}/ with {m}/" for i, m in layout.parts)
        raise ScsonetError(f"{src}: no {layout.title} data found (expected {expected}, folders or .zip)")
    return _pair(image_refs, mask_refs, listing)


def list_folder_pairs(images: str | Path, masks: str | Path) -> Listing:
    """Pair the files of an image folder with those of a mask folder (either may be a .zip) by
    stem, under the rules of the ``folder`` layout (``scsonet data prepare --dataset folder``)."""
    listing = Listing()
    refs = []
    for part, kind in ((Path(images), "image"), (Path(masks), "mask")):
        if not part.exists():
            raise ScsonetError(f"{part}: {kind} folder not found")
        refs.append(_data_files(part, LAYOUTS["folder"], listing))
    return _pair(*refs, listing)


def _pair(image_refs: list[FileRef], mask_refs: list[FileRef], listing: Listing) -> Listing:
    """Match masks to images by ID into ``listing.pairs``; unmatched and duplicated IDs are problems."""
    images, bad_images = _index(image_refs, lambda r: r.stem, listing, "image")
    all_image_ids = images.keys() | bad_images
    masks, bad_masks = _index(mask_refs, lambda r: mask_id(r.stem, all_image_ids), listing, "mask")
    for k in sorted(images.keys() - masks.keys() - bad_masks):
        listing.problems.append(Problem(str(images[k]), "image has no mask", k))
    for k in sorted(masks.keys() - images.keys() - bad_images):
        listing.problems.append(Problem(str(masks[k]), "mask has no image", k))
    listing.pairs = [Pair(k, images[k], masks[k]) for k in sorted(images.keys() & masks.keys())]
    return listing
