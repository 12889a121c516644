"""Find the data files under a path (file, folder or .zip), read each with its format's reader, and report."""

from __future__ import annotations

import os
from pathlib import Path

from .archive import ArchiveError, extract_zip
from .formats import READERS, Item, SourceFile, read_captioned_image
from .images import IMAGE_SUFFIXES
from .records import Problem, Record
from .report import ValidationReport

_JUNK = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})  # OS litter inside folders and zips, never data
# Files that describe a dataset rather than hold records, skipped without a problem: the summary.json the
# demo sets write beside their data. Only exact names, so a stray data.json is still reported (a person may
# have meant it as data).
SUMMARY_FILE = "summary.json"
METADATA_FILES = frozenset({SUMMARY_FILE})
SUPPORTED = ".txt, .md, .jsonl, .csv, images with a same-name .txt caption, or a .zip of these"


def load_dataset(path: str | Path, cache_dir: str | Path | None = None) -> tuple[list[Record], ValidationReport]:
    """Read every record under `path`; bad ones are left out and described in the report (never raised).

    `cache_dir` is where a .zip is extracted (default: the system temp folder).
    """
    records, problems = _read_path(Path(path), cache_dir)
    return records, ValidationReport.build(str(path), records, problems)


def validate_dataset(path: str | Path, tokenizer=None, cache_dir: str | Path | None = None) -> ValidationReport:
    """The report for `path`; with a tokenizer, the statistics are in tokens as well as characters."""
    records, problems = _read_path(Path(path), cache_dir)
    return ValidationReport.build(str(path), records, problems, tokenizer)


def _read_path(path: Path, cache_dir) -> tuple[list[Record], list[Problem]]:
    if not path.exists():
        items = [
            Problem(
                str(path),
                0,
                "path",
                "no such file or folder",
                "check data.path (relative paths start at the current folder)",
            )
        ]
    elif path.is_dir():
        items = _read_folder(path, str(path))
    elif path.suffix.lower() == ".zip":
        try:
            items = _read_folder(extract_zip(path, cache_dir), str(path))
        except ArchiveError as exc:
            items = [Problem(str(path), 0, "archive", str(exc), exc.hint)]
    else:
        items = list(_read_file(SourceFile(path, str(path), path.parent.resolve())))
    return [i for i in items if isinstance(i, Record)], [i for i in items if isinstance(i, Problem)]


def _read_folder(folder: Path, shown_as: str) -> list[Item]:
    """Every data file under `folder`, in sorted order; images pair with same-name .txt captions."""
    root = folder.resolve()
    files = _files_under(folder)
    present = set(files)
    captions = {f.with_suffix(".txt") for f in files if f.suffix.lower() in IMAGE_SUFFIXES} & present
    items: list[Item] = []
    uncaptioned: list[SourceFile] = []
    for rel in files:
        src = SourceFile(folder / rel, f"{shown_as}/{rel.as_posix()}", root)
        if rel in captions:
            continue  # read together with its image
        if not src.path.resolve().is_relative_to(root):
            items.append(
                Problem(
                    src.name,
                    0,
                    "file",
                    "is a link to a file outside the dataset folder (ignored)",
                    "copy the file into the dataset folder",
                )
            )
        elif rel.suffix.lower() not in IMAGE_SUFFIXES:
            items.extend(_read_file(src))
        elif rel.with_suffix(".txt") in present:
            caption = rel.with_suffix(".txt")
            items.extend(
                read_captioned_image(src, SourceFile(folder / caption, f"{shown_as}/{caption.as_posix()}", root))
            )
        else:
            uncaptioned.append(src)
    # An image without a caption file is fine when a .jsonl/.csv record refers to it.
    used = {p for item in items if isinstance(item, Record) for p in item.images}
    items += [
        Problem(
            src.name,
            0,
            "caption",
            f"no caption file {src.path.with_suffix('.txt').name} and no record uses this image",
            "add the caption file beside it, or refer to the image from a .jsonl/.csv record",
        )
        for src in uncaptioned
        if src.path.resolve() not in used
    ]
    return items


def _files_under(folder: Path) -> list[Path]:
    """Relative paths of the data files under `folder`, skipping hidden, OS and metadata files; symlinked
    folders are not followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in _JUNK]
        rel_dir = Path(dirpath).relative_to(folder)
        found += [rel_dir / f for f in filenames if not f.startswith(".") and f not in _JUNK | METADATA_FILES]
    return sorted(found)


def _read_file(src: SourceFile):
    suffix = src.path.suffix.lower()
    reader = READERS.get(suffix)
    if reader is not None:
        return reader(src)
    hints = {
        ".json": "convert it to .jsonl: one JSON object per line",
        ".zip": "archives inside a dataset are not opened; unzip it into the folder",
        **{s: "an image needs a same-name .txt caption beside it in a folder" for s in IMAGE_SUFFIXES},
    }
    return [
        Problem(
            src.name,
            0,
            "file",
            f"unsupported file type {suffix or '(no extension)'!r} (ignored)",
            hints.get(suffix, f"supported: {SUPPORTED}"),
        )
    ]
