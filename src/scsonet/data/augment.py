"""The paper's augmentation, batched on the tensors' device so the data never starves the model."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class PaperAugment:
    """Random horizontal flip, vertical flip and rotation, each drawn independently per sample.

    Rotation is by an angle drawn uniformly from ``degrees`` about the image centre; corners that
    come from outside the image are filled with 0 (black pixels, background mask). Flips are
    exact index reversals; only rotated samples are resampled, images bilinearly and masks with
    nearest neighbour, so masks stay binary.

    Args:
        p_hflip: probability of a horizontal flip (0.5).
        p_vflip: probability of a vertical flip (0.5).
        p_rotate: probability of a rotation (0.5).
        degrees: (low, high) range of the rotation angle ((0, 360)).

    Shape:
        images: float (B, C, H, W), any value range (0..255 in ``TrainLoader``);
        masks: float (B, 1, H, W) in {0, 1}. Returns new tensors of the same shapes.

    Note:
        The published code draws one rotation angle per run and interpolates masks into soft
        values; here every sample gets its own draws and masks stay {0, 1}.
    """

    def __init__(self, p_hflip: float = 0.5, p_vflip: float = 0.5, p_rotate: float = 0.5,
                 degrees: tuple[float, float] = (0.0, 360.0)):
        self.p_hflip, self.p_vflip, self.p_rotate = p_hflip, p_vflip, p_rotate
        self.degrees = degrees

    def __call__(self, images: torch.Tensor, masks: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if not (images.is_floating_point() and masks.is_floating_point()):
            raise TypeError("PaperAugment expects float images and masks (convert uint8 first)")
        b, _, h, w = images.shape  # torch.where below copies: the inputs are never modified
        # Four draws per sample from a CPU generator, always, so the random stream (and therefore
        # every later batch) is the same whichever flips happen and on whichever device.
        draws = torch.rand(b, 4, generator=generator, dtype=torch.float64)
        hflip = (draws[:, 0] < self.p_hflip).view(b, 1, 1, 1).to(images.device)
        vflip = (draws[:, 1] < self.p_vflip).view(b, 1, 1, 1).to(images.device)
        images = torch.where(hflip, images.flip(-1), images)
        masks = torch.where(hflip, masks.flip(-1), masks)
        images = torch.where(vflip, images.flip(-2), images)
        masks = torch.where(vflip, masks.flip(-2), masks)

        rotate = torch.nonzero(draws[:, 2] < self.p_rotate).flatten()
        if len(rotate):
            low, high = self.degrees
            angles = (low + (high - low) * draws[rotate, 3]) * (math.pi / 180.0)
            cos, sin = torch.cos(angles), torch.sin(angles)
            zero = torch.zeros_like(cos)
            # affine_grid maps output to input coordinates, normalised per axis: the inverse
            # rotation, with the aspect ratio folded in so non-square images rotate rigidly.
            theta = torch.stack([torch.stack([cos, sin * h / w, zero], 1),
                                 torch.stack([-sin * w / h, cos, zero], 1)], 1)
            theta = theta.to(device=images.device, dtype=images.dtype)
            idx = rotate.to(images.device)
            grid = F.affine_grid(theta, [len(rotate), images.shape[1], h, w], align_corners=False)
            images[idx] = F.grid_sample(images[idx], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            masks[idx] = F.grid_sample(masks[idx], grid, mode="nearest", padding_mode="zeros", align_corners=False)
        return images, masks

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(p_hflip={self.p_hflip}, p_vflip={self.p_vflip}, "
                f"p_rotate={self.p_rotate}, degrees={self.degrees})")
