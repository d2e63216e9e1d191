"""DeepSeek-V3 in pure PyTorch: config, model, inference cache and generation, HF checkpoint interop."""

from models.config import PRESETS, DeepSeekV3Config
from models.generate import generate
from models.hf_checkpoint import load_hf_checkpoint, save_hf_checkpoint
from models.kv_cache import MLACache
from models.model import DeepSeekV3, DeepSeekV3Output

__all__ = [
    "PRESETS",
    "DeepSeekV3",
    "DeepSeekV3Config",
    "DeepSeekV3Output",
    "MLACache",
    "generate",
    "load_hf_checkpoint",
    "save_hf_checkpoint",
]
