"""Every kind of malformed input yields its own Problem (file, line, field, message, hint); good records survive."""

import json
from pathlib import Path

import pytest
from PIL import Image

from apertis_core.data import Problem, load_dataset, validate_dataset
from apertis_core.tokenizer import Tokenizer

GOOD = {"text": "a good record"}
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]

# (bad jsonl line, field, words the message must contain)
BAD_JSONL = {
    "bad_json": ('{"text": "unterminated', "json", "not valid JSON"),
    "not_an_object": ('["text"]', "json", "expected an object"),
    "missing_field": ({"txt": "typo"}, "text", "no 'text', 'messages' or 'image' field"),
    "wrong_type": ({"text": 42}, "text", "expected text, got a number"),
    "empty_text": ({"text": "   "}, "text", "is empty"),
    "unknown_role": ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role", "'bot' is not a known role"),
    "missing_role": ({"messages": [{"content": "x"}]}, "messages[0].role", "is missing"),
    "content_type": (
        {"messages": [{"role": "user", "content": None}]},
        "messages[0].content",
        "expected text, got null",
    ),
    "messages_type": ({"messages": "hi"}, "messages", "expected a list of messages"),
    "no_assistant": ({"messages": [{"role": "user", "content": "x"}]}, "messages", "no assistant turn"),
    "missing_image": ({"image": "nope.png", "caption": "x"}, "image", "image not found: 'nope.png'"),
    "bad_image": ({"image": "fake.png", "caption": "x"}, "image", "bad image 'fake.png': not an image file"),
    "empty_image": ({"image": "empty.png", "caption": "x"}, "image", "bad image 'empty.png': empty file"),
    "escaping_image": ({"image": "../outside.png", "caption": "x"}, "image", "outside the dataset folder"),
    "image_type": ({"image": 5, "caption": "x"}, "image", "expected a file path"),
    "no_caption": ({"image": "ok.png"}, "caption", "no 'caption', 'text' or 'messages'"),
    "placeholders": (
        {"image": "ok.png", "messages": [{"role": "user", "content": "<image><image>"}, CHAT[1]]},
        "messages",
        "2 <image> placeholders for 1 images",
    ),
    "vqa_no_user": ({"image": "ok.png", "messages": [CHAT[1]]}, "messages", "no user turn"),
}


@pytest.fixture
def folder(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (4, 4), "blue").save(data / "ok.png")
    Image.new("RGB", (4, 4), "blue").save(tmp_path / "outside.png")
    (data / "fake.png").write_text("not an image")
    (data / "empty.png").write_bytes(b"")
    return data


def _line(row) -> str:
    return row if isinstance(row, str) else json.dumps(row)


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_each_bad_jsonl_record_is_reported_at_its_line_and_the_rest_kept(folder, case):
    bad, field, words = BAD_JSONL[case]
    path = folder / "d.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), _line(bad), json.dumps({"messages": CHAT})]) + "\n", encoding="utf-8")
    records, report = load_dataset(path)
    assert [r.line for r in records] == [1, 3]
    assert len(report.problems) == 1 and report.skipped == 1 and not report.ok
    problem = report.problems[0]
    assert (problem.file, problem.line, problem.field) == (str(path), 2, field)
    assert words in problem.message and problem.hint
    assert f"{path}:2: {field}: {problem.message} — {problem.hint}" in report.to_text()


def test_non_utf8_bytes_are_reported_with_their_line(tmp_path):
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n{"text": "also fine"}\n')
    (tmp_path / "t.txt").write_bytes(b"line one\nline \xff two\nline three\n")
    records, report = load_dataset(tmp_path)
    assert [str(p) for p in report.problems] == [
        f"{tmp_path}/d.jsonl:2: json: not valid UTF-8: byte 0xe9 at column 14 — " + report.problems[0].hint,
        f"{tmp_path}/t.txt:2: text: not valid UTF-8: byte 0xff at column 6 — " + report.problems[1].hint,
    ]
    assert "UTF-8" in report.problems[0].hint
    assert [r.text for r in records] == ["fine", "also fine", "line one\nline three\n"]  # only the bad line is dropped


def test_csv_without_a_text_column_is_one_problem_at_the_header(tmp_path):
    (tmp_path / "d.csv").write_text("body,image\nhello,\n", encoding="utf-8")
    records, report = load_dataset(tmp_path / "d.csv")
    assert records == []
    assert report.problems == [
        Problem(str(tmp_path / "d.csv"), 1, "header", "no 'text' column (found: body, image)", report.problems[0].hint)
    ]
    assert "header row is required" in report.problems[0].hint


def test_bad_csv_rows_name_their_line_and_column(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    (tmp_path / "d.csv").write_bytes(
        b"text,image\ngood,\nextra,ok.png,oops\n,ok.png\ncaf\xe9,\nmissing,no.png\nlast,ok.png\n"
    )
    records, report = load_dataset(tmp_path / "d.csv")
    assert [r.line for r in records] == [2, 7]
    got = [(p.line, p.field, p.message) for p in report.problems]
    assert got == [
        (3, "row", "has 3 values but the header has 2 columns"),
        (4, "text", "is empty"),
        (5, "text", "not valid UTF-8: byte 0xe9 at column 4"),
        (6, "image", "image not found: 'no.png'"),
    ]


def test_folder_problems_unsupported_files_uncaptioned_images_and_missing_paths(tmp_path):
    (tmp_path / "good.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "data.json").write_text("{}")
    (tmp_path / ".hidden").write_text("ignored silently")
    Image.new("RGB", (4, 4)).save(tmp_path / "lonely.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "blank.png")
    (tmp_path / "blank.txt").write_text("  \n")
    records, report = load_dataset(tmp_path)
    assert [r.text for r in records] == ["fine"]
    assert {(Path(p.file).name, p.line, p.field) for p in report.problems} == {
        ("data.json", 0, "file"),
        ("lonely.png", 0, "caption"),
        ("blank.txt", 1, "caption"),
    }
    json_problem = next(p for p in report.problems if p.file.endswith("data.json"))
    assert "unsupported file type '.json'" in json_problem.message and ".jsonl" in json_problem.hint
    _, missing = load_dataset(tmp_path / "nope")
    assert [(p.field, p.message) for p in missing.problems] == [("path", "no such file or folder")]
    assert missing.records == 0 and "nothing to train on" in missing.to_text()


def test_report_counts_characters_tokens_images_and_lengths(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    rows = [{"text": "abc"}, {"text": "abcdefghij"}, {"image": "ok.png", "caption": "abcd"}, {"messages": CHAT}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    report = validate_dataset(tmp_path, tokenizer=Tokenizer.byte_level())
    s = report.stats
    assert report.ok and report.records == 4
    assert s["kinds"] == {"text": 2, "image+caption": 1, "chat": 1}
    assert s["characters"] == 3 + 10 + 4 + 7 and s["images"] == 1
    # byte-level: text + <|eot|>; caption: <image> \n text <|eot|>; chat: per turn tag + content + <|eot|>
    assert s["tokens"] == (3 + 1) + (10 + 1) + (1 + 1 + 4 + 1) + (2 + 2 + 5 + 2)
    assert s["length"]["unit"] == "tokens" and (s["length"]["min"], s["length"]["max"]) == (4, 11)
    assert sum(b["count"] for b in s["length"]["histogram"]) == 4
    histogram = s["length"]["histogram"]
    assert histogram[0]["from"] == 4 and histogram[-1]["to"] > 11 and histogram[-1]["count"] == 2  # 11 and 11
    text = report.to_text()
    assert "records: 4 (1 chat, 1 image+caption, 2 text), skipped: 0" in text and "tokens: 33" in text and "OK" in text
    assert validate_dataset(tmp_path).stats["length"]["unit"] == "characters"


def test_problem_list_can_be_capped_and_says_how_many_more(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join("not json\n" for _ in range(7)) + json.dumps(GOOD) + "\n", encoding="utf-8")
    report = validate_dataset(path)
    assert report.skipped == 7
    capped = report.to_text(max_problems=3)
    assert capped.count(f"{path}:") == 3 and "... and 4 more" in capped
    assert report.to_text().count(f"{path}:") == 7 and "more" not in report.to_text()


def test_dataset_metadata_is_skipped_but_a_stray_json_is_reported(tmp_path):
    """The summary.json the demo sets write beside their data is not data; any other .json may be meant as data."""
    (tmp_path / "train.jsonl").write_text(json.dumps(GOOD) + "\n", encoding="utf-8")
    (tmp_path / "summary.json").write_text('{"records": {"train": 1}}', encoding="utf-8")
    assert validate_dataset(tmp_path).problems == []
    (tmp_path / "extra.json").write_text("{}", encoding="utf-8")
    problems = validate_dataset(tmp_path).problems
    assert [(Path(p.file).name, p.field) for p in problems] == [("extra.json", "file")]
    assert ".jsonl" in problems[0].hint


def test_an_unforeseen_error_in_one_record_costs_only_that_record(tmp_path, monkeypatch):
    from apertis_core.data import formats

    checked = formats._json_record

    def with_a_bug(obj, src, line):
        if obj.get("text") == "boom":
            raise ZeroDivisionError("an unforeseen bug")
        return checked(obj, src, line)

    monkeypatch.setattr(formats, "_json_record", with_a_bug)
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [GOOD, {"text": "boom"}, GOOD]), encoding="utf-8")
    records, report = load_dataset(path)
    assert [r.line for r in records] == [1, 3]
    assert [(p.line, p.field) for p in report.problems] == [(2, "record")]
    assert "ZeroDivisionError: an unforeseen bug" in report.problems[0].message


def test_a_reader_that_breaks_mid_file_keeps_what_it_read_and_the_other_files(tmp_path, monkeypatch):
    from apertis_core.data import Record, formats

    def breaks_after_one_record(src):
        yield Record("text", "first", None, [], src.name, 1)
        raise RuntimeError("reader bug")

    monkeypatch.setitem(formats.READERS, ".md", breaks_after_one_record)
    (tmp_path / "a.md").write_text("# a", encoding="utf-8")
    (tmp_path / "b.txt").write_text("other file", encoding="utf-8")
    records, report = load_dataset(tmp_path)
    assert [r.text for r in records] == ["first", "other file"]
    assert [(Path(p.file).name, p.line, p.field) for p in report.problems] == [("a.md", 1, "file")]
    assert "reading stopped after line 1" in report.problems[0].message
    assert "RuntimeError: reader bug" in report.problems[0].message


def test_text_without_an_image_may_not_hold_an_image_placeholder(tmp_path):
    """Training would look for an image to put there and stop; in a .txt file only that line is dropped."""
    rows = [GOOD, {"text": "see <image>"}, {"messages": [{"role": "user", "content": "<image>?"}, CHAT[1]]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (tmp_path / "t.txt").write_text("one\ntwo <image>\nthree\n", encoding="utf-8")
    records, report = load_dataset(tmp_path)
    assert [r.text for r in records] == ["a good record", "one\nthree\n"]
    assert [(Path(p.file).name, p.line, p.field) for p in report.problems] == [
        ("d.jsonl", 2, "text"),
        ("d.jsonl", 3, "messages[0].content"),
        ("t.txt", 2, "text"),
    ]
    assert all("holds <image> but the record has no image" in p.message for p in report.problems)


def test_an_image_placeholder_in_an_assistant_turn_is_refused(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "ok.png")
    messages = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "It is <image>"}]
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "ok.png", "messages": messages}), encoding="utf-8")
    records, report = load_dataset(tmp_path / "d.jsonl")
    assert records == []
    assert [(p.line, p.field) for p in report.problems] == [(1, "messages[1].content")]
    assert "assistant turn holds <image>" in report.problems[0].message
