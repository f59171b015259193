"""Networks, one file per architecture; importing this package registers every builder."""
from ._loading import PRETRAINED, LoadedModel, load_model, load_pretrained
from ._registry import create_model, is_model, list_models, register_model
from ._weights import SCSONet_Weights, Weights, WeightsEnum
from .scsonet import *  # noqa: F401,F403  (runs the registration)
from .scsonet import SCSONet
