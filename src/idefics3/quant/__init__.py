"""Quantised weights: int8 / int4 formats (format.py), the modules that hold them (modules.py), which modules
are quantised (apply.py), GPTQ from calibration text (gptq.py) or from text the model writes itself
(self_calibration.py), loading quantised or quantising checkpoints (load.py)."""

from .apply import (
                    QuantConfig,
                    dequantize_model,
                    install_quantized,
                    parse_quantize,
                    plan,
                    quantize_model,
                    quantized_nbytes,
)
from .format import QuantError, QuantSpec, dequantize, quantize
from .load import quantize_on_load_hooks, quantized_folder_hooks
from .modules import QuantEmbedding, QuantLinear
from .self_calibration import self_calibration

__all__ = ["QuantConfig", "QuantEmbedding", "QuantError", "QuantLinear", "QuantSpec", "dequantize",
           "dequantize_model", "install_quantized", "parse_quantize", "plan", "quantize", "quantize_model",
           "quantize_on_load_hooks", "quantized_folder_hooks", "quantized_nbytes", "self_calibration"]
