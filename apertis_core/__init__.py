"""apertis_core: train, run and export small multimodal Apertis language models with PyTorch."""

from .bundle import load_bundle, save_bundle
from .configio import ConfigError
from .generation import GenerationConfig, generate
from .model import ApertisModel, ModelConfig, ModelOutput
from .tokenizer import Tokenizer

__all__ = [
    "ApertisModel",
    "ConfigError",
    "GenerationConfig",
    "ModelConfig",
    "ModelOutput",
    "Tokenizer",
    "generate",
    "load_bundle",
    "save_bundle",
]
__version__ = "0.1.0"
