"""Read images of any mode into RGB uint8, and expand files, folders and globs into image paths.

Torch-free (numpy and Pillow only), so the ONNX Runtime path can use it without PyTorch.
"""
from __future__ import annotations

import functools
import glob
import os
import re
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ScsonetError
from .postprocess import resize_image

__all__ = ["IMAGE_SUFFIXES", "ImageLike", "InputError", "LazyImage", "TTA_FLIPS", "encode_mask_png", "encode_png",
           "expand_inputs", "image_suffixes", "is_image_suffix", "read_draft", "read_image", "shrink_to",
           "to_rgb_array"]

# Flips of the test-time augmentation, as axes of an (N, C, H, W) array or tensor: identity,
# horizontal, vertical, both. Each is its own inverse. (Here, without torch, for both backends.)
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))

_ORIENTATION = 0x0112  # the EXIF tag


# Pillow's ``preinit`` plugins (and MPO, the JPEG variant some cameras write, which the JPEG plugin
# opens): a file with one of their suffixes is an image without loading Pillow's other ~40 plugins
# and the optional ones, which costs more than a tenth of a second at start-up.
_COMMON_FORMATS = frozenset({"BMP", "GIF", "JPEG", "MPO", "PNG", "PPM"})


@functools.lru_cache(maxsize=None)
def _decodable_formats() -> frozenset:
    """Pillow formats (with every plugin loaded, HEIC/HEIF too through the optional pillow-heif:
    ``pip install scsonet[heic]``) that decode pixels: stubs (WMF/EMF, GRIB, BUFR, HDF5 need an
    external handler) and MPEG (identified, never decoded) are left out."""
    try:
        from pillow_heif import register_heif_opener
    except ImportError:
        pass
    else:
        register_heif_opener()
    Image.init()

    def stub(factory) -> bool:
        return isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)

    return frozenset(fmt for fmt, (factory, _) in Image.OPEN.items() if fmt != "MPEG" and not stub(factory)) | {"MPO"}


@functools.lru_cache(maxsize=None)
def image_suffixes() -> tuple[str, ...]:
    """Every suffix Pillow maps to a decodable format (loads every plugin); folders and globs
    select images by it."""
    formats = _decodable_formats()
    return tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in formats))


def is_image_suffix(suffix: str) -> bool:
    """Whether files ending in ``suffix`` are images (``image_suffixes``); the common ones are
    recognised without loading every Pillow plugin."""
    suffix = suffix.lower()
    Image.preinit()
    return Image.EXTENSION.get(suffix) in _COMMON_FORMATS or suffix in image_suffixes()


def __getattr__(name: str):
    if name == "IMAGE_SUFFIXES":  # computed on first use: it loads every Pillow plugin
        return image_suffixes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_KINDS = "image Pillow reads (JPEG, PNG, WebP, GIF, TIFF, BMP, ...)"
_KINDS_PLURAL = "images Pillow reads (JPEG, PNG, WebP, GIF, TIFF, BMP, ...)"

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


@dataclass(frozen=True)
class InputError:
    """An input that yields no image: ``source`` is the path or pattern as given, or the file a
    folder or pattern held that is not an image."""

    source: str
    message: str
    # True for a file in a folder (or matched by a pattern) passed over as not an image.
    skipped: bool = False
    # True for a file named directly whose suffix is no image's: a mistake in the command, not in the data.
    not_an_image: bool = False


def _scale_to_uint8(values: np.ndarray, full_scale: float) -> np.ndarray:
    return np.clip(np.rint(values.astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode -> (H, W, 3) uint8. 16-bit and float greys are rescaled, not clipped;
    alpha is dropped (dermoscopy has no meaningful transparency)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        grey = np.asarray(img)
        # Mode "I" also holds 8-bit data from some TIFF writers: only rescale what exceeds 8 bits.
        full_scale = 65535.0 if img.mode != "I" or grey.max(initial=0) > 255 else 255.0
        return np.repeat(_scale_to_uint8(grey, full_scale)[..., None], 3, axis=2)
    if img.mode == "F":
        grey = np.asarray(img)
        full_scale = 1.0 if grey.max(initial=0) <= 1.0 else 255.0
        return np.repeat(_scale_to_uint8(grey, full_scale)[..., None], 3, axis=2)
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # convert would copy an RGB image


def _too_many_pixels(path: Path, err: Exception) -> ScsonetError:
    # Pillow names the pixel count only in its message; the limit is its warning threshold (at 2x
    # it raises instead of warning, but both are refused here).
    count = re.search(r"\((\d+) pixels\)", str(err))
    size = f"{int(count[1]) / 1e6:.1f} megapixels" if count else "too many pixels"
    limit = Image.MAX_IMAGE_PIXELS or 0
    return ScsonetError(f"{path}: image of {size} is over the limit of {limit / 1e6:.1f} megapixels "
                        f"({limit} pixels; a decompression bomb, or downscale it first)")


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode ``path`` fully, apply its EXIF orientation and return (H, W, 3) uint8 RGB.

    Any format Pillow decodes (HEIC/HEIF too when pillow-heif is installed); of an animation or
    a multi-page file (GIF, WebP, APNG, TIFF), the first frame.

    Images over Pillow's ``Image.MAX_IMAGE_PIXELS`` (89.5 megapixels by default, 3 x a 30 MP
    dermoscope photo) are refused before they are decoded: at that size Pillow only warns, but
    decoding and segmenting one takes gigabytes, and a tiny file can claim any size.

    Raises:
        ScsonetError: one line naming the file (missing, not an image, truncated, unsupported,
            too many pixels, not enough memory).
    """
    return _decode(Path(path))[0]


def _decode(path: Path, draft: Optional[tuple[int, int]] = None,
            as_image: bool = False) -> tuple[np.ndarray | Image.Image, tuple[int, int]]:
    """``read_image``, or with ``draft`` = (width, height) (after the EXIF orientation) a JPEG decoded at the smallest of its
    1/2, 1/4, 1/8 scales still at least that size (Pillow's draft mode: several times faster on
    big photos; other formats decode fully). Returns the RGB array (with ``as_image``, for a JPEG
    only: the RGB Pillow image, not copied into numpy) and the full-size image's (height, width)
    after the EXIF orientation."""
    if not path.is_file():
        raise ScsonetError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    size = None
    try:
        if Image.EXTENSION.get(path.suffix.lower()) not in _COMMON_FORMATS:
            _decodable_formats()  # every plugin, HEIC's too, before Image.open looks for one
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
        with img:
            size = img.size
            if img.format not in _COMMON_FORMATS and img.format not in _decodable_formats():
                raise ScsonetError(f"{path}: {img.format} files hold no pixels Pillow can decode here")
            orientation = img.getexif().get(_ORIENTATION, 1)
            swap = orientation in (5, 6, 7, 8)  # EXIF turns the image a quarter
            if draft is not None and img.format in ("JPEG", "MPO"):
                img.draft("RGB", (draft[1], draft[0]) if swap else draft)  # the file's own axes
            img.load()  # decode now: a truncated file fails here, not later
            full = (size[0], size[1]) if swap else (size[1], size[0])
            if orientation in range(2, 9):  # else exif_transpose would only copy the image
                img = ImageOps.exif_transpose(img)
            if as_image:
                rgb = img if img.mode == "RGB" else img.convert("RGB")
            else:
                rgb = _pil_to_rgb(img)
    except UnidentifiedImageError:
        raise ScsonetError(f"{path}: not an {_KINDS} (cannot identify the file's format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise _too_many_pixels(path, err) from None
    except MemoryError:
        shape = f"{size[0]}x{size[1]} " if size else ""
        raise ScsonetError(f"{path}: not enough memory to decode this {shape}image") from None
    except (OSError, ValueError, SyntaxError) as err:  # Pillow's decoders raise all three on corrupt data
        raise ScsonetError(f"{path}: truncated or corrupt image ({err})") from None
    if 0 in (rgb.size if as_image else rgb.shape[:2]):
        raise ScsonetError(f"{path}: image has no pixels")
    return rgb, full


class LazyImage:
    """An image file decoded at a reduced size now (``read_draft``) and at full size only when a
    full-resolution region is asked for (``image[y0:y1, x0:x1]``, as two-pass's second pass does).

    ``shape`` is the full image's (H, W, 3); ``resized`` and ``preview`` work from the reduced
    decode, which is at least the size asked for (exact when the file decodes fully anyway).
    """

    def __init__(self, path: Path, draft: np.ndarray, shape: tuple[int, int]):
        self.path, self.draft, self.shape = path, draft, (*shape, 3)
        self._full: Optional[np.ndarray] = draft if draft.shape[:2] == tuple(shape) else None

    @property
    def decoded_fully(self) -> bool:
        return self._full is not None

    def full(self) -> np.ndarray:
        if self._full is None:
            self._full = read_image(self.path)
        return self._full

    def __getitem__(self, key):
        return self.full()[key]

    def __array__(self, dtype=None, copy=None):
        return self.full() if dtype is None else self.full().astype(dtype)

    def resized(self, size: tuple[int, int]) -> np.ndarray:
        """The image at ``size`` = (height, width), bilinear from the reduced decode."""
        return resize_image(self.draft, size)

    def crop_resized(self, window: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
        """Full-image region ``window`` = (x0, y0, x1, y1) resized to ``size`` = (height, width), from
        the coarsest decode that still holds ``size`` in the region: the reduced decode, or the
        file decoded again just fine enough (in full at worst). A JPEG's reduced decode is scaled
        in the DCT domain, itself a filtered reduction, so the region need not hold more than
        ``size`` (a second decode costs a 12 MP photo as much as the first, ~25 ms: most crops
        of a photo whose lesion is not tiny are served from the first)."""
        x0, y0, x1, y1 = window
        height, width = self.shape[:2]
        need_h, need_w = size[0] * height / max(y1 - y0, 1), size[1] * width / max(x1 - x0, 1)
        source = self._full
        if source is None:
            if self.draft.shape[0] >= need_h and self.draft.shape[1] >= need_w:
                source = self.draft
            else:  # decoded again, and resized straight from Pillow's image, not copied into numpy
                finer, full = _decode(self.path, (int(need_w) + 1, int(need_h) + 1), as_image=True)
                if finer.size == (width, height):
                    self._full = source = _pil_to_rgb(finer)
                else:
                    source = finer
        if isinstance(source, np.ndarray) and source.shape[:2] == (height, width):
            return resize_image(np.ascontiguousarray(source[y0:y1, x0:x1]), size)
        if isinstance(source, np.ndarray):
            source = Image.fromarray(source)
        sy, sx = source.height / height, source.width / width
        return np.asarray(source.resize((size[1], size[0]), Image.BILINEAR, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy)))

    def preview(self, longest: Optional[int]) -> np.ndarray:
        """The image with its longest side at most ``longest`` (None: the full image)."""
        if longest is None:
            return self.full()
        source = self._full if self._full is not None and max(self.draft.shape[:2]) < longest else self.draft
        return shrink_to(source, longest)


def shrink_to(rgb: np.ndarray, longest: int) -> np.ndarray:
    """``rgb`` with its longest side at most ``longest`` (aspect kept; unchanged if already)."""
    h, w = rgb.shape[:2]
    if max(h, w) <= longest:
        return rgb
    scale = longest / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR))


def read_draft(path: str | os.PathLike, min_size: tuple[int, int]) -> LazyImage:
    """``path`` as a ``LazyImage`` whose reduced decode is at least ``min_size`` = (height, width)
    on each side (a big JPEG decodes at 1/2 to 1/8 scale); errors as ``read_image``."""
    path = Path(path)
    rgb, full = _decode(path, (int(min_size[1]), int(min_size[0])))
    return LazyImage(path, rgb, full)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_mask_png(mask: np.ndarray) -> bytes:
    """A bool (H, W) mask as an 8-bit greyscale PNG of 0 and 255 (as ``encode_png``)."""
    height, width = mask.shape
    rows = np.zeros((height, width + 1), np.uint8)  # filter type 0 (none) opens each row
    rows[:, 1:] = mask
    rows[:, 1:] *= 255  # in place: a 12 MP mask * 255 would be another 12 MB array
    return _png(rows, width, height, colour=False)


def encode_png(pixels: np.ndarray) -> bytes:
    """An 8-bit greyscale (H, W) or RGB (H, W, 3) PNG, as Pillow would write it (and reads it
    back), 2-3x faster: Pillow tries every PNG filter on every row. A greyscale image (a mask:
    long runs of one value) is stored unfiltered, an RGB one (a photo) with the "up" filter, the
    difference from the row above, which compresses photos as well as Pillow's choice; both
    with zlib's run-length strategy at level 1."""
    pixels = np.asarray(pixels, dtype=np.uint8)
    height, width = pixels.shape[:2]
    colour = pixels.ndim == 3
    flat = pixels.reshape(height, -1)
    rows = np.empty((height, flat.shape[1] + 1), np.uint8)  # each row opens with its filter type
    rows[:, 0] = 2 if colour else 0
    if colour:
        rows[0, 1:] = flat[0]
        np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # modulo 256, as PNG's filter is defined
    else:
        rows[:, 1:] = flat
    return _png(rows, width, height, colour)


def _png(rows: np.ndarray, width: int, height: int, colour: bool) -> bytes:
    packer = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    header = struct.pack(">IIBBBBB", width, height, 8, 2 if colour else 0, 0, 0, 0)  # no interlace
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
            + _png_chunk(b"IDAT", packer.compress(rows) + packer.flush()) + _png_chunk(b"IEND", b""))


def to_rgb_array(image: ImageLike) -> np.ndarray:
    """A path, a PIL image or an array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> (H, W, 3) uint8.

    Arrays may be uint8, uint16 (rescaled by 1/257), bool, or float in 0..1; alpha is dropped.
    A PIL image gets its EXIF orientation applied, as a file read from disk does.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(ImageOps.exif_transpose(image))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a path, a PIL image or a numpy array, not {type(image).__name__}")
    arr = image
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {image.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        arr = _scale_to_uint8(arr, 65535.0)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0.0 or arr.max() > 1.0:
            raise ValueError("float image arrays must hold values in 0..1; pass uint8 for 0..255")
        arr = _scale_to_uint8(arr, 1.0)
    elif arr.dtype != np.uint8:
        raise ValueError(f"image array dtype {arr.dtype} is not supported (uint8, uint16, bool, float 0..1)")
    arr = arr[..., :3]
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr)


def _is_image_file(path: Path) -> bool:
    return path.is_file() and is_image_suffix(path.suffix)


def _hint(suffix: str) -> str:
    return "; pip install 'scsonet[heic]' to read them" if suffix.lower() in (".heic", ".heif") else ""


def _not_an_image(path: Path, given_as: str) -> InputError:
    kind = f"{path.suffix!r} files" if path.suffix else "files without a suffix"
    return InputError(str(path), f"{path}: skipped{given_as}: {kind} are not {_KINDS_PLURAL}{_hint(path.suffix)}",
                      skipped=True)


def _select(candidates, given_as: str, errors: list[InputError]) -> list[Path]:
    """Images of ``candidates``, sorted; each other file is named in ``errors`` (subfolders are
    not searched, and not reported)."""
    found = []
    for p in sorted(candidates):
        if _is_image_file(p):
            found.append(p)
        elif p.is_file():
            errors.append(_not_an_image(p, given_as))
    return found


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[InputError]]:
    """Files, folders (their images, not recursive) and glob patterns -> image paths, in the
    given order, each once; plus one error per input that yields no image and one per file
    in a folder or matched by a pattern that is not an image (``skipped=True``), each once.

    An image is a file whose suffix Pillow (with its optional plugins) maps to a format it
    decodes: ``image_suffixes()``."""
    paths: list[Path] = []
    errors: list[InputError] = []
    for item in inputs:
        source = os.fspath(item)
        path = Path(source)
        if path.is_dir():
            found = _select(path.iterdir(), f" in folder {source}", errors)
            if not found:
                errors.append(InputError(source, f"{source}: folder has no {_KINDS_PLURAL}"))
        elif path.is_file():
            found = [path]
            if not is_image_suffix(path.suffix):
                errors.append(InputError(source, f"{source}: unsupported file type {path.suffix or '(none)'!r} "
                                                 f"(expected an {_KINDS}{_hint(path.suffix)})", not_an_image=True))
                found = []
        elif any(c in source for c in "*?["):
            found = _select(map(Path, glob.glob(source, recursive=True)), f" (matched by {source})", errors)
            if not found:
                errors.append(InputError(source, f"{source}: pattern matches no {_KINDS_PLURAL}"))
        else:
            found = []
            errors.append(InputError(source, f"{source}: no such file or folder"))
        paths.extend(found)
    unique: dict[Path, Path] = {}
    for p in paths:
        unique.setdefault(p.resolve(), p)  # the same file named twice is done once
    reported: dict[str, InputError] = {}
    for err in errors:
        reported.setdefault(err.source, err)  # and a bad one is reported once
    return list(unique.values()), list(reported.values())
