"""Datasets: read user files (text, chat, captions, visual Q&A; folders and zips), report problems, and
turn records into token windows and batches for training.

Names load on first use (see ..lazy): DataConfig imports without torch.
"""

from ..lazy import lazy_exports

_EXPORTS = {
    "Batch": ".loader",
    "BatchLoader": ".loader",
    "DataConfig": ".config",
    "Problem": ".records",
    "Record": ".records",
    "TokenDataset": ".dataset",
    "ValidationReport": ".report",
    "build_datasets": ".dataset",
    "corpus_texts": ".records",
    "load_dataset": ".sources",
    "validate_dataset": ".sources",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
