"""The Apertis model: config, the mixers (SLA, softmax attention), AES experts, STRC, and the full model.

Names load on first use (see ..lazy): the config and the layers import without the rest of the model.
"""

from ..lazy import lazy_exports

_EXPORTS = {"ApertisModel": ".apertis", "ModelConfig": ".config", "ModelOutput": ".apertis", "PRESETS": ".config"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
