"""A lean phi-1.5 on phi_kernels, with Hugging Face checkpoint interop and generation."""
from phi_model.checkpoint import CheckpointError
from phi_model.config import PRESETS, PhiConfig
from phi_model.model import CausalLMOutput, KVCache, PhiForCausalLM

__all__ = ["CausalLMOutput", "CheckpointError", "KVCache", "PRESETS", "PhiConfig", "PhiForCausalLM"]
