"""One reader per file format (.txt/.md, .jsonl, .csv, captioned image): each yields Records and Problems.

Readers never raise on bad data: a bad record becomes a Problem naming file, line and field, and reading
goes on with the next record. Readers are generators; `text = yield from _read(src)` passes a file-level
problem through to the caller and hands back the text (None when the file could not be read).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

from .images import check_image
from .records import (
    Problem,
    Record,
    RecordError,
    check_messages,
    check_text,
    encoding_error,
    type_name,
    vqa_messages,
    with_placeholders,
)

Item = Record | Problem
JSONL_EXAMPLE = '{"text": "..."} or {"messages": [...]} or {"image": "cat.jpg", "caption": "..."}'


@dataclass(frozen=True)
class SourceFile:
    path: Path  # where the bytes are (inside a zip: the extracted copy)
    name: str  # what the user calls it (inside a zip: "data.zip/train.jsonl"), used in every Problem
    root: Path  # resolved dataset folder: images a file refers to must stay inside it


def read_text_file(src: SourceFile) -> Iterator[Item]:
    """A .txt/.md file is one document; lines that are not UTF-8 are dropped and reported."""
    text = yield from _read_clean(src, "text")
    if text is None:
        return
    try:
        yield Record("text", check_text(text, "text"), None, [], src.name, 1)
    except RecordError as exc:
        yield exc.at(src.name, 0)


def read_jsonl(src: SourceFile) -> Iterator[Item]:
    """One JSON object per line: text, chat (messages), caption (image + caption/text) or visual Q&A."""
    text = yield from _read(src)
    if text is None:
        return
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            bad_bytes = encoding_error(line, "json")
            if bad_bytes:
                raise bad_bytes
            yield _json_record(_parse_json(line), src, lineno)
        except RecordError as exc:
            yield exc.at(src.name, lineno)


def read_csv(src: SourceFile) -> Iterator[Item]:
    """A header row naming a `text` (or `caption`) column and optionally an `image` column, then one row per record."""
    text = yield from _read(src)
    if text is None:
        return
    rows = csv.reader(io.StringIO(text, newline=""))
    header = next(rows, None) or []
    columns = [c.strip().lower() for c in header]
    text_col = next((columns.index(c) for c in ("text", "caption") if c in columns), None)
    if text_col is None:
        found = f"found: {', '.join(header)}" if header else "the file is empty"
        yield Problem(
            src.name,
            1,
            "header",
            f"no 'text' column ({found})",
            "a header row is required; name the text column 'text' (and an image column 'image'), e.g. text,image",
        )
        return
    image_col = columns.index("image") if "image" in columns else None
    while True:
        lineno = rows.line_num + 1  # a quoted value may span lines: report where the row starts
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error as exc:
            yield Problem(
                src.name,
                lineno,
                "csv",
                f"cannot parse the rest of the file ({exc})",
                "check for an unclosed quote; values with commas or newlines must be in double quotes",
            )
            return
        if not any(cell.strip() for cell in row):
            continue
        try:
            yield _csv_record(row, header, text_col, image_col, src, lineno)
        except RecordError as exc:
            yield exc.at(src.name, lineno)


def read_captioned_image(image: SourceFile, caption: SourceFile) -> Iterator[Item]:
    """An image with a same-name .txt caption beside it (`cat.png` + `cat.txt`)."""
    text = yield from _read_clean(caption, "caption")
    if text is None:
        return
    try:
        text = check_text(text.strip(), "caption")
        path = resolve_image(image.path.name, image.path.parent, image.root)
        yield Record("text", with_placeholders(text, 1, "caption"), None, [path], caption.name, 1)
    except RecordError as exc:
        yield exc.at(caption.name, 1)


READERS: dict[str, Callable[[SourceFile], Iterator[Item]]] = {
    ".txt": read_text_file,
    ".md": read_text_file,
    ".jsonl": read_jsonl,
    ".csv": read_csv,
}


def resolve_image(ref: str, base: Path, root: Path, field: str = "image") -> Path:
    """`ref` (relative to `base`, the referring file's folder) as a checked path inside `root`."""
    path = (base / ref).resolve()
    if not path.is_relative_to(root):
        raise RecordError(
            field,
            f"{ref!r} is outside the dataset folder",
            "keep images inside the dataset folder and refer to them by relative path",
        )
    if not path.exists():
        raise RecordError(
            field, f"image not found: {ref!r}", f"paths are relative to the file's own folder ({base.name or base})"
        )
    problem = check_image(path)
    if problem:
        raise RecordError(field, f"bad image {ref!r}: {problem}", "replace the image, or remove the record")
    return path


def _read(src: SourceFile) -> Generator[Item, None, str | None]:
    """The file's text, with non-UTF-8 bytes kept as surrogate escapes so each reader can report their line."""
    try:
        data = src.path.read_bytes()
    except OSError as exc:
        yield Problem(
            src.name, 0, "file", f"cannot read the file ({exc.strerror or exc})", "check it exists and is readable"
        )
        return None
    return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _read_clean(src: SourceFile, field: str) -> Generator[Item, None, str | None]:
    """The file's text minus lines that are not UTF-8, each reported."""
    text = yield from _read(src)
    if text is None or encoding_error(text, field) is None:
        return text
    good = []
    for lineno, line in enumerate(text.split("\n"), 1):
        bad = encoding_error(line, field)
        if bad:
            yield bad.at(src.name, lineno)
        else:
            good.append(line)
    return "\n".join(good)


def _parse_json(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError(
            "json",
            f"not valid JSON: {exc.msg} at column {exc.colno}",
            f"each line must be one complete JSON object, e.g. {JSONL_EXAMPLE}",
        ) from None
    except RecursionError:
        raise RecordError("json", "nested too deeply", "flatten the record") from None


def _json_record(obj, src: SourceFile, line: int) -> Record:
    if not isinstance(obj, dict):
        raise RecordError("json", f"expected an object {{...}}, got {type_name(obj)}", f"write e.g. {JSONL_EXAMPLE}")
    has_image = "image" in obj
    if "messages" in obj:
        messages = check_messages(obj["messages"])
        images = _image_refs(obj["image"], src) if has_image else []
        return Record("chat", None, vqa_messages(messages, len(images)) if images else messages, images, src.name, line)
    keys = ("caption", "text") if has_image else ("text",)
    key = next((k for k in keys if k in obj), None)
    if key is None:
        wanted = "'caption', 'text' or 'messages'" if has_image else "'text', 'messages' or 'image'"
        raise RecordError(keys[0], f"missing: the record has no {wanted} field", f"write e.g. {JSONL_EXAMPLE}")
    text = check_text(obj[key], key)
    if not has_image:
        return Record("text", text, None, [], src.name, line)
    images = _image_refs(obj["image"], src)
    return Record("text", with_placeholders(text, len(images), key), None, images, src.name, line)


def _image_refs(value, src: SourceFile) -> list[Path]:
    refs = value if isinstance(value, list) else [value]
    if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise RecordError(
            "image", f"expected a file path or a list of them, got {value!r}", 'write e.g. "image": "images/cat.jpg"'
        )
    return [resolve_image(ref, src.path.parent, src.root) for ref in refs]


def _csv_record(
    row: list[str], header: list[str], text_col: int, image_col: int | None, src: SourceFile, line: int
) -> Record:
    if len(row) != len(header):
        raise RecordError(
            "row",
            f"has {len(row)} values but the header has {len(header)} columns",
            'put values containing commas in double quotes: "a, b"',
        )
    for name, cell in zip(header, row, strict=True):
        bad = encoding_error(cell, name)
        if bad:
            raise bad
    text = check_text(row[text_col], header[text_col])
    if image_col is None or not row[image_col].strip():
        return Record("text", text, None, [], src.name, line)
    images = [resolve_image(row[image_col].strip(), src.path.parent, src.root, header[image_col])]
    return Record("text", with_placeholders(text, 1, header[text_col]), None, images, src.name, line)
