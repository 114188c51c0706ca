"""DLA layers and a causal language model (``dla_ops.models``), Hugging Face style."""
from transformers import AutoConfig, AutoModelForCausalLM

from .layers import DLABlock, DLAMixer, LayerCache
from .modeling_dla import DLACausalLMOutput, DLAConfig, DLAForCausalLM, DLAModel

AutoConfig.register("dla", DLAConfig, exist_ok=True)
AutoModelForCausalLM.register(DLAConfig, DLAForCausalLM, exist_ok=True)

__all__ = ["DLABlock", "DLACausalLMOutput", "DLAConfig", "DLAForCausalLM", "DLAMixer", "DLAModel", "LayerCache"]
