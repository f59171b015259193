"""Augmentation beyond the paper's, for photos where the lesion is small, off-centre and surrounded.

The ISIC crops teach a model that the lesion fills the frame. ``RobustAugment`` shows it the other
cases too, in both directions of scale (zooming out and in, so large lesions stay common):

- geometry: ``zoom_out`` (the photo shrunk to 0.3..0.9 of the side, anywhere on a canvas),
  ``zoom_in`` (a 0.5..0.9 sub-window, which may cut the lesion, enlarged) and ``translate``
  (a shift of up to 0.3 of the side), each with a mild aspect change as when a 4:3 photo is
  resized to a square;
- surroundings that are not flat, wherever a moved photo does not cover the frame (the corners
  that the paper's rotation alone uncovers stay black, as in the paper): ``skin_canvas`` (a
  lesion-free half-size window of another photo of the batch, enlarged), ``texture_canvas``
  (procedural cloth, glove or paper), otherwise a flat colour near the photo's border colour;
  ``fingers`` (shaded skin-toned capsules entering from an edge) and ``ruler`` (a graduated
  strip) over the result; ``hard_seam`` shows a moved photo as pasted (a hard edge, the borrowed
  skin's own tone) where otherwise its seam is soft and the skin's tone pulled towards its own;
- ``ink``: a surgical marker's dots, strokes or a ring around the lesion, drawn on the skin (a
  translucent dye: the lesion under it stays lesion in the mask), as in clinical photos before
  an excision and in many ISIC images: dark, saturated blobs that are not the lesion;
- a dermoscope's ``frame`` (near-black outside a circle);
- photometric: ``color`` (brightness, contrast, saturation, colour temperature),
  ``illumination`` (a smooth gradient and a vignette), ``blur``, ``noise`` and ``jpeg``
  (8x8 block DCT quantisation at quality 30..90 with 4:2:0 chroma).

Anything drawn over the lesion (fingers, ruler, frame, a canvas) is background in the mask.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping

import torch
import torch.nn.functional as F

from ..errors import ScsonetError
from .augment import PaperAugment

BASE_TRANSFORMS = ("zoom_out", "zoom_in", "translate", "skin_canvas", "texture_canvas", "fingers", "ruler",
                   "frame", "color", "illumination", "blur", "noise", "jpeg")
# Added later, with draws of their own taken only by configs that use them, so that the batches
# of a config without them (the ablation's, v2's) stay bit-identical to those it was trained on.
LATER_TRANSFORMS = ("hard_seam", "ink")
TRANSFORMS = BASE_TRANSFORMS + LATER_TRANSFORMS

# Columns of the per-sample block of uniform draws: (name, count). Every sample draws all of
# them whichever transforms fire, so the random stream depends on the batch size only.
_LAYOUT = (("fire", len(BASE_TRANSFORMS)), ("geometry", 4), ("feather", 1), ("canvas", 9), ("texture", 14),
           ("fingers", 11), ("ruler", 7), ("frame", 5), ("color", 4), ("illumination", 5), ("blur", 1),
           ("noise", 3), ("jpeg", 1))


def _columns(layout: tuple[tuple[str, int], ...]) -> tuple[dict[str, slice], int]:
    """Each name's slice of a block of draws laid out as ``layout``, and the block's width."""
    offsets, n = {}, 0
    for name, count in layout:
        offsets[name] = slice(n, n + count)
        n += count
    return offsets, n


_OFFSETS, _NUM_DRAWS = _columns(_LAYOUT)
_LATER_OFFSETS, _NUM_LATER_DRAWS = _columns((("fire", len(LATER_TRANSFORMS)), ("seam", 1), ("ink", 12)))
_LATTICES = (4, 8, 16, 32)  # value-noise lattice sides of the procedural textures (grain: the noise bank)
_NUM_LATTICE = sum(s * s for s in _LATTICES)

_NOISE_MARGIN = 128  # the noise bank is this much larger than the image: random crops of it
# Surgical marker inks as transmittances (RGB 0..1): gentian violet, purple, blue, near-black.
_INK = ((0.42, 0.22, 0.62), (0.55, 0.30, 0.58), (0.30, 0.36, 0.70), (0.26, 0.24, 0.32))
# Skin tones (light to dark) for fingers; glove colours: blue and purple nitrile, white and beige latex, black.
_SKIN = ((242, 206, 186), (228, 182, 152), (205, 154, 118), (170, 118, 84), (124, 84, 58), (86, 58, 42))
_GLOVE = ((86, 128, 206), (128, 98, 186), (236, 234, 226), (228, 208, 168), (44, 44, 50))
# JPEG Annex K quantisation tables (luma, chroma), scaled by quality as libjpeg does.
_Q_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
           14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
           49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_Q_CHROMA = (17, 18, 24, 47) + (99,) * 4 + (18, 21, 26, 66) + (99,) * 4 + (24, 26, 56) + (99,) * 5 + (47, 66) \
    + (99,) * 38


def check_robust_config(probs: Mapping) -> dict[str, float]:
    """``{transform: probability}`` checked: known names, numbers in 0..1 (ScsonetError otherwise)."""
    if not isinstance(probs, Mapping):
        raise ScsonetError(f"config robust_augment={probs!r}: expected a mapping of transform: probability")
    checked = {}
    for name, p in probs.items():
        if name not in TRANSFORMS:
            raise ScsonetError(f"config robust_augment.{name}={p!r}: unknown transform; "
                               f"choose from {', '.join(TRANSFORMS)}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ScsonetError(f"config robust_augment.{name}={p!r}: expected a probability in 0..1")
        checked[name] = float(p)
    return checked


def _pixels(h: int, w: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in pixels: x (1, 1, 1, W) and y (1, 1, H, 1)."""
    xs = torch.arange(w, device=like.device, dtype=like.dtype) + 0.5
    ys = torch.arange(h, device=like.device, dtype=like.dtype) + 0.5
    return xs.view(1, 1, 1, w), ys.view(1, 1, h, 1)


def _v(t: torch.Tensor) -> torch.Tensor:
    """Per-sample values (N,) -> (N, 1, 1, 1), to broadcast over images."""
    return t.view(-1, 1, 1, 1)


def _lerp(lo: float, hi: float, u: torch.Tensor) -> torch.Tensor:
    return lo + (hi - lo) * u


def _log_lerp(lo: float, hi: float, u: torch.Tensor) -> torch.Tensor:
    return torch.exp(_lerp(math.log(lo), math.log(hi), u))


def _smooth_field(fn, h: int, w: int, like: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """``fn(xs, ys)`` of pixel coordinates, for a smooth field: evaluated on a grid ``factor`` times
    coarser (one cell beyond each side) and enlarged bilinearly: exact for linear fields."""
    hc, wc = -(-h // factor) + 2, -(-w // factor) + 2
    xs = ((torch.arange(wc, device=like.device, dtype=like.dtype) - 0.5) * factor).view(1, 1, 1, wc)
    ys = ((torch.arange(hc, device=like.device, dtype=like.dtype) - 0.5) * factor).view(1, 1, hc, 1)
    field = F.interpolate(fn(xs, ys), scale_factor=factor, mode="bilinear", align_corners=False)
    return field[..., factor:factor + h, factor:factor + w]


def _border_mean(images: torch.Tensor) -> torch.Tensor:
    """Mean colour (N, 3) of a ring one sixteenth of the side wide: the photo's skin, mostly."""
    h, w = images.shape[-2:]
    r = max(1, min(h, w) // 16)
    if 2 * r >= min(h, w):
        return images.mean((2, 3))
    total = (images[..., :r, :].sum((2, 3)) + images[..., h - r:, :].sum((2, 3))
             + images[..., r:h - r, :r].sum((2, 3)) + images[..., r:h - r, w - r:].sum((2, 3)))
    return total / (h * w - (h - 2 * r) * (w - 2 * r))


@functools.lru_cache(maxsize=None)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A constant tensor, made once per device and dtype (callers never write to it)."""
    return torch.tensor(values, device=device, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _dct_matrix(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 2-D 8x8 DCT-II as one orthonormal 64x64 matrix acting on row-major blocks."""
    k = torch.arange(8, dtype=torch.float64)
    d = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return torch.kron(d, d).to(device=device, dtype=dtype)


def _quant_tables(quality: torch.Tensor, table: tuple[int, ...]) -> torch.Tensor:
    """libjpeg's quality scaling of an Annex K table, per sample: (N, 1, 1, 64)."""
    q = quality.clamp(1, 100)[:, None]
    scale = torch.where(q < 50, 5000 / q, 200 - 2 * q)
    base = _constant(table, q.device, q.dtype)
    return torch.floor((base * scale + 50) / 100).clamp(1, 255).view(-1, 1, 1, 64)


def _dct_quantise(x: torch.Tensor, q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Round each 8x8 block's DCT coefficients to multiples of ``q``: (..., H, W), H and W multiples of 8."""
    *lead, h, w = x.shape
    blocks = x.reshape(*lead, h // 8, 8, w // 8, 8).transpose(-3, -2).reshape(*lead, h // 8, w // 8, 64)
    coef = (blocks @ d.T).div_(q).round_().mul_(q)
    return (coef @ d).view(*lead, h // 8, w // 8, 8, 8).transpose(-3, -2).reshape(*lead, h, w)


def _mean_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2)`` bit for bit (the same sums in the same order), twice as fast on the CPU."""
    return (((x[..., ::2, ::2] + x[..., ::2, 1::2]) + x[..., 1::2, ::2]) + x[..., 1::2, 1::2]) / 4


_RGB_TO_YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
_YCC_TO_RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))


def jpeg_like(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Approximate JPEG round trip of 0..255 RGB (N, 3, H, W) at ``quality`` (N,).

    As a baseline encoder and decoder do: YCbCr (centred on 0), chroma averaged over 2x2, 8x8 block
    DCT rounded to the quality-scaled Annex K tables, back; chroma upsampled by repetition.
    """
    n, _, h, w = x.shape
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    hp, wp = x.shape[-2:]
    # Channel-major (3, N, H, W) planes, each contiguous: one matrix product per colour conversion.
    planes = torch.sub(x.transpose(0, 1), 128, out=x.new_empty(3, n, hp, wp))
    ycc = torch.bmm(_constant(_RGB_TO_YCC, x.device, x.dtype)[None], planes.view(1, 3, -1)).view(3, n, hp, wp)
    d = _dct_matrix(x.device, x.dtype)
    quality = quality.to(x.dtype)
    # Chroma sample-major (N, 2, H/2, W/2): the upsampling's rounding depends on the planes' order.
    chroma = _dct_quantise(_mean_2x2(ycc[1:]).transpose(0, 1), _quant_tables(quality, _Q_CHROMA)[:, None], d)
    ycc[0] = _dct_quantise(ycc[0], _quant_tables(quality, _Q_LUMA), d)
    ycc[1:] = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False).transpose(0, 1)
    out = torch.bmm(_constant(_YCC_TO_RGB, x.device, x.dtype)[None], ycc.view(1, 3, -1)).view(3, n, hp, wp)
    return out.add_(128).transpose(0, 1)[..., :h, :w].clamp_(0, 255)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(C, H, W) moved by (dy, dx) pixels; what comes in from outside is 0."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = x[:, max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
    return out


def _segment_distance(px, py, ax, ay, bx, by):
    """Distance of each pixel to the segment A-B; points (N,) broadcast to (N, 1, H, W)."""
    ax, ay, bx, by = map(_v, (ax, ay, bx, by))
    dx, dy = bx - ax, by - ay
    t = (((px - ax) * dx + (py - ay) * dy) / (dx * dx + dy * dy).clamp_min(1e-6)).clamp(0, 1)
    return torch.hypot(px - ax - t * dx, py - ay - t * dy)


class RobustAugment:
    """The paper's flips and rotation, then the transforms above, each with its own probability.

    Args:
        probs: ``{transform: probability}`` over ``TRANSFORMS``; a missing name is never applied.
        paper: the paper's augmentation, applied first (None: none).

    Shape:
        images: float (B, 3, H, W) in 0..255; masks: float (B, 1, H, W) in {0, 1}. Returns new
        tensors of the same shapes, images clamped to 0..255, masks in {0, 1}.

    Note:
        All randomness comes from the CPU ``generator``: the paper's 4 draws per sample, then a fixed
        block of uniform draws and texture lattices per sample, whichever transforms fire, so the
        stream, and a resumed run's batches, depend on the batch size only and not on the device.
        ``LATER_TRANSFORMS`` draw a second block after those, only where the config gives one of
        them a probability, so configs without them keep the stream they had before.
        Sensor noise is cut from a fixed Gaussian noise bank (seeded once) at drawn offsets.
        The zoom priorities are exclusive: ``zoom_in`` applies to samples not zoomed out and
        ``translate`` to samples neither zoomed out nor in; ``texture_canvas`` to samples whose
        canvas is not another photo's skin (also where no photo of the batch has a clean window).
    """

    def __init__(self, probs: Mapping[str, float], paper: PaperAugment | None = None):
        self.probs = check_robust_config(probs)
        self.paper = paper
        self._p = torch.tensor([self.probs.get(name, 0.0) for name in BASE_TRANSFORMS], dtype=torch.float64)
        self._p_later = torch.tensor([self.probs.get(name, 0.0) for name in LATER_TRANSFORMS], dtype=torch.float64)
        self._bank: torch.Tensor | None = None

    # -- helpers -----------------------------------------------------------------------------

    def _noise_bank(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        shape = (3, h + _NOISE_MARGIN, w + _NOISE_MARGIN)
        bank = self._bank
        if bank is None or bank.shape != shape or bank.device != like.device or bank.dtype != like.dtype:
            bank = torch.randn(shape, generator=torch.Generator().manual_seed(0x5C50), dtype=torch.float32)
            self._bank = bank = bank.to(device=like.device, dtype=like.dtype)
        return bank

    @staticmethod
    def _apply(fired: torch.Tensor, fn, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``fn(idx, *subsets)`` on the samples that fired; the others pass untouched.

        Called once per run of consecutive samples, on slices of ``tensors`` (views: nothing is
        gathered; gathering costs more than the calls it saves), with the results copied back in
        place (the tensors belong to this call): the cost follows the number of samples transformed.
        A transform may write into its slices and return them: copying a view onto itself is free.
        """
        idx = fired.nonzero().squeeze(1).tolist()
        if not idx:
            return tensors
        if len(idx) == len(fired):
            return fn(torch.arange(len(fired)), *tensors)
        runs, start = [], idx[0]
        for a, b in zip(idx, idx[1:] + [None]):
            if b != a + 1:
                runs.append((start, a + 1))
                start = b
        for lo, hi in runs:
            results = fn(torch.arange(lo, hi), *(t[lo:hi] for t in tensors))
            for t, r in zip(tensors, results):
                t[lo:hi] = r
        return tensors

    # -- the call ----------------------------------------------------------------------------

    def __call__(self, images: torch.Tensor, masks: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if not (images.is_floating_point() and masks.is_floating_point()):
            raise TypeError("RobustAugment expects float images and masks (convert uint8 first)")
        b, _, h, w = images.shape
        source, source_masks = images, masks
        # Each pixel's distance to the photo's border rides along with the mask (nearest sampling
        # is exact enough): after the paper's rotation and the zoom it tells where the photo ends
        # (0 outside) and feathers that edge.
        xs, ys = _pixels(h, w, images)
        dist = torch.minimum(torch.minimum(xs, w - xs), torch.minimum(ys, h - ys)).expand(b, 1, h, w)
        x, masks = images, torch.cat([masks, dist], 1)
        if self.paper is not None:
            x, masks = self.paper(x, masks, generator)
        x = x.clone() if x is images else x  # written in place below
        draws = torch.rand(b, _NUM_DRAWS, generator=generator, dtype=torch.float64)
        lattice = torch.rand(b, _NUM_LATTICE, generator=generator, dtype=torch.float32)
        fire = dict(zip(BASE_TRANSFORMS, (draws[:, _OFFSETS["fire"]] < self._p).unbind(1)))
        # The transforms' parameters in the images' precision (on the CPU: their .to() are no-ops).
        draws = draws.to(images.dtype)
        col = {name: draws[:, s] for name, s in _OFFSETS.items()}
        if self._p_later.any():  # a block of its own, drawn last: see LATER_TRANSFORMS
            later = torch.rand(b, _NUM_LATER_DRAWS, generator=generator, dtype=torch.float64)
            fire.update(zip(LATER_TRANSFORMS, (later[:, _LATER_OFFSETS["fire"]] < self._p_later).unbind(1)))
            later = later.to(images.dtype)
            col.update((name, later[:, s]) for name, s in _LATER_OFFSETS.items() if name != "fire")
        else:
            fire.update((name, torch.zeros(b, dtype=torch.bool)) for name in LATER_TRANSFORMS)

        x, masks, scale, moved = self._geometry(x, masks, col, fire)
        x, masks = self._surroundings(x, masks, scale, moved, source, source_masks, lattice, col, fire)
        if fire["ink"].any():
            x, masks = self._apply(fire["ink"], lambda i, a, m: self._ink(a, m, col["ink"][i]), x, masks)
        if fire["fingers"].any():
            x, masks = self._apply(fire["fingers"], lambda i, a, m: self._fingers(a, m, col["fingers"][i]), x, masks)
        if fire["ruler"].any():
            x, masks = self._apply(fire["ruler"], lambda i, a, m: self._ruler(a, m, col["ruler"][i]), x, masks)
        if fire["frame"].any():
            x, masks = self._apply(fire["frame"], lambda i, a, m: self._frame(a, m, col["frame"][i]), x, masks)
        for name in ("color", "illumination", "blur", "noise", "jpeg"):
            if fire[name].any():
                fn = getattr(self, "_" + name)
                (x,) = self._apply(fire[name], lambda i, a, fn=fn, name=name: (fn(a, col[name][i]),), x)
        return x.clamp_(0, 255), masks.contiguous()

    # -- geometry and surroundings ---------------------------------------------------------------

    def _geometry(self, x, masks, col, fire):
        """Zoom out, zoom in or translate: masks = [mask, dist] (B, 2, H, W); returns the zoom factor (B,).

        Integer placements and crops with ``interpolate`` (antialiased when shrinking), per sample:
        several times cheaper on the CPU than a blur and a sampling grid.
        """
        b, _, h, w = x.shape
        zoom_out = fire["zoom_out"]
        zoom_in = fire["zoom_in"] & ~zoom_out
        shift = fire["translate"] & ~zoom_out & ~zoom_in
        scale = torch.ones(b, dtype=torch.float64)
        moved = zoom_out | zoom_in | shift
        if not moved.any():
            return x, masks, scale, moved
        g = col["geometry"]
        aspect = _log_lerp(0.8, 1.25, g[:, 1]).sqrt()
        # zoom_out: the photo's share of the frame per axis; zoom_in: the window's share of the photo
        share = torch.where(zoom_out, _log_lerp(0.3, 0.9, g[:, 0]), _log_lerp(0.5, 0.9, g[:, 0]))
        share = torch.stack([share / aspect, share * aspect], 1).clamp(max=0.95)  # (height, width)
        for i in moved.nonzero().squeeze(1).tolist():
            hs, ws = max(1, round(share[i, 0].item() * h)), max(1, round(share[i, 1].item() * w))
            oy, ox = round(g[i, 2].item() * (h - hs)), round(g[i, 3].item() * (w - ws))
            xi, mi = x[i:i + 1], masks[i:i + 1]
            if zoom_out[i]:
                small = F.interpolate(xi, size=(hs, ws), mode="bilinear", antialias=True, align_corners=False)
                x[i].zero_()
                x[i, :, oy:oy + hs, ox:ox + ws] = small[0]
                small_mask = F.interpolate(mi, size=(hs, ws), mode="nearest-exact")
                masks[i].zero_()
                masks[i, :, oy:oy + hs, ox:ox + ws] = small_mask[0]
                scale[i] = min(hs / h, ws / w)
            elif zoom_in[i]:
                x[i] = F.interpolate(xi[..., oy:oy + hs, ox:ox + ws], size=(h, w), mode="bilinear",
                                     align_corners=False)[0]
                masks[i] = F.interpolate(mi[..., oy:oy + hs, ox:ox + ws], size=(h, w), mode="nearest-exact")[0]
                scale[i] = min(h / hs, w / ws)
            else:  # a shift of up to 0.3 of the side either way, what it uncovers left empty
                dy, dx = round((g[i, 2].item() - 0.5) * 0.6 * h), round((g[i, 3].item() - 0.5) * 0.6 * w)
                x[i], masks[i] = _shift(xi[0], dy, dx), _shift(mi[0], dy, dx)
        return x, masks, scale, moved

    def _surroundings(self, x, masks, scale, moved, source, source_masks, lattice, col, fire):
        """Fill where a moved photo does not reach with a canvas; drops the distance channel.

        Photos only rotated keep the paper's black corners (and its cost).
        """
        image, masks, dist = x, masks[:, :1], masks[:, 1:]
        # Untouched photos have 0.5 at their edge pixels; less means some pixel lies outside.
        need = moved & (dist.flatten(1).amin(1) < 0.49).cpu()
        if not need.any():
            return image, masks
        border = _border_mean(source)
        windows = functools.cache(lambda: self._clean_windows(source, source_masks))  # for skin canvases

        def fill(idx, img, m, d):
            cv = self._canvas(idx, source, windows, border, lattice, col, fire, *img.shape[-2:])
            # A soft seam 2..24 px wide, at most an eighth of the photo's side as shown.
            zoom = scale[idx]
            feather = torch.minimum(_lerp(2.0, 24.0, col["feather"][idx, 0]), 0.125 * zoom * min(img.shape[-2:]))
            feather = torch.where(fire["hard_seam"][idx], 1.0, feather)  # pasted: over one pixel
            alpha = (d * _v(zoom.to(img))).div_(_v(feather.clamp_min(1.0).to(img))).clamp_(0, 1)
            # In place (the canvas's mask is 0): torch.lerp(cv, img, alpha) and where(alpha >= 0.5, m, 0).
            return torch.lerp(cv, img, alpha, out=img), m.mul_(alpha >= 0.5)

        image, masks = self._apply(need, lambda i, a, m: fill(i, a, m, dist[int(i[0]):int(i[-1]) + 1]), image, masks)
        return image, masks

    def _canvas(self, idx, source, windows, border, lattice, col, fire, h, w):
        """Canvases (N, 3, H, W) for samples ``idx`` (their masks are 0): skin of another photo, texture or flat."""
        dev = source.device
        cols = col["canvas"][idx]
        target = border[idx.to(dev)]
        flat = target * (1 + 0.2 * (2 * cols[:, 0:3].to(source) - 1))
        canvas = flat[:, :, None, None].expand(-1, -1, h, w)
        skin = fire["skin_canvas"][idx]
        donors = self._donors(idx[skin], cols[skin, 3], *windows(), len(source)) if skin.any() else []
        texture = fire["texture_canvas"][idx] & ~skin
        for k, d in zip(skin.nonzero().squeeze(1).tolist(), donors):
            texture[k] = d is None and bool(fire["texture_canvas"][idx[k]])  # no clean skin in the batch
        if not (any(d is not None for d in donors) or texture.any()):
            return canvas  # flat colours, never materialised
        canvas = canvas.contiguous()
        for k, d in zip(skin.nonzero().squeeze(1).tolist(), donors):
            if d is None:
                continue
            j, y0, x0, kh, kw = d
            dims = [dim for dim, u in ((-1, cols[k, 4]), (-2, cols[k, 5])) if u < 0.5]
            win = source[j:j + 1, :, y0:y0 + kh, x0:x0 + kw]
            sk = F.interpolate(win.flip(dims) if dims else win, size=(h, w), mode="bilinear", align_corners=False)[0]
            # Pull the borrowed skin's tone most of the way towards this photo's own skin (pasted:
            # at most half-way, often hardly at all, as when two photos' skin meet).
            ratio = (target[k] / win[0, :, ::4, ::4].mean((1, 2)).clamp_min(1.0)).clamp(0.5, 2.0)
            i = int(idx[k])
            pull = _lerp(0.0, 0.5, col["seam"][i, 0].item()) if fire["hard_seam"][i] else _lerp(0.5, 1.0, cols[k, 6].item())
            torch.mul(sk, 1 + pull * (ratio[:, None, None] - 1), out=canvas[k])
        if texture.any():
            t = texture.nonzero().squeeze(1)
            canvas[t.to(dev)] = self._texture(col["texture"][idx[t]], lattice[idx[t]].to(dev), h, w, source)
        return canvas

    @staticmethod
    def _clean_windows(source, source_masks):
        """Each photo's cleanest half-size window: ``(clean, corners, height, width)``.

        Of each photo's 3x3 half-size windows (quarter-side stride) the one with the least lesion
        and near-black frame; ``clean`` (per photo) where it has lesion at most 0.5 % and dark at
        most 5 %, ``corners`` its ``(y0, x0)``.
        """
        _, _, h, w = source.shape
        kh, kw, sh, sw = max(h // 2, 1), max(w // 2, 1), max(h // 4, 1), max(w // 4, 1)
        # Shares measured on every 4th pixel each way: plenty for a half-size window, 16x cheaper.
        step = 4 if min(h, w) >= 64 else 1
        pk, ps = (max(kh // step, 1), max(kw // step, 1)), (max(sh // step, 1), max(sw // step, 1))
        coarse = source[..., ::step, ::step]
        lesion = F.avg_pool2d(source_masks[..., ::step, ::step], pk, ps)
        gw = lesion.shape[-1]
        lesion = lesion.flatten(1)
        dark = F.avg_pool2d((coarse.mean(1, keepdim=True) < 50).to(source.dtype), pk, ps).flatten(1)
        best = (lesion + dark).argmin(1, keepdim=True)
        clean = ((lesion.gather(1, best) <= 0.005) & (dark.gather(1, best) <= 0.05))[:, 0].tolist()
        corners = [(min((j // gw) * ps[0] * step, h - kh), min((j % gw) * ps[1] * step, w - kw))
                   for j in best[:, 0].tolist()]
        return clean, corners, kh, kw

    @staticmethod
    def _donors(own, start, clean, corners, kh, kw, b):
        """For each sample in ``own``, another photo's clean window (``_clean_windows``), or None.

        The donor is the first photo after a drawn one (never the sample itself) whose window is
        clean. Returns ``(photo, y0, x0, height, width)`` or None where no photo of the ``b`` qualifies.
        """
        out = []
        for i, u in zip(own.tolist(), start.tolist()):
            first = int(u * (b - 1))
            order = [(i + 1 + (first + t) % (b - 1)) % b for t in range(b - 1)]
            j = next((j for j in order if clean[j]), None)
            out.append(None if j is None else (j, *corners[j], kh, kw))
        return out

    @staticmethod
    def _octaves(lattice: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Value noise (N, 1, H, W) of about unit variance: coarse (lattices 4 and 8) and medium (16 and 32)."""
        levels, start = [], 0
        for s in _LATTICES:
            grid = (lattice[:, start:start + s * s].view(-1, 1, s, s) - 0.5) * math.sqrt(12)
            levels.append(F.interpolate(grid, size=(64, 64), mode="bicubic", align_corners=False))
            start += s * s
        bands = torch.cat([levels[0] + 0.5 * levels[1], levels[2] + 0.5 * levels[3]], 1)
        low, mid = F.interpolate(bands, size=(h, w), mode="bilinear", align_corners=False).split(1, 1)
        return low, mid

    def _grain(self, offsets: torch.Tensor, h: int, w: int, like: torch.Tensor) -> list[torch.Tensor]:
        """Pixel-level Gaussian noise (3, H, W) per sample: views into the fixed bank at offsets drawn in 0..1 (N, 2)."""
        bank = self._noise_bank(h, w, like)
        pos = (offsets * (_NOISE_MARGIN + 1)).long().clamp(max=_NOISE_MARGIN).tolist()
        return [bank[:, oy:oy + h, ox:ox + w] for oy, ox in pos]

    def _texture(self, cols, lattice, h, w, like):
        """Procedural cloth (weave, stripes, folds), glove (tinted, folds, sheen) or paper (white, grain)."""
        c = cols.to(like)
        low, mid = self._octaves(lattice.to(like), h, w)
        fine = torch.stack([g[:1] for g in self._grain(cols[:, 12:14], h, w, like)])
        tint = c[:, 1:4]
        kind = (cols[:, 0] * 3).long().clamp(max=2).tolist()  # 0 cloth, 1 glove, 2 paper
        out = torch.empty(len(c), 3, h, w, device=like.device, dtype=like.dtype)
        for k in sorted(set(kind)):
            i = torch.tensor([j for j, kd in enumerate(kind) if kd == k], device=like.device)
            ci, lo, me, fi, ti = c[i], low[i], mid[i], fine[i], tint[i]
            if k == 0:  # cloth of any colour: a plain weave warped by the folds, stripes in 40 %
                xs, ys = _pixels(h, w, like)
                angle, period = _v(ci[:, 4] * math.pi), _v(_lerp(3.0, 9.0, ci[:, 5]))
                u = (xs * torch.cos(angle) + ys * torch.sin(angle)) / period + 0.6 * lo
                v = (ys * torch.cos(angle) - xs * torch.sin(angle)) / period + 0.6 * me
                weave = torch.sin(2 * math.pi * u) * torch.sin(2 * math.pi * v)
                stripes = torch.sin(2 * math.pi * u / _v(_lerp(4.0, 14.0, ci[:, 6])))
                amp = _v(torch.where(ci[:, 7] < 0.4, _lerp(0.0, 0.25, ci[:, 8]), torch.zeros_like(ci[:, 8])))
                shade = 1 + _v(_lerp(0.04, 0.18, ci[:, 9])) * weave + amp * stripes + 0.12 * lo + 0.03 * fi
                out[i] = (40 + 190 * ti)[:, :, None, None] * shade
            elif k == 1:  # glove: a palette colour, broad folds and a soft sheen
                pick = (ci[:, 10] * len(_GLOVE)).long().clamp(max=len(_GLOVE) - 1)
                base = torch.tensor(_GLOVE, dtype=like.dtype, device=like.device)[pick] * (0.9 + 0.2 * ti)
                out[i] = base[:, :, None, None] * (1 + 0.15 * lo + 0.04 * me) + 20 * (lo - 1.0).clamp_min(0)
            else:  # paper: near white, slightly warm or cool, a faint shading and grain
                base = (236 + 14 * ci[:, 11:12]) * (0.97 + 0.05 * ti)
                out[i] = base[:, :, None, None] * (1 + 0.05 * lo + 0.025 * fi)
        return out

    # -- things in front of the skin --------------------------------------------------------------

    def _fingers(self, x, masks, c):
        """One or two shaded skin-toned fingers entering from an edge, with a soft shadow; mask 0 there."""
        n, _, h, w = x.shape
        c = c.to(x)
        side = min(h, w)
        edge = (c[:, 0] * 4).long().clamp(max=3)  # 0 top, 1 bottom, 2 left, 3 right
        along = _lerp(0.15, 0.85, c[:, 1])
        ex = torch.where(edge < 2, along * w, torch.where(edge == 2, 0.0, float(w)))
        ey = torch.where(edge >= 2, along * h, torch.where(edge == 0, 0.0, float(h)))
        inward = torch.tensor([math.pi / 2, -math.pi / 2, 0.0, math.pi], dtype=x.dtype, device=x.device)[edge]
        ang = inward + _lerp(-0.6, 0.6, c[:, 3])
        dx, dy = torch.cos(ang), torch.sin(ang)
        radius = _lerp(0.05, 0.12, c[:, 4]) * side
        depth = _lerp(0.15, 0.5, c[:, 2]) * side
        # A second, neighbouring finger in half the cases, its tip a little shorter or longer.
        sign = torch.where(c[:, 6] < 0.5, -1.0, 1.0).to(x)
        ox, oy = -dy * 2.05 * radius * sign, dx * 2.05 * radius * sign
        depth2 = depth * _lerp(0.7, 1.15, c[:, 7])
        two = _v(c[:, 5] < 0.5)

        def distance(xs, ys):
            d1 = _segment_distance(xs, ys, ex - dx * side, ey - dy * side, ex + dx * depth, ey + dy * depth)
            d2 = _segment_distance(xs, ys, ex + ox - dx * side, ey + oy - dy * side,
                                   ex + ox + dx * depth2, ey + oy + dy * depth2)
            return torch.where(two, torch.minimum(d1, d2), d1)

        r = _v(radius)
        dist = _smooth_field(distance, h, w, x)
        alpha = (r - dist + 0.5).clamp(0, 1)
        t = (dist / r).clamp(max=1)
        shade = 0.55 + 0.45 * (1 - t * t).clamp_min(0).sqrt()  # a cylinder lit from the front
        shadow = 1 - 0.35 * (1 - (dist - r) / (0.6 * r)).clamp(0, 1)  # a soft shadow beside it
        pick = (c[:, 8] * len(_SKIN)).long().clamp(max=len(_SKIN) - 1)
        warm = 0.04 * (c[:, 10] - 0.5)
        tone = (torch.tensor(_SKIN, dtype=x.dtype, device=x.device)[pick] * _lerp(0.85, 1.03, c[:, 9:10])
                * torch.stack([1 + warm, torch.ones_like(warm), 1 - warm], 1))
        return x.mul_(shadow).lerp_(tone[:, :, None, None] * shade, alpha), masks.mul_(alpha < 0.5)

    def _ink(self, x, masks, c):
        """Marker ink: one or two ragged dots or strokes anywhere, or a ring around the lesion (its
        centroid, about twice its equivalent radius). A translucent dye: the mask is unchanged."""
        n, _, h, w = x.shape
        c = c.to(x)
        side = min(h, w)
        xs, ys = _pixels(h, w, x)
        area = masks.sum((1, 2, 3))
        cx = torch.where(area > 0, (masks * xs).sum((1, 2, 3)) / area.clamp_min(1.0), w / 2)
        cy = torch.where(area > 0, (masks * ys).sum((1, 2, 3)) / area.clamp_min(1.0), h / 2)
        ring_r = (torch.sqrt(area / math.pi) * _lerp(1.4, 2.4, c[:, 3]) + 0.04 * side).clamp(max=0.6 * side)
        ring_w = _lerp(0.006, 0.02, c[:, 9]) * side + 0.5
        ring = (torch.hypot(xs - _v(cx), ys - _v(cy)) - _v(ring_r)).abs() - _v(ring_w)
        stroke = c[:, 0] >= 0.75
        length = torch.where(stroke, _lerp(0.1, 0.4, c[:, 7]) * side, 0.0)
        width = torch.where(stroke, _lerp(0.006, 0.02, c[:, 3]), _lerp(0.015, 0.06, c[:, 3])) * side + 0.5
        ang = c[:, 6] * 2 * math.pi
        dx, dy = torch.cos(ang) * length, torch.sin(ang) * length
        marks = []
        for px, py in ((c[:, 4] * w, c[:, 5] * h), (c[:, 10] * w, c[:, 11] * h)):
            # dots are not discs: their radius wobbles with the angle about their centre
            theta = torch.atan2(ys - _v(py), xs - _v(px)) + _v(c[:, 7] * 2 * math.pi)
            wobble = 1 + 0.12 * torch.sin(2 * theta) + 0.06 * torch.sin(5 * theta + 1.0)
            r = _v(width) * torch.where(_v(stroke), 1.0, wobble)
            marks.append(_segment_distance(xs, ys, px, py, px + dx, py + dy) - r)
        marks = torch.where(_v(c[:, 8] < 0.5), torch.minimum(*marks), marks[0])
        sdf = torch.where(_v((c[:, 0] >= 0.45) & ~stroke), ring, marks)
        alpha = (0.5 - sdf).clamp(0, 1) * _v(_lerp(0.55, 0.9, c[:, 2]))
        pick = (c[:, 1] * len(_INK)).long().clamp(max=len(_INK) - 1)
        absorbed = 1 - torch.tensor(_INK, dtype=x.dtype, device=x.device)[pick]
        return x.mul_(1 - alpha * absorbed[:, :, None, None]), masks

    def _ruler(self, x, masks, c):
        """A graduated strip (mm ticks, longer every 5 and 10) along an edge, slightly sheared; mask 0 there.

        Drawn along the top edge of a frame turned so that its edge is on top, then turned back.
        """
        n, _, h, w = x.shape
        c = c.to(x)
        side = min(h, w)
        alpha = torch.empty(n, 1, h, w, device=x.device, dtype=x.dtype)
        tick = torch.empty_like(alpha)
        turns = (c[:, 0] * 4).long().clamp(max=3).tolist()  # quarter turns: top, left, bottom, right edge
        for i, k in enumerate(turns):
            hh, ww = (h, w) if k % 2 == 0 else (w, h)
            xs, ys = _pixels(hh, ww, x)
            into = ys + (xs - ww / 2) * math.tan(_lerp(-0.15, 0.15, c[i, 1]).item()) - _lerp(0.0, 0.12, c[i, 2]) * side
            width = _lerp(0.06, 0.12, c[i, 3]) * side
            a = (into + 0.5).clamp(0, 1) * (width - into + 0.5).clamp(0, 1)
            period = _lerp(3.0, 8.0, c[i, 4])
            j = torch.floor(xs / period + 0.5)
            off = (xs / period - j).abs() * period  # pixels to the nearest tick, along the edge only
            length = width * (0.25 + 0.2 * (j % 5 == 0) + 0.25 * (j % 10 == 0))
            t = (1.0 - off).clamp(0, 1) * (into < length)
            alpha[i], tick[i] = torch.rot90(a[0], -k, (-2, -1)), torch.rot90(t[0], -k, (-2, -1))
        kind = (c[:, 5] * 3).long().clamp(max=2)  # white, yellow or grey plastic
        body = torch.tensor(((238, 238, 232), (232, 214, 140), (205, 210, 212)), dtype=x.dtype, device=x.device)[kind]
        strip = torch.lerp((body * _lerp(0.9, 1.05, c[:, 6:7]))[:, :, None, None], torch.full_like(tick, 30.0), tick)
        return x.lerp_(strip, alpha), masks.mul_(alpha < 0.5)

    def _frame(self, x, masks, c):
        """A dermoscope's round field of view: near-black outside a circle; mask 0 there."""
        n, _, h, w = x.shape
        c = c.to(x)
        cx = _v((0.5 + _lerp(-0.08, 0.08, c[:, 0])) * w)
        cy = _v((0.5 + _lerp(-0.08, 0.08, c[:, 1])) * h)
        radius = _v(_lerp(0.42, 0.68, c[:, 2]) * min(h, w))
        dist = _smooth_field(lambda xs, ys: torch.hypot(xs - cx, ys - cy), h, w, x)
        outside = torch.sigmoid((dist - radius) / _v(_lerp(0.7, 5.0, c[:, 3])))
        return x.lerp_(_v(_lerp(0.0, 22.0, c[:, 4])).expand_as(x), outside), masks.mul_(outside < 0.5)

    # -- photometric -----------------------------------------------------------------------------

    @staticmethod
    def _color(x, c):
        """Saturation, contrast (about the mean grey), colour temperature and brightness: one affine map per sample."""
        c = c.to(x)
        n = len(c)
        luma = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device)
        eye = torch.eye(3, dtype=x.dtype, device=x.device)
        sat, con = _v(_lerp(0.6, 1.4, c[:, 2]))[:, :, 0], _v(_log_lerp(0.7, 1.4, c[:, 1]))[:, :, 0]
        temp = _lerp(-0.15, 0.15, c[:, 3])
        gain = torch.stack([1 + temp, torch.ones_like(temp), 1 - temp], 1) * _log_lerp(0.7, 1.35, c[:, 0])[:, None]
        # grey + s (x - grey), then mean + k (. - mean): the grey level is unchanged by the first.
        mix = sat * eye + (1 - sat) * luma.expand(3, 3)  # (N, 3, 3)
        mean = torch.einsum("j,njhw->n", luma, x) / (x.shape[-1] * x.shape[-2])
        matrix = gain[:, :, None] * con * mix
        offset = gain * ((1 - con[:, :, 0]) * mean[:, None])
        return torch.einsum("nij,njhw->nihw", matrix, x).add_(offset[:, :, None, None])

    @staticmethod
    def _illumination(x, c):
        """A linear light gradient in a random direction times a vignette about an off-centre point."""
        n, _, h, w = x.shape
        c = c.to(x)
        ang = _v(c[:, 0] * 2 * math.pi)
        strength, vig = _v(_lerp(0.0, 0.5, c[:, 1])), _v(_lerp(0.0, 0.55, c[:, 2]))
        cx, cy = _v(_lerp(-0.3, 0.3, c[:, 3])), _v(_lerp(-0.3, 0.3, c[:, 4]))

        def light(xs, ys):
            gx, gy = 2 * xs / w - 1, 2 * ys / h - 1
            ramp = 1 + strength * 0.5 * (gx * torch.cos(ang) + gy * torch.sin(ang))
            return ramp * (1 - vig * (((gx - cx) ** 2 + (gy - cy) ** 2) / 2).clamp(max=1))

        return x.mul_(_smooth_field(light, h, w, x, factor=8))

    @staticmethod
    def _blur(x, c):
        """Defocus-like blur: shrunk (antialiased) by 1.3..3x and enlarged back; written into ``x``."""
        h, w = x.shape[-2:]
        for i, f in enumerate(_lerp(1.3, 3.0, c[:, 0]).tolist()):
            small = F.interpolate(x[i:i + 1], size=(max(1, round(h / f)), max(1, round(w / f))), mode="bilinear",
                                  antialias=True, align_corners=False)
            x[i] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
        return x

    def _noise(self, x, c):
        """Gaussian sensor noise, its sigma drawn per sample; written into ``x``."""
        sigma = _lerp(2.0, 10.0, c[:, 0]).to(x)
        for i, noise in enumerate(self._grain(c[:, 1:3], *x.shape[-2:], x)):
            x[i].addcmul_(noise, sigma[i])
        return x

    @staticmethod
    def _jpeg(x, c):
        return jpeg_like(x.clamp_(0, 255), _lerp(30.0, 90.0, c[:, 0]).round().to(x.device))

    def __repr__(self) -> str:
        probs = ", ".join(f"{k}={v}" for k, v in self.probs.items())
        return f"{type(self).__name__}({probs}; paper={self.paper!r})"
