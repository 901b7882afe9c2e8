"""onnxquant: structure-aware post-training quantization (EfficientQuant) for hybrid vision models."""

__version__ = "0.1.0"

from .api import Result, analyze, quantize, run  # noqa: E402
from .config import QuantConfig  # noqa: E402
from .errors import UserError  # noqa: E402

__all__ = ["quantize", "analyze", "run", "Result", "QuantConfig", "UserError", "__version__"]
