"""Each dataset format parses into the right records; zips extract safely; image files are checked."""

import json
import os
import stat
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from apertis_core.data import Record, corpus_texts, load_dataset
from apertis_core.data import images as images_module
from apertis_core.data.archive import ArchiveError, extract_zip
from apertis_core.data.images import ImageError, check_image, open_image


def red_png(path: Path, size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "red").save(path)
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8"
    )
    return path


def load_ok(path, **kw) -> list[Record]:
    records, report = load_dataset(path, **kw)
    assert report.problems == [], report.to_text()
    return records


def test_text_and_markdown_files_are_one_document_each(tmp_path):
    (tmp_path / "a.txt").write_text("First line.\nSecond line 🎉\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_bytes("\ufeff# Title\n".encode())  # a BOM is not part of the text
    records = load_ok(tmp_path)
    assert [(r.kind, r.text, r.line) for r in records] == [
        ("text", "First line.\nSecond line 🎉\n", 1),
        ("text", "# Title\n", 1),
    ]
    assert records[1].source == f"{tmp_path}/sub/b.md"


def test_jsonl_reads_text_chat_caption_and_visual_qa(tmp_path):
    cat = red_png(tmp_path / "img" / "cat.png")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "plain", "id": 7},
            "",
            {"messages": chat},
            {"image": "img/cat.png", "caption": "A red square."},
            {
                "image": "img/cat.png",
                "messages": [{"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."}],
            },
            {
                "image": ["img/cat.png", "img/cat.png"],
                "messages": [
                    {"role": "user", "content": "<image> vs <image>?"},
                    {"role": "assistant", "content": "Same."},
                ],
            },
        ],
    )
    text, chat_rec, caption, vqa, two = load_ok(tmp_path / "d.jsonl")
    assert (text.kind, text.text, text.line) == ("text", "plain", 1)
    assert (chat_rec.kind, chat_rec.messages, chat_rec.line) == ("chat", chat, 3)
    assert (caption.kind, caption.text, caption.images) == ("text", "<image>\nA red square.", [cat.resolve()])
    assert vqa.kind == "chat" and vqa.messages[0]["content"] == "<image>\nColour?" and vqa.images == [cat.resolve()]
    assert two.messages[0]["content"] == "<image> vs <image>?" and len(two.images) == 2


def test_csv_reads_text_and_optional_image_columns(tmp_path):
    red_png(tmp_path / "p.png")
    (tmp_path / "d.csv").write_text(
        'id,Text,image\n1,"hello, world",\n2,"two\nlines",p.png\n\n3,third,\n', encoding="utf-8"
    )
    records = load_ok(tmp_path / "d.csv")
    assert [(r.text, r.line) for r in records] == [("hello, world", 2), ("<image>\ntwo\nlines", 3), ("third", 6)]
    assert records[1].images == [(tmp_path / "p.png").resolve()]


def test_image_folder_pairs_images_with_same_name_captions(tmp_path):
    red_png(tmp_path / "a" / "one.jpg")
    (tmp_path / "a" / "one.txt").write_text("First caption.\n", encoding="utf-8")
    red_png(tmp_path / "a" / "b" / "two.png")
    (tmp_path / "a" / "b" / "two.txt").write_text("Second.", encoding="utf-8")
    (tmp_path / "a" / "notes.txt").write_text("A plain document.", encoding="utf-8")
    records = load_ok(tmp_path / "a")
    assert sorted((r.text, [p.name for p in r.images]) for r in records) == [
        ("<image>\nFirst caption.", ["one.jpg"]),
        ("<image>\nSecond.", ["two.png"]),
        ("A plain document.", []),
    ]


def test_images_used_by_a_jsonl_need_no_caption_file(tmp_path):
    red_png(tmp_path / "pics" / "x.png")
    write_jsonl(tmp_path / "d.jsonl", [{"image": "pics/x.png", "text": "an x"}])
    assert len(load_ok(tmp_path)) == 1


def test_zip_of_a_folder_reads_like_the_folder(tmp_path):
    red_png(tmp_path / "src" / "c.png")
    write_jsonl(tmp_path / "src" / "d.jsonl", [{"image": "c.png", "caption": "zipped"}, {"text": "also"}])
    with zipfile.ZipFile(tmp_path / "data.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(tmp_path / "src" / "c.png", "c.png")
        zf.write(tmp_path / "src" / "d.jsonl", "d.jsonl")
        zf.writestr("__MACOSX/._d.jsonl", b"\x00junk")
    records = load_ok(tmp_path / "data.zip", cache_dir=tmp_path / "cache")
    assert [r.text for r in records] == ["<image>\nzipped", "also"]
    assert records[0].source == f"{tmp_path / 'data.zip'}/d.jsonl"
    assert records[0].images[0].read_bytes() == (tmp_path / "src" / "c.png").read_bytes()
    again, _ = load_dataset(tmp_path / "data.zip", cache_dir=tmp_path / "cache")
    assert again[0].images == records[0].images  # extracted once, reused


def test_corpus_texts_has_every_message_but_no_placeholders():
    records = [
        Record("text", "<image>\ncap", None, [Path("x.png")]),
        Record("chat", None, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
    ]
    assert list(corpus_texts(records)) == ["cap", "q", "a"]


def _zip(path: Path, members: list[tuple]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data, *mode in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode:
                info.external_attr = mode[0] << 16
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize(
    "members, message",
    [
        ([("ok.txt", "fine"), ("../../evil.txt", "x")], "zip-slip"),
        ([("/etc/evil.txt", "x")], "absolute path"),
        ([("C:/evil.txt", "x")], "absolute path"),
        ([("link.txt", "/etc/passwd", stat.S_IFLNK | 0o777)], "symbolic link"),
        ([("bomb.txt", b"0" * 3_000_000)], "decompression bomb"),
        ([("noise.bin", os.urandom(2_500_000)), ("bomb.txt", b"0" * 3_000_000)], "member 'bomb.txt' expands"),
    ],
)
def test_unsafe_zips_are_refused_and_nothing_is_extracted(tmp_path, members, message):
    archive = _zip(tmp_path / "bad.zip", members)
    with pytest.raises(ArchiveError, match=message):
        extract_zip(archive, tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*/*")) and not (tmp_path.parent / "evil.txt").exists()
    records, report = load_dataset(archive, cache_dir=tmp_path / "cache")  # the dataset API reports it instead
    assert records == [] and report.problems[0].field == "archive" and message in report.problems[0].message


def test_zip_larger_than_the_size_cap_is_refused(tmp_path):
    archive = _zip(tmp_path / "big.zip", [("a.txt", "x" * 600), ("b.txt", "y" * 600)])
    with pytest.raises(ArchiveError, match=r"would expand to .*limit"):
        extract_zip(archive, tmp_path / "cache", max_total_bytes=1000)
    assert extract_zip(archive, tmp_path / "cache", max_total_bytes=2000).is_dir()


def test_a_file_that_is_not_a_zip_is_reported(tmp_path):
    (tmp_path / "fake.zip").write_text("not a zip")
    _, report = load_dataset(tmp_path / "fake.zip", cache_dir=tmp_path / "cache")
    assert "not a valid zip file" in report.problems[0].message


def test_check_image_accepts_a_good_image_and_names_each_defect(tmp_path, monkeypatch):
    good = red_png(tmp_path / "good.png", (40, 30))
    assert check_image(good) is None
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello, I am not a picture")
    noisy = Image.effect_noise((64, 64), 50).convert("RGB")
    noisy.save(tmp_path / "full.jpg", quality=90)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert check_image(tmp_path / "missing.png") == "file not found"
    assert check_image(tmp_path / "empty.png") == "empty file (0 bytes)"
    assert "not an image file" in check_image(tmp_path / "text.png")
    assert "truncated" in check_image(tmp_path / "cut.jpg")
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 1000)
    assert "decompression bomb" in check_image(good)  # 1200 pixels > 1000


def test_check_image_turns_pil_bomb_errors_into_a_reason(tmp_path, monkeypatch):
    good = red_png(tmp_path / "good.png", (40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL raises its own DecompressionBombError above 2x
    assert "decompression bomb" in check_image(good)


def test_open_image_gives_rgb_and_names_the_bad_file(tmp_path):
    Image.new("P", (5, 4)).save(tmp_path / "pal.png")
    image = open_image(tmp_path / "pal.png")
    assert image.mode == "RGB" and image.size == (5, 4)
    (tmp_path / "bad.png").write_text("nope")
    with pytest.raises(ImageError, match=r"bad\.png: not an image file"):
        open_image(tmp_path / "bad.png")
