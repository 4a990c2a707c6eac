"""hf_dtgma: continual learning with Dynamic Task-Graph Masked Attention, inside the Hugging Face ecosystem."""

from transformers import AutoConfig, AutoModel

from .configuration_dtgma import DTGMAConfig
from .modeling_dtgma import DTGMAInputStream, DTGMAModel, DTGMAOutput

__version__ = "0.1.0"

AutoConfig.register(DTGMAConfig.model_type, DTGMAConfig, exist_ok=True)
AutoModel.register(DTGMAConfig, DTGMAModel, exist_ok=True)

__all__ = ["DTGMAConfig", "DTGMAInputStream", "DTGMAModel", "DTGMAOutput", "__version__"]
