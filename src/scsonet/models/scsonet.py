"""SCSONet.

`SCSONet: spatial-channel synergistic optimization net for skin lesion segmentation`
(Chen et al.; Frontiers in Physics 2024), https://doi.org/10.3389/fphy.2024.1388364
Original code: https://github.com/Haoyu1Chen/SCSONet (not used here; ``Note:`` sections say where it differs).
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

from ..layers import LayerType, SCFBlock
from ._builder import build_with_weights
from ._registry import register_model
from ._unet import SCBridgeUNet
from ._weights import SCSONet_Weights

__all__ = ["SCSONet"]


# Unlike a timm model file (STYLE.md 2), forward is not here but in SCBridgeUNet: MALUNet's skeleton,
# which SCSONet keeps, exists once for both models.
class SCSONet(SCBridgeUNet):
    """U-shaped lesion segmenter: ConvStem (conv, ODConv, conv), SCF blocks, attention bridge.

    Six encoder stages (E1-E3 the ConvStem, E4-E6 SCF blocks), the spatial-channel attention
    bridge over t1..t5, five decoder stages (D1-D3 SCF blocks, D4 conv, D5 ODConv) with additive
    skips, and a 1x1 head upsampled to the input size. Returns logits.

    Inputs of any size are accepted: sides that are not multiples of 32 are replicate-padded
    inside the model and the logits cropped back, so the output always matches the input.

    Args:
        num_classes: output channels, one logit map per class (1: lesion vs background).
        in_chans: input channels (3).
        act_layer: activation class or name (``'gelu'``).
        embed_dims: channels c0..c5 of the six stages ((8, 16, 24, 32, 48, 64)).
        kernel_num: ODConv candidate kernels n (1, as published; > 1 enables the kernel attention).
        gate: SCConv SRU gate, ``'soft'`` (SCConv paper) or ``'hard'`` (published code) (``'soft'``).
        use_odconv: ODConv in E2 and D5, else plain 3x3 convs (True; False is the ablation base).
        scf_mixer: spatial conv beside SCConv in the SCF blocks, see ``SCFBlock`` (``'pconv'``).
        scf_ema: EMA at the end of the SCF blocks (True).
        bridge_residual: residual of the bridge's channel attention, see ``SCAttentionBridge`` (``'sab'``).
        device: device of the parameters (None).
        dtype: dtype of the parameters (None).

    Shape:
        (B, in_chans, H, W) -> (B, num_classes, H, W)

    Note:
        ``use_odconv``, ``scf_mixer``, ``scf_ema`` and ``bridge_residual`` span the paper's
        ablations (Tables 2 and 3, see ``ablations.py``). The stages, bridge, head and forward
        pass are MALUNet's, shared through ``SCBridgeUNet``: SCSONet was built from MALUNet by
        swapping blocks.
    """

    def __init__(
        self,
        num_classes: int = 1,
        in_chans: int = 3,
        act_layer: LayerType = "gelu",
        embed_dims: Sequence[int] = (8, 16, 24, 32, 48, 64),
        kernel_num: int = 1,
        gate: str = "soft",
        use_odconv: bool = True,
        scf_mixer: str = "pconv",
        scf_ema: bool = True,
        bridge_residual: str = "sab",
        device=None,
        dtype=None,
    ):
        block_layer = partial(SCFBlock, gate=gate, mixer=scf_mixer, use_ema=scf_ema)
        super().__init__(block_layer, num_classes, in_chans, act_layer, embed_dims, use_odconv, kernel_num,
                         bridge_residual, device, dtype)


def _create_scsonet(weights: SCSONet_Weights | str | None = None, reset_head: bool = False, **kwargs) -> SCSONet:
    return build_with_weights(SCSONet, SCSONet_Weights, weights, kwargs, reset_head)


@register_model
def scsonet(*, weights: SCSONet_Weights | str | None = None, reset_head: bool = False, **kwargs) -> SCSONet:
    """SCSONet from `SCSONet: spatial-channel synergistic optimization net for skin lesion
    segmentation <https://doi.org/10.3389/fphy.2024.1388364>`__ (0.16 M parameters).

    ``weights``: a ``SCSONet_Weights`` member, its name or the pretrained name (``'scsonet-isic2017'``);
    ``reset_head=True`` with a ``num_classes`` the weights lack keeps all but a fresh head.
    """
    return _create_scsonet(weights, reset_head, **kwargs)
