"""apertis_core: train, run and export small multimodal Apertis language models with PyTorch.

The names below load on first use, so `import apertis_core` (and its config modules) does not import torch.
"""

from .lazy import lazy_exports

_EXPORTS = {
    "ApertisModel": ".model.apertis",
    "ConfigError": ".configio",
    "GenerationConfig": ".generation",
    "ModelConfig": ".model.config",
    "ModelOutput": ".model.apertis",
    "Tokenizer": ".tokenizer",
    "generate": ".generation",
    "load_bundle": ".bundle",
    "save_bundle": ".bundle",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__version__ = "0.1.0"
