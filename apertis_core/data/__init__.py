"""Datasets: read user files (text, chat, captions, visual Q&A; folders and zips), report problems, and
turn records into token windows and batches for training."""

from .config import DataConfig
from .dataset import TokenDataset, build_datasets
from .loader import Batch, BatchLoader
from .records import Problem, Record, corpus_texts
from .report import ValidationReport
from .sources import load_dataset, validate_dataset

__all__ = [
    "Batch",
    "BatchLoader",
    "DataConfig",
    "Problem",
    "Record",
    "TokenDataset",
    "ValidationReport",
    "build_datasets",
    "corpus_texts",
    "load_dataset",
    "validate_dataset",
]
