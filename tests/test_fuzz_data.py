"""Property tests of the dataset readers: any bytes in a .txt/.jsonl/.csv/.zip never make loading raise, every
problem names a line the file has, and valid records written around garbage come back exactly."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apertis_core.data import load_dataset, validate_dataset
from apertis_core.data.records import printable
from apertis_core.tokenizer import Tokenizer

# No deadline: a slow, busy machine must never fail a test (only wrong answers do).
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Bytes that exercise the readers' edges: line ends, quotes, separators, JSON syntax, NUL, BOMs, bad UTF-8.
PIECES = [b"\n", b"\r", b"\r\n", b'"', b",", b"{", b"}", b"[", b"]", b":", b'"text"', b"\x00", b"\xef\xbb\xbf"]
PIECES += [b"\xff\xfe", b"\xe9", b" ", b"a", b"\\", b"\\u0000", b"\\ud800", b"<image>", b'{"text": "x"}', b"9" * 5000]
edgy_bytes = st.lists(st.sampled_from(PIECES) | st.binary(max_size=8), max_size=60).map(b"".join)
any_bytes = st.binary(max_size=2000) | edgy_bytes

# Text a person could mean as a record: valid Unicode (no lone surrogates), not blank, no NUL.
record_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1).filter(str.strip)
line_end = st.sampled_from(["\n", "\r\n", "\r"])


def line_count(data: bytes) -> int:
    text = data.decode("utf-8", "replace")
    return text.count("\n") + text.count("\r") - text.count("\r\n") + 1


def load(path: Path):
    records, report = load_dataset(path, cache_dir=path.parent / "cache")
    report.to_text().encode("utf-8")  # printable whatever the bytes were
    return records, report


@FUZZ
@given(data=any_bytes, suffix=st.sampled_from([".txt", ".md", ".jsonl", ".csv"]))
def test_any_bytes_never_raise_and_problems_name_a_line_of_the_file(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d{suffix}"
        path.write_bytes(data)
        records, report = load(path)
        assert all(p.file == str(path) and 0 <= p.line <= line_count(data) and p.hint for p in report.problems)
        assert all(r.source == str(path) and 1 <= r.line <= line_count(data) for r in records)
        for text in [t for r in records for t in r.texts()]:
            text.encode("utf-8")  # valid Unicode, ready to tokenize (a lone surrogate would raise here)
        assert not any("<image>" in t for r in records if not r.images for t in r.texts())
        validate_dataset(path, Tokenizer.byte_level())


@FUZZ
@given(data=any_bytes)
def test_any_bytes_as_a_zip_never_raise(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.zip"
        path.write_bytes(data)
        records, report = load(path)
        assert records == [] and len(report.problems) == 1 and report.problems[0].field == "archive"


@FUZZ
@given(
    rows=st.lists(st.tuples(record_text, st.booleans()), min_size=1, max_size=12),
    end=line_end,
    bom=st.booleans(),
    ascii_only=st.booleans(),
)
def test_jsonl_records_round_trip_and_garbage_lines_cost_only_themselves(rows, end, bom, ascii_only):
    """rows: (text, whether a garbage line follows it)."""
    lines, garbage_at = [], []
    for text, garbage in rows:
        lines.append(json.dumps({"text": text}, ensure_ascii=ascii_only))
        if garbage:
            lines.append('{"text": broken')
            garbage_at.append(len(lines))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.jsonl"
        path.write_bytes(("\ufeff" if bom else "").encode() + end.join(lines).encode("utf-8"))
        records, report = load(path)
    assert [r.text for r in records] == [text for text, _ in rows]
    assert [(p.line, p.field) for p in report.problems] == [(n, "json") for n in garbage_at]


@FUZZ
@given(texts=st.lists(record_text, min_size=1, max_size=12), end=line_end)
def test_csv_rows_round_trip(texts, end):
    out = io.StringIO()
    # csv.writer leaves a CR unquoted when the line ends are LF; any reader takes that CR for a line end.
    quoting = csv.QUOTE_ALL if any("\r" in t or "\n" in t for t in texts) else csv.QUOTE_MINIMAL
    writer = csv.writer(out, lineterminator=end, quoting=quoting)
    writer.writerow(["text", "n"])
    writer.writerows([[text, i] for i, text in enumerate(texts)])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.csv"
        path.write_bytes(out.getvalue().encode("utf-8"))
        records, report = load(path)
    assert report.problems == [] and [r.text for r in records] == texts


# Values csv.writer leaves unquoted, so the only quote in the file is the one left open.
plain_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters='\x00",\r\n'), min_size=1).filter(
    str.strip
)


@FUZZ
@given(texts=st.lists(plain_text, min_size=1, max_size=12), end=line_end, at=st.integers(min_value=0, max_value=12))
def test_an_unclosed_quote_costs_only_its_own_row(texts, end, at):
    at = min(at, len(texts))
    rows = ["text,n", *[f"{text},{i}" for i, text in enumerate(texts)]]
    rows.insert(at + 1, '"never closed,99')
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.csv"
        path.write_bytes(end.join(rows).encode("utf-8"))
        records, report = load(path)
    assert [r.text for r in records] == texts
    assert [(p.line, p.field) for p in report.problems] == [(at + 2, "row")]
    assert "never closed" in report.problems[0].message


@FUZZ
@given(text=record_text, end=line_end)
def test_a_text_file_is_its_text_with_lf_line_ends(text, end):
    written = text.replace("\n", end)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.txt"
        path.write_bytes(written.encode("utf-8"))
        records, report = load(path)
    expected = written.replace("\r\n", "\n").replace("\r", "\n").removeprefix("\ufeff")
    if expected.strip():
        assert report.problems == [] and [r.text for r in records] == [expected]
    else:
        assert records == [] and [p.field for p in report.problems] == ["text"]


file_name = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="/\x00"), min_size=1, max_size=40)


@FUZZ
@given(stems=st.lists(file_name, min_size=1, max_size=6, unique=True))
def test_odd_file_names_in_a_folder_never_raise_and_print(stems):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ds"
        folder.mkdir()
        for stem in stems:
            (folder / f"{stem}.txt").write_text("some text", encoding="utf-8")
        records, report = load(folder)
    visible = [s for s in stems if not s.startswith(".")]  # hidden files are skipped on purpose
    assert report.problems == []
    assert sorted(r.source for r in records) == sorted(printable(f"{folder}/{s}.txt") for s in visible)
