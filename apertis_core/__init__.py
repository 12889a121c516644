"""apertis_core: train, run and export small multimodal Apertis language models with PyTorch."""

from .configio import ConfigError
from .model import ApertisModel, ModelConfig, ModelOutput

__all__ = ["ApertisModel", "ConfigError", "ModelConfig", "ModelOutput"]
__version__ = "0.1.0"
