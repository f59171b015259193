"""Networks, one file per architecture; importing this package registers every builder."""
from ._loading import PRETRAINED, LoadedModel, load_model, load_pretrained
from ._registry import create_model, is_model, list_models, register_model
from ._unet import SCBridgeUNet
from ._weights import (EGEUNet_Weights, MALUNet_Weights, SCSONet_Weights, UNeXt_S_Weights, Weights, WeightsEnum,
                       get_model_weights, list_pretrained)
from .scsonet import *  # noqa: F401,F403  (runs the registration)
from .malunet import *  # noqa: F401,F403
from .egeunet import *  # noqa: F401,F403
from .unet import *  # noqa: F401,F403
from .unext import *  # noqa: F401,F403
from .ablations import *  # noqa: F401,F403
from .scsonet import SCSONet
