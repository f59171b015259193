"""SCSONet: lightweight skin-lesion segmentation."""
from .errors import ScsonetError
from .models import SCSONet, SCSONet_Weights, create_model, list_models

__version__ = "0.1.0"
__all__ = ["ScsonetError", "SCSONet", "SCSONet_Weights", "create_model", "list_models", "__version__"]
