"""The Apertis model: config, the mixers (SLA, softmax attention), AES experts, STRC, and the full model."""

from .apertis import ApertisModel, ModelOutput
from .config import PRESETS, ModelConfig

__all__ = ["ApertisModel", "ModelConfig", "ModelOutput", "PRESETS"]
