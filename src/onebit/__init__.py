"""onebit: 1-bit post-training quantization of LLMs (BiLLM, ARB-LLM, DBellQuant, HBLLM) with honest bits."""

from .api import QuantResult, quantize
from .config import CalibConfig, QuantConfig
from .methods import available_methods, build_method
from .integrations import transformers as _hf_integration  # noqa: F401  (registers quant_method "onebit")

__version__ = "0.1.0"
__all__ = ["CalibConfig", "QuantConfig", "QuantResult", "available_methods", "build_method", "quantize", "__version__"]
