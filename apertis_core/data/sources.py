"""Find the data files under a path (file, folder or .zip), read each with its format's reader, and report."""

from __future__ import annotations

import os
from pathlib import Path

from .archive import ArchiveError, extract_zip
from .formats import READERS, Item, SourceFile, read_captioned_image, regular_file_problem
from .images import IMAGE_SUFFIXES
from .records import Problem, Record, printable, unexpected_error
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
    items = _read_top(path, cache_dir)
    return [i for i in items if isinstance(i, Record)], [i for i in items if isinstance(i, Problem)]


def _read_top(path: Path, cache_dir) -> list[Item]:
    shown_as = printable(str(path))
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte in it
        why = getattr(exc, "strerror", None) or exc  # an OSError's own text repeats the (long) name
        return [Problem(shown_as, 0, "path", f"cannot be opened ({why})", "check data.path")]
    if not exists:
        return [
            Problem(
                shown_as,
                0,
                "path",
                "no such file or folder",
                "check data.path (relative paths start at the current folder)",
            )
        ]
    if is_dir:
        return _read_folder(path, shown_as)
    if path.suffix.lower() == ".zip":
        try:
            return _read_folder(extract_zip(path, cache_dir), shown_as)
        except ArchiveError as exc:
            return [Problem(shown_as, 0, "archive", str(exc), exc.hint)]
    return _read_file(SourceFile(path, shown_as, path.parent.resolve()))


def _read_folder(folder: Path, shown_as: str) -> list[Item]:
    """Every data file under `folder`, in sorted order; images pair with same-name .txt captions."""
    root = folder.resolve()
    files, items = _files_under(folder, shown_as)
    present = set(files)
    captions = {f.with_suffix(".txt") for f in files if f.suffix.lower() in IMAGE_SUFFIXES} & present
    uncaptioned: list[SourceFile] = []
    for rel in files:
        src = _source(folder, rel, shown_as, root)
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
            caption = _source(folder, rel.with_suffix(".txt"), shown_as, root)
            items.extend(_guarded(caption, read_captioned_image(src, caption)))
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


def _source(folder: Path, rel: Path, shown_as: str, root: Path) -> SourceFile:
    # The shown name goes into every Problem and Record: printable even for names that are not UTF-8.
    return SourceFile(folder / rel, printable(f"{shown_as}/{rel.as_posix()}"), root)


def _files_under(folder: Path, shown_as: str) -> tuple[list[Path], list[Item]]:
    """Relative paths of the regular files under `folder`, and a Problem for each entry that cannot be read
    (a FIFO, socket or device, a broken link, an unreadable folder). Hidden, OS and metadata files are
    skipped silently; symlinked folders are not followed."""
    found, problems = [], []

    def unreadable_folder(exc: OSError) -> None:
        name = Path(os.path.relpath(exc.filename, folder)).as_posix() if exc.filename else "."
        problems.append(
            Problem(
                printable(f"{shown_as}/{name}"),
                0,
                "folder",
                f"cannot be read ({exc.strerror or exc}); its files were skipped",
                "check the folder's permissions",
            )
        )

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable_folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in _JUNK)
        rel_dir = Path(dirpath).relative_to(folder)
        for name in filenames:
            if name.startswith(".") or name in _JUNK | METADATA_FILES:
                continue
            rel = rel_dir / name
            problem = regular_file_problem(folder / rel, printable(f"{shown_as}/{rel.as_posix()}"))
            if problem is None:
                found.append(rel)
            else:
                problems.append(problem)
    return sorted(found), problems


def _read_file(src: SourceFile) -> list[Item]:
    reader = READERS.get(src.path.suffix.lower())
    if reader is not None:
        return _guarded(src, reader(src))
    problem = regular_file_problem(src.path, src.name)  # a FIFO named data.json is a FIFO first
    return [problem or _unsupported(src)]


def _guarded(src: SourceFile, items) -> list[Item]:
    """The reader's items; should it raise after all (a bug: readers report per record), the records read
    so far are kept and the rest of the file becomes one Problem instead of costing the whole dataset."""
    out: list[Item] = []
    try:
        out.extend(items)
    except Exception as exc:  # a reader bug must not cost the other files
        last = max((i.line for i in out), default=0)
        why = unexpected_error(exc, "file").message
        out.append(
            Problem(
                src.name,
                last,
                "file",
                f"reading stopped after line {last}: {why}",
                "the records before it were kept; fix the lines after it, and please report this as a bug",
            )
        )
    return out


def _unsupported(src: SourceFile) -> Problem:
    suffix = src.path.suffix.lower()
    hints = {
        ".json": "convert it to .jsonl: one JSON object per line",
        ".zip": "archives inside a dataset are not opened; unzip it into the folder",
        **{s: "an image needs a same-name .txt caption beside it in a folder" for s in IMAGE_SUFFIXES},
    }
    return Problem(
        src.name,
        0,
        "file",
        f"unsupported file type {suffix or '(no extension)'!r} (ignored)",
        hints.get(suffix, f"supported: {SUPPORTED}"),
    )
