"""One reader per file format (.txt/.md, .jsonl, .csv, captioned image): each yields Records and Problems.

Readers never raise on bad data: a bad record becomes a Problem naming file, line and field, and reading
goes on with the next record, whatever the record made raise. Lines may end in LF, CRLF or CR, even mixed in
one file (Python's universal newlines). Readers are generators; `text = yield from _read(src)` passes a file-level
problem through to the caller and hands back the text (None when the file could not be read).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

from .images import check_image
from .records import (
    UTF8_HINT,
    Problem,
    Record,
    RecordError,
    check_messages,
    check_text,
    messages_without_placeholders,
    raw_text_error,
    shown,
    type_name,
    unexpected_error,
    vqa_messages,
    with_placeholders,
    without_placeholders,
)

Item = Record | Problem
JSONL_EXAMPLE = '{"text": "..."} or {"messages": [...]} or {"image": "cat.jpg", "caption": "..."}'


@dataclass(frozen=True)
class SourceFile:
    path: Path  # where the bytes are (inside a zip: the extracted copy)
    name: str  # what the user calls it (inside a zip: "data.zip/train.jsonl"), used in every Problem
    root: Path  # resolved dataset folder: images a file refers to must stay inside it


def read_text_file(src: SourceFile) -> Iterator[Item]:
    """A .txt/.md file is one document; lines that are not UTF-8 or hold a NUL byte are dropped and reported."""
    text = yield from _read_clean(src, "text", without_placeholders)
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
    empty = True
    for lineno, line in enumerate(split_lines(text), 1):
        line = line.removeprefix("\ufeff")  # files joined with `cat` keep each one's byte order mark
        if not line.strip():
            continue
        empty = False
        try:
            bad_bytes = raw_text_error(line, "json")
            if bad_bytes:
                raise bad_bytes
            yield _json_record(_parse_json(line), src, lineno)
        except RecordError as exc:
            yield exc.at(src.name, lineno)
        except Exception as exc:  # whatever one record raises costs only that record
            yield unexpected_error(exc).at(src.name, lineno)
    if empty:
        yield _empty_file(src, f"add one JSON object per line, e.g. {JSONL_EXAMPLE}")


def read_csv(src: SourceFile) -> Iterator[Item]:
    """A header row naming a `text` (or `caption`) column and optionally an `image` column, then one row per record.

    Quoting is parsed strictly: a row whose quotes do not close where they should is reported at the line
    where the row starts, and reading starts again on the next line, so an unclosed quote costs one row
    instead of silently swallowing every row after it.
    """
    text = yield from _read(src)
    if text is None:
        return
    _allow_fields_up_to(len(text))
    rows = _CsvRows(text)
    header = yield from _csv_header(rows, src)
    if header is None:
        return
    columns = [c.strip().lower() for c in header]
    text_col = next(columns.index(c) for c in ("text", "caption") if c in columns)
    image_col = columns.index("image") if "image" in columns else None
    empty = True
    for lineno, last, row in rows:
        if isinstance(row, csv.Error):
            empty = False
            yield _quote_problem(src, lineno, last, row)
            continue
        if not any(cell.strip() for cell in row):
            continue
        empty = False
        if last > lineno and len(row) != len(header):
            rows.restart(lineno + 1)  # a quote ran over line ends: read those lines as rows of their own
            yield _runaway_quote_problem(src, lineno, last, len(row), len(header))
            continue
        try:
            yield _csv_record(row, header, text_col, image_col, src, lineno)
        except RecordError as exc:
            yield exc.at(src.name, lineno)
        except Exception as exc:  # whatever one row raises costs only that row
            yield unexpected_error(exc, "row").at(src.name, lineno)
    if empty:
        yield _empty_file(src, "add one row per record under the header row")


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
    except Exception as exc:  # one odd image costs only its own record
        yield unexpected_error(exc, "image").at(caption.name, 1)


def _empty_file(src: SourceFile, hint: str) -> Problem:
    return Problem(src.name, 0, "file", "holds no records", f"{hint}, or remove the file")


READERS: dict[str, Callable[[SourceFile], Iterator[Item]]] = {
    ".txt": read_text_file,
    ".md": read_text_file,
    ".jsonl": read_jsonl,
    ".csv": read_csv,
}

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def split_lines(text: str) -> list[str]:
    """The lines of `text`, whichever of LF, CRLF or CR ends each one; a final line break gives a last ''."""
    return _LINE_BREAK.split(text)


def regular_file_problem(path: Path, name: str) -> Problem | None:
    """A Problem when `path` cannot be read as a data file (a folder, FIFO, socket or device; unreadable).

    Checked before any open(): opening a FIFO for reading waits for a writer, forever if none comes.
    """
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        return Problem(name, 0, "file", f"cannot read the file ({_reason(exc)})", "check it exists and is readable")
    if stat.S_ISREG(mode):
        return None
    return Problem(
        name,
        0,
        "file",
        f"is {_file_kind(mode)}, not a regular file (skipped)",
        "a dataset holds regular files only; remove it from the folder",
    )


def resolve_image(ref: str, base: Path, root: Path, field: str = "image") -> Path:
    """`ref` (relative to `base`, the referring file's folder) as a checked path inside `root`."""
    if "\x00" in ref:
        raise RecordError(field, f"image path {shown(ref)} contains a NUL byte", "write the image's relative path")
    try:
        path = (base / ref).resolve()
        if not path.is_relative_to(root):
            raise RecordError(
                field,
                f"{shown(ref)} is outside the dataset folder",
                "keep images inside the dataset folder and refer to them by relative path",
            )
        os.lstat(path)
    except FileNotFoundError:
        raise RecordError(
            field,
            f"image not found: {shown(ref)}",
            f"paths are relative to the file's own folder ({base.name or base})",
        ) from None
    except OSError as exc:  # a name too long for the file system, a link loop, ...
        raise RecordError(
            field, f"cannot open image {shown(ref)} ({_reason(exc)})", "check the image's file name and path"
        ) from None
    problem = check_image(path)
    if problem:
        raise RecordError(field, f"bad image {shown(ref)}: {problem}", "replace the image, or remove the record")
    return path


# Byte order marks, longest first: UTF-32's little-endian mark starts with UTF-16's.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
_SNIFF_BYTES = 8192
_BINARY_NUL_SHARE = 0.1  # text never has NULs; UTF-16 without a mark is half NULs, binaries are full of them


def decode_text(data: bytes) -> tuple[str | None, str | None]:
    """(text, None) or (None, why the file is not text).

    UTF-8 by default, with bytes that are not UTF-8 kept as surrogate escapes so each reader can report
    their line; UTF-16 and UTF-32 when the file starts with their byte order mark (Windows Notepad's
    "Unicode"), since refusing those would lose good data.
    """
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return _decode_marked(data[len(bom) :], encoding, len(bom))
    head = data[:_SNIFF_BYTES]
    nul_share = head.count(0) / max(len(head), 1)
    if nul_share > _BINARY_NUL_SHARE:
        why = f"{nul_share:.0%} of its first bytes are NUL: binary, or UTF-16 without a byte order mark"
        return None, f"is not a text file ({why})"
    return data.decode("utf-8", errors="surrogateescape"), None


def _decode_marked(body: bytes, encoding: str, offset: int) -> tuple[str | None, str | None]:
    if encoding == "utf-8":
        return body.decode("utf-8", errors="surrogateescape"), None
    try:
        return body.decode(encoding), None
    except UnicodeDecodeError as exc:
        name = encoding[:6].upper()
        return (
            None,
            f"starts with a {name} byte order mark but is not {name} ({exc.reason} at byte {exc.start + offset})",
        )


def _read(src: SourceFile) -> Generator[Item, None, str | None]:
    """The file's text (see decode_text), or None after yielding a file-level problem."""
    problem = regular_file_problem(src.path, src.name)
    if problem is not None:
        yield problem
        return None
    hint = f"{UTF8_HINT}, or remove it from the dataset"
    try:
        text, why = decode_text(src.path.read_bytes())
    except OSError as exc:
        text, why, hint = None, f"cannot read the file ({_reason(exc)})", "check it exists and is readable"
    except MemoryError:
        text, why, hint = None, "is too large to read into memory", "split it into smaller files"
    if text is None:
        yield Problem(src.name, 0, "file", why, hint)
    return text


def _read_clean(
    src: SourceFile, field: str, line_check: Callable[[str, str], object] | None = None
) -> Generator[Item, None, str | None]:
    """The file's text minus the lines that are not UTF-8, hold a NUL byte or fail `line_check` (which
    raises RecordError), each reported; with LF line ends."""
    text = yield from _read(src)
    if text is None or ("\r" not in text and _line_passes(text, field, line_check)):
        return text  # the common case, without splitting: each check looks for something a line would hold
    good = []
    for lineno, line in enumerate(split_lines(text), 1):
        try:
            bad = raw_text_error(line, field)
            if bad:
                raise bad
            if line_check is not None:
                line_check(line, field)
        except RecordError as exc:
            yield exc.at(src.name, lineno)
        else:
            good.append(line)
    return "\n".join(good)


def _line_passes(line: str, field: str, line_check: Callable[[str, str], object] | None) -> bool:
    if raw_text_error(line, field) is not None:
        return False
    try:
        if line_check is not None:
            line_check(line, field)
    except RecordError:
        return False
    return True


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc)


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_ISDIR: "a folder",
        stat.S_ISFIFO: "a named pipe (FIFO)",
        stat.S_ISSOCK: "a socket",
        stat.S_ISCHR: "a character device",
        stat.S_ISBLK: "a block device",
    }
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def _parse_json(line: str):
    try:
        return _DECODER.decode(line)
    except json.JSONDecodeError as exc:
        raise RecordError(
            "json",
            f"not valid JSON: {exc.msg} at column {exc.colno}",
            f"each line must be one complete JSON object, e.g. {JSONL_EXAMPLE}",
        ) from None
    except RecursionError:
        raise RecordError("json", "nested too deeply", "flatten the record") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are all different: readers disagree on which of two equal keys wins."""
    obj = dict(pairs)
    if len(obj) < len(pairs):  # a key repeats: name the first one that does
        keys = [k for k, _ in pairs]
        key = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise RecordError(key, f"the key {shown(key)} appears twice in one object", "keep only one of them")
    return obj


def _bounded_int(digits: str) -> int:
    try:
        return int(digits)
    except ValueError:  # longer than sys.get_int_max_str_digits() (4,300 by default)
        raise RecordError(
            "json",
            f"a number has {len(digits):,} digits, more than the {sys.get_int_max_str_digits():,} allowed",
            'write it as text in quotes ("12345...") or remove it',
        ) from None


# One decoder for every line: json.loads builds a new one per call when given hooks.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_int=_bounded_int)


def _json_record(obj, src: SourceFile, line: int) -> Record:
    if not isinstance(obj, dict):
        raise RecordError("json", f"expected an object {{...}}, got {type_name(obj)}", f"write e.g. {JSONL_EXAMPLE}")
    has_image = "image" in obj
    if "messages" in obj:
        messages = check_messages(obj["messages"])
        images = _image_refs(obj["image"], src) if has_image else []
        messages = vqa_messages(messages, len(images)) if images else messages_without_placeholders(messages)
        return Record("chat", None, messages, images, src.name, line)
    keys = ("caption", "text") if has_image else ("text",)
    key = next((k for k in keys if k in obj), None)
    if key is None:
        wanted = "'caption', 'text' or 'messages'" if has_image else "'text', 'messages' or 'image'"
        raise RecordError(keys[0], f"missing: the record has no {wanted} field", f"write e.g. {JSONL_EXAMPLE}")
    text = check_text(obj[key], key)
    if not has_image:
        return Record("text", without_placeholders(text, key), None, [], src.name, line)
    images = _image_refs(obj["image"], src)
    return Record("text", with_placeholders(text, len(images), key), None, images, src.name, line)


def _image_refs(value, src: SourceFile) -> list[Path]:
    refs = value if isinstance(value, list) else [value]
    if not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise RecordError(
            "image",
            f"expected a file path or a list of them, got {shown(repr(value))}",
            'write e.g. "image": "images/cat.jpg"',
        )
    return [resolve_image(ref, src.path.parent, src.root) for ref in refs]


class _CsvRows:
    """Iterating gives (first line, last line, row or csv.Error) for each row of a CSV text. After an error,
    and after restart(line), parsing starts again at the start of a line, so one bad row never hides the rest."""

    def __init__(self, text: str):
        self._lines = io.StringIO(text, newline="").readlines()  # split at LF, CRLF and CR, as csv does
        self._next = 0  # lines csv.reader has taken so far
        self._reader = self._new_reader()

    def restart(self, line: int) -> None:
        """Parse on from 1-based `line`, with a fresh reader (one that raised may be mid-row)."""
        self._next = line - 1
        self._reader = self._new_reader()

    def __iter__(self) -> Iterator[tuple[int, int, list[str] | csv.Error]]:
        while True:
            first = self._next + 1
            try:
                row = next(self._reader)
            except StopIteration:
                return
            except csv.Error as exc:
                last = max(first, self._next)
                self.restart(first + 1)
                yield first, last, exc
                continue
            yield first, max(first, self._next), row

    def _new_reader(self):
        return csv.reader(self._feed(), strict=True)

    def _feed(self) -> Iterator[str]:
        # One physical line at a time, so the count of lines taken tells where each row ends.
        while self._next < len(self._lines):
            self._next += 1
            yield self._lines[self._next - 1]


def _csv_header(rows: _CsvRows, src: SourceFile) -> Generator[Item, None, list[str] | None]:
    """The header row, or None after yielding why there is no usable one."""
    for lineno, last, row in rows:
        if isinstance(row, csv.Error):  # without its header no row can be read
            what = _quote_problem(src, lineno, last, row).message
            yield Problem(src.name, lineno, "header", f"cannot read the header row: {what}", _QUOTE_HINT)
            return None
        if not any(cell.strip() for cell in row):
            continue  # blank lines before the header
        columns = [c.strip().lower() for c in row]
        if any(c in columns for c in ("text", "caption")):
            return row
        found = f"found: {', '.join(row)}" if row else "the file is empty"
        break
    else:
        found = "the file is empty"
        lineno = 1
    yield Problem(
        src.name,
        lineno,
        "header",
        f"no 'text' column ({found})",
        "a header row is required; name the text column 'text' (and an image column 'image'), "
        "separated by commas, e.g. text,image",
    )
    return None


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
        bad = raw_text_error(cell, name)
        if bad:
            raise bad
    text = check_text(row[text_col], header[text_col])
    if image_col is None or not row[image_col].strip():
        return Record("text", without_placeholders(text, header[text_col]), None, [], src.name, line)
    images = [resolve_image(row[image_col].strip(), src.path.parent, src.root, header[image_col])]
    return Record("text", with_placeholders(text, 1, header[text_col]), None, images, src.name, line)


_QUOTE_HINT = 'close the quote; inside a quoted value write a quote twice ("He said ""hi""")'


def _quote_problem(src: SourceFile, line: int, last: int, exc: csv.Error) -> Problem:
    """A row the csv module refused (in strict mode: a quote that never closes, or text after a closing quote)."""
    if "unexpected end of data" in str(exc):
        what = "a quote opened in this row is never closed (the file ends inside it)"
    else:
        where = f" on line {last}" if last > line else ""
        what = f"bad quoting{where}: {exc}"
    return Problem(src.name, line, "row", what, f"{_QUOTE_HINT}; the lines after it were read as rows")


def _runaway_quote_problem(src: SourceFile, line: int, last: int, values: int, columns: int) -> Problem:
    """A quoted value that runs over line ends into a row of the wrong width: most likely a quote left open."""
    return Problem(
        src.name,
        line,
        "row",
        f"a quoted value opened in this row runs on to line {last}, giving {values} value(s) for {columns} "
        "columns: probably an unclosed quote",
        f"{_QUOTE_HINT}; the lines after it were read as rows",
    )


# The csv module refuses fields over 128 KiB by default, which a long document in one cell easily is. A
# field can never be longer than the file holding it, so the file's length is always a safe limit; 2**31 - 1
# is the largest a C long holds on every platform (Windows' is 32-bit).
_CSV_FIELD_LIMIT_MAX = 2**31 - 1


def _allow_fields_up_to(chars: int) -> None:
    # Only ever raised: the limit is process-wide, and another reader may be parsing a larger file.
    needed = min(chars + 1, _CSV_FIELD_LIMIT_MAX)
    if csv.field_size_limit() < needed:
        csv.field_size_limit(needed)
