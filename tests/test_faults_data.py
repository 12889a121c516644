"""Fault suite for the dataset readers: malformed files, folders and zips, one table row each.

Every case asserts three things: loading never crashes, never hangs (FIFOs, pipes,
devices), and never loses good data (the good records in the same file still load, exactly); and that each
problem names its file and line, with a hint. Add a case by adding a row to CASES.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import struct
import tempfile
import threading
import warnings
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from apertis_core.cli.main import main
from apertis_core.data import Record, load_dataset, validate_dataset
from apertis_core.data.records import printable
from apertis_core.tokenizer import Tokenizer

from conftest import HANG_GUARD_S

Maker = Callable[[Path], None]  # writes something special at the given path (a FIFO, a link, a zip)


@dataclass(frozen=True)
class Case:
    files: dict[str, bytes | str | Maker]  # path inside the dataset folder -> its content
    problems: tuple[tuple[str, int, str, str], ...]  # (file, line, field, words in the message): all of them
    good: tuple[str, ...] = ()  # the text of every record that must load, in order; nothing else may
    load: str = ""  # what to load, inside the dataset folder ("" = the folder itself)


# ---------------------------------------------------------------------------------------------- content


def png(size=(4, 4)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "red").save(out, "PNG")
    return out.getvalue()


def jpeg() -> bytes:
    out = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(out, "JPEG", quality=90)
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's header) and holds none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def lines(*rows, end: str = "\n") -> str:
    """JSONL text: dicts are dumped, strings written as they are."""
    return end.join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + end


BEFORE, AFTER = {"text": "good before"}, {"text": "good after"}
GOOD2 = ("good before", "good after")
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def around(bad: str | dict, end: str = "\n") -> str:
    """A good record, the bad line, a good record: line 2 is the one at fault."""
    return lines(BEFORE, bad, AFTER, end=end)


def caption(image: str) -> dict:
    return {"image": image, "caption": "a picture"}


# ---------------------------------------------------------------------------------------------- makers


def fifo(path: Path) -> None:
    os.mkfifo(path)


def unix_socket(path: Path) -> None:
    # AF_UNIX paths are limited to ~108 bytes, so bind in a short folder and move the socket file into place.
    with tempfile.TemporaryDirectory(dir="/tmp") as short:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(f"{short}/s")
        os.rename(f"{short}/s", path)


def link_to(target: str) -> Maker:
    return lambda path: path.symlink_to(target)


def outside_file(path: Path) -> None:
    secret = path.parent.parent / "secret.txt"
    secret.write_text("outside the dataset", encoding="utf-8")
    path.symlink_to(secret)


def zip_of(*members, compression=zipfile.ZIP_DEFLATED) -> Maker:
    """A zip of (name, data) or (name, data, unix mode) members."""

    def make(path: Path) -> None:
        with zipfile.ZipFile(path, "w", compression) as zf:
            for name, data, *mode in members:
                info = zipfile.ZipInfo(name)
                info.compress_type = compression
                if mode:
                    info.external_attr = mode[0] << 16
                zf.writestr(info, data)

    return make


def truncated_zip(path: Path) -> None:
    zip_of(("d.jsonl", lines(BEFORE, AFTER) * 50))(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def zip_with_lying_size(path: Path) -> None:
    """A zip whose central directory says its member is smaller than the data it holds."""
    zip_of(("d.jsonl", lines(BEFORE, AFTER) * 50))(path)
    data = bytearray(path.read_bytes())
    central = data.rindex(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 10)  # uncompressed size
    path.write_bytes(bytes(data))


def encrypted_zip(path: Path) -> None:
    """A zip whose member is flagged as encrypted (zipfile cannot write one, so the flag is set by hand)."""
    zip_of(("a.txt", "secret"))(path)
    data = bytearray(path.read_bytes())
    data[6] |= 0x1  # general purpose flags in the local header
    data[data.rindex(b"PK\x01\x02") + 8] |= 0x1  # and in the central directory
    path.write_bytes(bytes(data))


def zip_inside_zip(path: Path) -> None:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("d.jsonl", lines(BEFORE))
    zip_of(("inner.zip", inner.getvalue()), ("d.jsonl", lines(AFTER)))(path)


def duplicate_members(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate this case is about
        zf.writestr("d.jsonl", lines(BEFORE))
        zf.writestr("d.jsonl", lines({"text": "the other one"}))


# ---------------------------------------------------------------------------------------------- cases

OUTSIDE = "is outside the dataset folder"
DEEP = "/".join(["deep"] * 60)

CASES: dict[str, Case] = {
    # ---- JSONL: one bad line between two good ones -------------------------------------------------------
    "jsonl_5000_digit_number": Case(
        {"d.jsonl": around('{"text": "x", "id": ' + "7" * 5000 + "}")}, (("d.jsonl", 2, "json", "5,000 digits"),), GOOD2
    ),
    "jsonl_nul_in_image_path": Case(
        {"d.jsonl": around(caption("cat\x00.png"))}, (("d.jsonl", 2, "image", "contains a NUL byte"),), GOOD2
    ),
    "jsonl_5000_char_image_name": Case(
        {"d.jsonl": around(caption("n" * 5000 + ".png"))}, (("d.jsonl", 2, "image", "File name too long"),), GOOD2
    ),
    "jsonl_cr_only_line_ends": Case(
        {"d.jsonl": lines(BEFORE, {"text": "middle"}, AFTER, end="\r")}, (), ("good before", "middle", "good after")
    ),
    "jsonl_crlf_line_ends": Case({"d.jsonl": lines(BEFORE, AFTER, end="\r\n")}, (), GOOD2),
    "jsonl_mixed_line_ends": Case(
        {"d.jsonl": json.dumps(BEFORE) + "\r\n" + json.dumps({"text": "m"}) + "\r" + json.dumps(AFTER) + "\n"},
        (),
        ("good before", "m", "good after"),
    ),
    "jsonl_cr_only_bad_line_is_numbered": Case(
        {"d.jsonl": around("{oops", end="\r")}, (("d.jsonl", 2, "json", "not valid JSON"),), GOOD2
    ),
    "jsonl_bad_utf8": Case(
        {"d.jsonl": around("X").encode().replace(b"X", b'{"text": "caf\xe9"}')},
        (("d.jsonl", 2, "json", "not valid UTF-8: byte 0xe9"),),
        GOOD2,
    ),
    "jsonl_utf8_bom": Case({"d.jsonl": b"\xef\xbb\xbf" + lines(BEFORE, AFTER).encode()}, (), GOOD2),
    "jsonl_bom_mid_file": Case({"d.jsonl": lines(BEFORE) + "\ufeff" + lines(AFTER)}, (), GOOD2),
    "jsonl_utf16_le_with_bom": Case({"d.jsonl": lines(BEFORE, AFTER).encode("utf-16")}, (), GOOD2),
    "jsonl_utf16_be_with_bom": Case({"d.jsonl": b"\xfe\xff" + lines(BEFORE, AFTER).encode("utf-16-be")}, (), GOOD2),
    "jsonl_utf32_with_bom": Case({"d.jsonl": lines(BEFORE, AFTER).encode("utf-32")}, (), GOOD2),
    "jsonl_utf16_without_bom": Case(
        {"d.jsonl": lines(BEFORE, AFTER).encode("utf-16-le")}, (("d.jsonl", 0, "file", "not a text file"),)
    ),
    "jsonl_utf16_bom_but_broken": Case(
        {"d.jsonl": b"\xff\xfe" + "ok".encode("utf-16-le") + b"\x00\xd8"},
        (("d.jsonl", 0, "file", "byte order mark but is not UTF-16"),),
    ),
    "jsonl_empty_file": Case({"d.jsonl": b""}, (("d.jsonl", 0, "file", "holds no records"),)),
    "jsonl_only_blank_lines": Case({"d.jsonl": "\n \n\t\r\n"}, (("d.jsonl", 0, "file", "holds no records"),)),
    "jsonl_blank_lines_between": Case({"d.jsonl": lines(BEFORE, "", "   ", AFTER)}, (), GOOD2),
    "jsonl_huge_line": Case(
        {"d.jsonl": lines(BEFORE, {"text": "x" * 3_000_000}, AFTER)}, (), ("good before", "x" * 3_000_000, "good after")
    ),
    "jsonl_huge_bad_line": Case(
        {"d.jsonl": around('{"text": "' + "x" * 3_000_000)}, (("d.jsonl", 2, "json", "not valid JSON"),), GOOD2
    ),
    "jsonl_not_json": Case({"d.jsonl": around("hello there")}, (("d.jsonl", 2, "json", "not valid JSON"),), GOOD2),
    "jsonl_truncated_last_line": Case(
        {"d.jsonl": lines(BEFORE, AFTER) + '{"text": "cut of'}, (("d.jsonl", 3, "json", "not valid JSON"),), GOOD2
    ),
    "jsonl_array_line": Case({"d.jsonl": around('["text", "x"]')}, (("d.jsonl", 2, "json", "got a list"),), GOOD2),
    "jsonl_number_line": Case({"d.jsonl": around("42")}, (("d.jsonl", 2, "json", "got a number"),), GOOD2),
    "jsonl_null_line": Case({"d.jsonl": around("null")}, (("d.jsonl", 2, "json", "got null"),), GOOD2),
    "jsonl_text_is_number": Case({"d.jsonl": around({"text": 3.5})}, (("d.jsonl", 2, "text", "got a number"),), GOOD2),
    "jsonl_text_is_list": Case({"d.jsonl": around({"text": ["a"]})}, (("d.jsonl", 2, "text", "got a list"),), GOOD2),
    "jsonl_text_is_object": Case(
        {"d.jsonl": around({"text": {"a": 1}})}, (("d.jsonl", 2, "text", "got an object"),), GOOD2
    ),
    "jsonl_text_is_bool": Case({"d.jsonl": around({"text": True})}, (("d.jsonl", 2, "text", "got true/false"),), GOOD2),
    "jsonl_text_is_empty": Case({"d.jsonl": around({"text": " \n "})}, (("d.jsonl", 2, "text", "is empty"),), GOOD2),
    "jsonl_missing_field": Case({"d.jsonl": around({"body": "x"})}, (("d.jsonl", 2, "text", "no 'text'"),), GOOD2),
    "jsonl_duplicate_keys": Case(
        {"d.jsonl": around('{"text": "a", "text": "b"}')}, (("d.jsonl", 2, "text", "appears twice"),), GOOD2
    ),
    "jsonl_nested_too_deep": Case(
        {"d.jsonl": around('{"text": "x", "n": ' + "[" * 100_000 + "]" * 100_000 + "}")},
        (("d.jsonl", 2, "json", "nested too deeply"),),
        GOOD2,
    ),
    "jsonl_lone_surrogate_escape": Case(
        {"d.jsonl": around('{"text": "a\\ud800b"}')}, (("d.jsonl", 2, "text", "unpaired surrogate"),), GOOD2
    ),
    "jsonl_raw_nul_byte": Case(
        {"d.jsonl": around('{"text": "a"}\x00')}, (("d.jsonl", 2, "json", "NUL byte (0x00) at column 14"),), GOOD2
    ),
    "jsonl_escaped_nul_is_text": Case({"d.jsonl": lines({"text": "a\u0000b"})}, (), ("a\x00b",)),
    "jsonl_nan_infinity_and_extra_fields": Case(
        {
            "d.jsonl": lines(
                {"text": "ok", "score": float("nan"), "big": 1e308}, '{"text": "ok2", "x": Infinity, "y": 1e999}'
            )
        },
        (),
        ("ok", "ok2"),
    ),
    "jsonl_messages_not_a_list": Case(
        {"d.jsonl": around({"messages": "hi"})}, (("d.jsonl", 2, "messages", "expected a list"),), GOOD2
    ),
    "jsonl_messages_empty": Case(
        {"d.jsonl": around({"messages": []})}, (("d.jsonl", 2, "messages", "an empty list"),), GOOD2
    ),
    "jsonl_message_not_object": Case(
        {"d.jsonl": around({"messages": ["hi", CHAT[1]]})},
        (("d.jsonl", 2, "messages[0]", "expected an object"),),
        GOOD2,
    ),
    "jsonl_unknown_role": Case(
        {"d.jsonl": around({"messages": [{"role": "robot", "content": "x"}, CHAT[1]]})},
        (("d.jsonl", 2, "messages[0].role", "not a known role"),),
        GOOD2,
    ),
    "jsonl_content_number": Case(
        {"d.jsonl": around({"messages": [{"role": "user", "content": 5}, CHAT[1]]})},
        (("d.jsonl", 2, "messages[0].content", "got a number"),),
        GOOD2,
    ),
    "jsonl_no_assistant_turn": Case(
        {"d.jsonl": around({"messages": CHAT[:1]})}, (("d.jsonl", 2, "messages", "no assistant turn"),), GOOD2
    ),
    # ---- images a record refers to -----------------------------------------------------------------------
    "image_missing": Case(
        {"d.jsonl": around(caption("nope.png"))}, (("d.jsonl", 2, "image", "image not found"),), GOOD2
    ),
    "image_not_an_image": Case(
        {"d.jsonl": around(caption("x.png")), "x.png": "I am text"},
        (("d.jsonl", 2, "image", "not an image file"),),
        GOOD2,
        "d.jsonl",
    ),
    "image_empty": Case(
        {"d.jsonl": around(caption("x.png")), "x.png": b""}, (("d.jsonl", 2, "image", "empty file"),), GOOD2, "d.jsonl"
    ),
    "image_truncated_png": Case(
        {"d.jsonl": around(caption("x.png")), "x.png": png((64, 64))[:60]},
        (("d.jsonl", 2, "image", "truncated"),),
        GOOD2,
        "d.jsonl",
    ),
    "image_truncated_jpeg": Case(
        {"d.jsonl": around(caption("x.jpg")), "x.jpg": jpeg()[:900]},
        (("d.jsonl", 2, "image", "truncated"),),
        GOOD2,
        "d.jsonl",
    ),
    "image_decompression_bomb": Case(
        {"d.jsonl": around(caption("x.png")), "x.png": png_claiming(100_000, 100_000)},
        (("d.jsonl", 2, "image", "decompression bomb"),),
        GOOD2,
        "d.jsonl",
    ),
    "image_other_format_renamed": Case(
        {"d.jsonl": around(caption("x.png")), "x.png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"},
        (("d.jsonl", 2, "image", "not an image file"),),
        GOOD2,
        "d.jsonl",
    ),
    "image_outside_folder": Case({"d.jsonl": around(caption("../x.png"))}, (("d.jsonl", 2, "image", OUTSIDE),), GOOD2),
    "image_absolute_path": Case(
        {"d.jsonl": around(caption("/etc/passwd"))}, (("d.jsonl", 2, "image", OUTSIDE),), GOOD2
    ),
    "image_link_to_outside": Case(
        {"d.jsonl": around(caption("x.png")), "x.png": link_to("/etc/hostname")},
        (("d.jsonl", 2, "image", OUTSIDE),),
        GOOD2,
        "d.jsonl",
    ),
    "image_is_a_folder": Case(
        {"d.jsonl": around(caption("pics")), "pics/a.txt": "a caption-less note"},
        (("d.jsonl", 2, "image", "not a regular file"),),
        ("good before", "good after", "a caption-less note"),
    ),
    "image_is_a_fifo": Case(
        {"d.jsonl": around(caption("x.png")), "x.png": fifo},
        (("d.jsonl", 2, "image", "not a regular file"),),
        GOOD2,
        "d.jsonl",
    ),
    "image_list_empty": Case(
        {"d.jsonl": around({"image": [], "caption": "c"})}, (("d.jsonl", 2, "image", "expected a file path"),), GOOD2
    ),
    "image_list_with_number": Case(
        {"d.jsonl": around({"image": ["x.png", 3], "caption": "c"}), "x.png": png()},
        (("d.jsonl", 2, "image", "expected a file path"),),
        GOOD2,
        "d.jsonl",
    ),
    "image_placeholder_mismatch": Case(
        {"d.jsonl": around({"image": "x.png", "caption": "<image> <image>"}), "x.png": png()},
        (("d.jsonl", 2, "caption", "2 <image> placeholders for 1 images"),),
        GOOD2,
        "d.jsonl",
    ),
    "image_path_through_a_file": Case(
        {"d.jsonl": around(caption("x.png/y.png")), "x.png": png()},
        (("d.jsonl", 2, "image", "Not a directory"),),
        GOOD2,
        "d.jsonl",
    ),
    # ---- CSV ----------------------------------------------------------------------------------------------
    "csv_unclosed_quote_to_end": Case(
        {"d.csv": 'text,n\ngood before,1\n"unclosed,2\ngood after,3\nlast,4\n'},
        (("d.csv", 3, "row", "never closed"),),
        ("good before", "good after", "last"),
    ),
    "csv_unclosed_quote_closed_later": Case(
        {"d.csv": 'text,n\n"oops,1\ngood,2\n"quoted",3\nlast,4\n'},
        (("d.csv", 2, "row", "bad quoting on line 4"),),
        ("good", "quoted", "last"),
    ),
    "csv_runaway_quote_closing_at_line_end": Case(
        {"d.csv": 'text,n\n"oops,1\ngood,2"\nlast,3\n'},
        (("d.csv", 2, "row", "probably an unclosed quote"),),
        ("good", "last"),
    ),
    "csv_text_after_closing_quote": Case(
        {"d.csv": 'text,n\nfirst,1\n"He said "hi" twice",2\nlast,3\n'},
        (("d.csv", 3, "row", "bad quoting"),),
        ("first", "last"),
    ),
    "csv_quote_inside_unquoted_value": Case({"d.csv": 'text,n\nsix" tall,1\n'}, (), ('six" tall',)),
    "csv_valid_multiline_cell": Case(
        {"d.csv": 'text,n\n"two\nlines, with a comma",1\nlast,2\n'}, (), ("two\nlines, with a comma", "last")
    ),
    "csv_200k_character_cell": Case(
        {"d.csv": "text,n\n" + '"' + "y" * 200_000 + '",1\nlast,2\n'}, (), ("y" * 200_000, "last")
    ),
    "csv_nul_byte": Case(
        {"d.csv": "text,n\nfirst,1\nnul\x00here,2\nlast,3\n"},
        (("d.csv", 3, "text", "NUL byte (0x00) at column 4"),),
        ("first", "last"),
    ),
    "csv_bad_utf8_cell": Case(
        {"d.csv": b"text,n\nfirst,1\ncaf\xe9,2\nlast,3\n"},
        (("d.csv", 3, "text", "not valid UTF-8"),),
        ("first", "last"),
    ),
    "csv_cr_only_line_ends": Case({"d.csv": 'text,n\rfirst,1\r"a\rb",2\rlast,3\r'}, (), ("first", "a\rb", "last")),
    "csv_crlf_line_ends": Case({"d.csv": "text,n\r\nfirst,1\r\nlast,2\r\n"}, (), ("first", "last")),
    "csv_utf8_bom": Case({"d.csv": b"\xef\xbb\xbftext,n\nfirst,1\n"}, (), ("first",)),
    "csv_utf16_with_bom": Case({"d.csv": "text,n\nfirst,1\n".encode("utf-16")}, (), ("first",)),
    "csv_too_many_values": Case(
        {"d.csv": "text,n\nfirst,1\nx,2,3\nlast,3\n"}, (("d.csv", 3, "row", "has 3 values"),), ("first", "last")
    ),
    "csv_too_few_values": Case(
        {"d.csv": "text,n\nfirst,1\nx\nlast,3\n"}, (("d.csv", 3, "row", "has 1 values"),), ("first", "last")
    ),
    "csv_semicolons": Case(
        {"d.csv": "text;n\nfirst;1\n"}, (("d.csv", 1, "header", "no 'text' column (found: text;n)"),)
    ),
    "csv_empty_file": Case({"d.csv": ""}, (("d.csv", 1, "header", "the file is empty"),)),
    "csv_header_only": Case({"d.csv": "text,image\n"}, (("d.csv", 0, "file", "holds no records"),)),
    "csv_blank_lines_before_header": Case({"d.csv": "\n\ntext\nfirst\n"}, (), ("first",)),
    "csv_unclosed_quote_in_header": Case({"d.csv": '"text,n\nfirst,1\n'}, (("d.csv", 1, "header", "never closed"),)),
    "csv_empty_text_cell": Case({"d.csv": "text,n\nfirst,1\n ,2\n"}, (("d.csv", 3, "text", "is empty"),), ("first",)),
    "csv_missing_image": Case(
        {"d.csv": "text,image\nfirst,\nsecond,nope.png\n"}, (("d.csv", 3, "image", "image not found"),), ("first",)
    ),
    # ---- plain text -----------------------------------------------------------------------------------------
    "txt_bad_utf8_line": Case(
        {"t.txt": b"one\ntw\xffo\nthree\n"}, (("t.txt", 2, "text", "byte 0xff"),), ("one\nthree\n",)
    ),
    "txt_nul_line": Case({"t.txt": "one\ntw\x00o\nthree\n"}, (("t.txt", 2, "text", "NUL byte"),), ("one\nthree\n",)),
    "txt_cr_only_line_ends": Case({"t.txt": "one\rtwo\r"}, (), ("one\ntwo\n",)),
    "txt_crlf_bad_line_is_numbered": Case(
        {"t.txt": b"one\r\ntw\xffo\r\nthree\r\n"}, (("t.txt", 2, "text", "byte 0xff"),), ("one\nthree\n",)
    ),
    "txt_empty": Case({"t.txt": ""}, (("t.txt", 0, "text", "is empty"),)),
    "txt_binary_png_renamed": Case({"t.txt": png((32, 32))}, (("t.txt", 0, "file", "not a text file"),)),
    "txt_utf16_with_bom": Case({"t.txt": "héllo\n".encode("utf-16")}, (), ("héllo\n",)),
    # ---- folders ----------------------------------------------------------------------------------------------
    "folder_fifo": Case(
        {"a.txt": "fine", "pipe.txt": fifo}, (("pipe.txt", 0, "file", "named pipe (FIFO)"),), ("fine",)
    ),
    "folder_fifo_named_jsonl_in_subfolder": Case(
        {"a.txt": "fine", "sub/pipe.jsonl": fifo}, (("sub/pipe.jsonl", 0, "file", "named pipe"),), ("fine",)
    ),
    "folder_fifo_as_caption": Case(
        {"a.txt": "fine", "cat.png": png(), "cat.txt": fifo},
        (("cat.png", 0, "caption", "no caption file"), ("cat.txt", 0, "file", "named pipe")),
        ("fine",),
    ),
    "folder_socket": Case({"a.txt": "fine", "s.sock": unix_socket}, (("s.sock", 0, "file", "a socket"),), ("fine",)),
    "folder_device_link": Case(
        {"a.txt": "fine", "null.txt": link_to("/dev/null")}, (("null.txt", 0, "file", "character device"),), ("fine",)
    ),
    "folder_broken_link": Case(
        {"a.txt": "fine", "b.txt": link_to("missing.txt")}, (("b.txt", 0, "file", "cannot read"),), ("fine",)
    ),
    "folder_link_loop": Case(
        {"a.txt": "fine", "l.txt": link_to("l.txt")}, (("l.txt", 0, "file", "cannot read"),), ("fine",)
    ),
    "folder_link_to_outside": Case(
        {"a.txt": "fine", "b.txt": outside_file}, (("b.txt", 0, "file", "outside the dataset folder"),), ("fine",)
    ),
    "folder_deep": Case({f"{DEEP}/d.txt": "deep down", "a.txt": "fine"}, (), ("fine", "deep down")),
    "folder_odd_names": Case(
        {"a b ü 🎉.txt": "spaces", "new\nline.txt": "newline", "caf\udce9.txt": "latin-1 name", "-rf.txt": "dash"},
        (),
        ("dash", "spaces", "latin-1 name", "newline"),
    ),
    "folder_odd_name_with_bad_record": Case(
        {"caf\udce9.jsonl": around("{")}, (("caf\udce9.jsonl", 2, "json", "not valid JSON"),), GOOD2
    ),
    "folder_nested_zip": Case(
        {"a.txt": "fine", "more.zip": zip_of(("b.txt", "inside"))},
        (("more.zip", 0, "file", "unsupported file type '.zip'"),),
        ("fine",),
    ),
    "folder_stray_json": Case(
        {"a.txt": "fine", "d.json": "{}"}, (("d.json", 0, "file", "unsupported file type '.json'"),), ("fine",)
    ),
    "folder_image_without_caption": Case(
        {"a.txt": "fine", "x.png": png()}, (("x.png", 0, "caption", "no caption file"),), ("fine",)
    ),
    "folder_caption_for_truncated_image": Case(
        {"a.txt": "fine", "x.png": png((64, 64))[:60], "x.txt": "a cat"},
        (("x.txt", 1, "image", "truncated"),),
        ("fine",),
    ),
    "folder_empty_caption": Case(
        {"a.txt": "fine", "x.png": png(), "x.txt": "  "}, (("x.txt", 1, "caption", "is empty"),), ("fine",)
    ),
    "folder_folder_named_like_a_file": Case({"a.txt/b.txt": "inside"}, (), ("inside",)),
    # ---- zips ----------------------------------------------------------------------------------------------------
    "zip_good_with_one_bad_record": Case(
        {"data.zip": zip_of(("d.jsonl", around("{")))},
        (("data.zip/d.jsonl", 2, "json", "not valid JSON"),),
        GOOD2,
        "data.zip",
    ),
    "zip_slip": Case(
        {"data.zip": zip_of(("ok.txt", "x"), ("../../evil.txt", "x"))},
        (("data.zip", 0, "archive", "zip-slip"),),
        (),
        "data.zip",
    ),
    "zip_slip_backslashes": Case(
        {"data.zip": zip_of(("..\\evil.txt", "x"))}, (("data.zip", 0, "archive", "zip-slip"),), (), "data.zip"
    ),
    "zip_absolute_path": Case(
        {"data.zip": zip_of(("/etc/evil.txt", "x"))}, (("data.zip", 0, "archive", "absolute path"),), (), "data.zip"
    ),
    "zip_symlink": Case(
        {"data.zip": zip_of(("l.txt", "/etc/passwd", stat.S_IFLNK | 0o777))},
        (("data.zip", 0, "archive", "symbolic link"),),
        (),
        "data.zip",
    ),
    "zip_device_entry": Case(
        {"data.zip": zip_of(("dev.txt", "", stat.S_IFCHR | 0o644))},
        (("data.zip", 0, "archive", "device, FIFO or socket"),),
        (),
        "data.zip",
    ),
    "zip_bomb_one_member": Case(
        {"data.zip": zip_of(("bomb.txt", b"0" * 3_000_000))},
        (("data.zip", 0, "archive", "decompression bomb"),),
        (),
        "data.zip",
    ),
    "zip_bomb_by_overall_ratio": Case(
        {"data.zip": zip_of(*[(f"{i}.txt", b"0" * 900_000) for i in range(4)])},
        (("data.zip", 0, "archive", "overall"),),
        (),
        "data.zip",
    ),
    "zip_duplicate_members": Case(
        {"data.zip": duplicate_members}, (("data.zip", 0, "archive", "appears twice"),), (), "data.zip"
    ),
    "zip_encrypted_flag": Case({"data.zip": encrypted_zip}, (("data.zip", 0, "archive", "encrypted"),), (), "data.zip"),
    "zip_not_a_zip": Case(
        {"data.zip": "just text"}, (("data.zip", 0, "archive", "not a valid zip file"),), (), "data.zip"
    ),
    "zip_truncated": Case(
        {"data.zip": truncated_zip}, (("data.zip", 0, "archive", "not a valid zip file"),), (), "data.zip"
    ),
    "zip_header_lies_about_size": Case(
        {"data.zip": zip_with_lying_size}, (("data.zip", 0, "archive", "not a valid zip file"),), (), "data.zip"
    ),
    "zip_member_name_too_long": Case(
        {"data.zip": zip_of(("n" * 300 + ".txt", "x"))},
        (("data.zip", 0, "archive", "File name too long"),),
        (),
        "data.zip",
    ),
    "zip_inside_zip": Case(
        {"data.zip": zip_inside_zip},
        (("data.zip/inner.zip", 0, "file", "unsupported file type '.zip'"),),
        ("good after",),
        "data.zip",
    ),
    "zip_that_is_a_fifo": Case({"data.zip": fifo}, (("data.zip", 0, "archive", "not a regular file"),), (), "data.zip"),
    "zip_stored_with_bzip2": Case(
        {"data.zip": zip_of(("d.jsonl", lines(BEFORE, AFTER)), compression=zipfile.ZIP_BZIP2)}, (), GOOD2, "data.zip"
    ),
    # ---- the path given ------------------------------------------------------------------------------------------
    "path_is_a_fifo": Case({"pipe.jsonl": fifo}, (("pipe.jsonl", 0, "file", "named pipe"),), (), "pipe.jsonl"),
    "path_missing": Case({}, (("nope.jsonl", 0, "path", "no such file"),), (), "nope.jsonl"),
    "path_name_too_long": Case(
        {}, (("n" * 300 + ".jsonl", 0, "path", "File name too long"),), (), "n" * 300 + ".jsonl"
    ),
}


# ---------------------------------------------------------------------------------------------- the test


def build(folder: Path, files: dict) -> None:
    folder.mkdir(parents=True)
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_bytes(content.encode("utf-8"))
        else:
            content(path)


def finishes(fn):
    """fn(), failing the test instead of hanging it when fn blocks (as reading a FIFO would)."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed to the test thread below
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG_GUARD_S)
    assert not thread.is_alive(), "loading the dataset hung"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def text_of(record: Record) -> str:
    return "\n".join(record.texts())


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_input_is_reported_where_it_is_and_good_records_survive(tmp_path, name):
    case = CASES[name]
    folder = tmp_path / "ds"
    build(folder, case.files)
    target = folder / case.load if case.load else folder
    records, report = finishes(lambda: load_dataset(target, cache_dir=tmp_path / "cache"))  # never raises

    assert [text_of(r) for r in records] == list(case.good), "good records were lost (or junk was kept)"
    got = [(p.file, p.line, p.field, p.message) for p in report.problems]
    assert len(got) == len(case.problems), report.to_text()
    for file, line, field, words in case.problems:
        where = (printable(f"{folder}/{file}"), line, field)
        assert any((f, n, fd) == where and words in message for f, n, fd, message in got), (where, words, got)
    for problem in report.problems:
        assert problem.hint and str(problem).startswith(f"{problem.file}:{problem.line}: {problem.field}: ")
    report.to_text().encode("utf-8")  # printable: no lone surrogates from odd names or bytes
    counted = finishes(lambda: validate_dataset(target, Tokenizer.byte_level(), cache_dir=tmp_path / "cache"))
    assert counted.records == len(case.good) and counted.problems == report.problems


def test_the_table_has_the_named_hard_cases():
    assert len(CASES) >= 80
    named_cases = ["jsonl_5000_digit_number", "jsonl_nul_in_image_path", "jsonl_5000_char_image_name", "folder_fifo"]
    named_cases += ["csv_unclosed_quote_to_end", "csv_200k_character_cell", "csv_nul_byte", "jsonl_cr_only_line_ends"]
    assert set(named_cases) <= set(CASES)


def test_data_validate_on_a_folder_with_a_fifo_finishes_and_names_it(tmp_path, capsys):
    build(tmp_path / "ds", {"a.jsonl": lines(BEFORE, AFTER), "pipe.jsonl": fifo})
    code = finishes(lambda: main(["data", "validate", str(tmp_path / "ds")]))
    out = capsys.readouterr().out
    assert code == 1  # some parts skipped, good records usable
    assert f"{tmp_path}/ds/pipe.jsonl:0: file: is a named pipe (FIFO), not a regular file (skipped)" in out
    assert "records: 2" in out


# ---------------------------------------------------------------------------------------------- the tally


def tally(hang_guard_s: float) -> dict[str, list[str]]:
    """The count over CASES: which cases crash, lose good records, hang, or miss a problem's place."""
    outcome: dict[str, list[str]] = {"crashes": [], "lose good data": [], "hangs": [], "unclear": []}
    for name, case in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "ds"
            build(folder, case.files)
            target = folder / case.load if case.load else folder
            result: dict = {}
            thread = threading.Thread(target=_load_into, args=(result, target, Path(tmp) / "cache"), daemon=True)
            thread.start()
            thread.join(hang_guard_s)
            if thread.is_alive():
                outcome["hangs"].append(name)
                continue
            if "error" in result:
                outcome["crashes"].append(f"{name}: {type(result['error']).__name__}: {result['error']}"[:200])
                continue
            records, report = result["value"]
            texts = [text_of(r) for r in records]
            if any(texts.count(g) < case.good.count(g) for g in case.good):
                outcome["lose good data"].append(name)
            found = {(p.file, p.line, p.field): p.message for p in report.problems}
            for file, line, field, words in case.problems:
                if words not in found.get((printable(f"{folder}/{file}"), line, field), ""):
                    outcome["unclear"].append(name)
                    break
    return outcome


def _load_into(result: dict, target: Path, cache: Path) -> None:
    try:
        result["value"] = load_dataset(target, cache_dir=cache)
    except BaseException as exc:  # counted as a crash by tally()
        result["error"] = exc


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Count the malformed-input outcomes over the fault table.")
    parser.add_argument("--hang-guard", type=float, default=30, help="seconds before a case counts as hung")
    counts = tally(parser.parse_args().hang_guard)
    print(
        f"malformed inputs: crashes / aborts that lose good data / hangs = {len(counts['crashes'])} / "
        f"{len(counts['lose good data'])} / {len(counts['hangs'])} of {len(CASES)}; "
        f"problems not naming their file:line and field = {len(counts['unclear'])}"
    )
    for kind, names in counts.items():
        for name in names:
            print(f"  {kind}: {name}")
