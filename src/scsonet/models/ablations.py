"""The ablation variants of the SCSONet paper, registered by name.

`SCSONet: spatial-channel synergistic optimization net for skin lesion segmentation`
(Chen et al.; Frontiers in Physics 2024), https://doi.org/10.3389/fphy.2024.1388364

Table 2 (modules): ``ablation_base`` (MALUNet), ``ablation_convstem`` (base + ConvStem),
``ablation_scf`` (base + SCF blocks); base + ConvStem + SCF blocks is ``scsonet`` itself.
Table 3 (inside the SCF block): ``scf_scconv`` (SCConv alone), ``scf_scconv_pconv``,
``scf_scconv_dwsep`` (depthwise-separable conv), ``scf_scconv_dilated``; SCConv + PConv + EMA is
``scsonet``. Every variant is a configuration of ``SCSONet`` or ``MALUNet``; none has weights.

The ConvStem switch (``use_odconv``) turns E2 and its mirror D5 into ODConv together, so that
base + ConvStem + SCF is exactly ``scsonet``. The Table 3 variants keep SCSONet's ConvStem and
bridge and change only the six SCF blocks.
"""
from __future__ import annotations

from ._builder import no_weights
from ._registry import register_model
from .malunet import MALUNet
from .scsonet import SCSONet

__all__: list[str] = []


@register_model
def ablation_base(*, weights: None = None, **kwargs) -> MALUNet:
    """Table 2 "Base": MALUNet (0.178 M parameters)."""
    no_weights("ablation_base", weights)
    return MALUNet(**kwargs)


@register_model
def ablation_convstem(*, weights: None = None, **kwargs) -> MALUNet:
    """Table 2 "Base + ConvStem": MALUNet with ODConv in E2 and D5."""
    no_weights("ablation_convstem", weights)
    return MALUNet(**{"use_odconv": True, **kwargs})


@register_model
def ablation_scf(*, weights: None = None, **kwargs) -> SCSONet:
    """Table 2 "Base + SCF Block": SCSONet with plain convs in place of the ConvStem's ODConv."""
    no_weights("ablation_scf", weights)
    return SCSONet(**{"use_odconv": False, **kwargs})


@register_model
def scf_scconv(*, weights: None = None, **kwargs) -> SCSONet:
    """Table 3 "SCConv": SCF blocks of SCConv and the 3x3 conv only."""
    no_weights("scf_scconv", weights)
    return SCSONet(**{"scf_mixer": "none", "scf_ema": False, **kwargs})


@register_model
def scf_scconv_pconv(*, weights: None = None, **kwargs) -> SCSONet:
    """Table 3 "SCConv + PConv": SCF blocks without EMA."""
    no_weights("scf_scconv_pconv", weights)
    return SCSONet(**{"scf_mixer": "pconv", "scf_ema": False, **kwargs})


@register_model
def scf_scconv_dwsep(*, weights: None = None, **kwargs) -> SCSONet:
    """Table 3 "SCConv + DepthwiseSeparableConv": a depthwise-separable conv in place of PConv, no EMA."""
    no_weights("scf_scconv_dwsep", weights)
    return SCSONet(**{"scf_mixer": "dwsep", "scf_ema": False, **kwargs})


@register_model
def scf_scconv_dilated(*, weights: None = None, **kwargs) -> SCSONet:
    """Table 3 "SCConv + Dilated convolution": a dilated 3x3 conv in place of PConv, no EMA."""
    no_weights("scf_scconv_dilated", weights)
    return SCSONet(**{"scf_mixer": "dilated", "scf_ema": False, **kwargs})
