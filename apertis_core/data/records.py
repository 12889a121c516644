"""The unit of data (Record), the unit of complaint (Problem), and the checks every format shares."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..tokenizer import IMAGE_TOKEN, ROLES

# (kind, has images) -> the name shown to people: the stored kind says how a record is encoded, which
# lumps a captioned image in with plain text; people think of the layout they wrote.
KIND_LABELS = {
    ("text", False): "text",
    ("text", True): "image+caption",
    ("chat", False): "chat",
    ("chat", True): "image chat",
}


@dataclass
class Record:
    """One training example after parsing: plain text (maybe with images, as in captions) or a chat."""

    kind: Literal["text", "chat"]
    text: str | None  # kind "text": the document (captions start with <image> placeholders)
    messages: list[dict] | None  # kind "chat": [{"role": ..., "content": ...}], checked
    images: list[Path] = field(default_factory=list)  # files on disk, in <image> placeholder order
    source: str = ""  # file the record came from, as shown to the user
    line: int = 0  # 1-based line in `source` (0 = the whole file)

    @property
    def kind_label(self) -> str:
        """What the record is, as reports and previews name it: text, chat, image+caption or image chat."""
        return KIND_LABELS[self.kind, bool(self.images)]

    def texts(self) -> list[str]:
        """The human-written strings in this record (no template, no placeholders)."""
        parts = [self.text] if self.kind == "text" else [m["content"] for m in self.messages]
        return [_PLACEHOLDER.sub("", p) for p in parts]

    @property
    def characters(self) -> int:
        return sum(len(t) for t in self.texts())


@dataclass(frozen=True)
class Problem:
    """Something wrong in the input; each one dropped a record (or, with line 0, a file or a line range)."""

    file: str
    line: int  # 1-based; 0 means the whole file
    field: str  # the JSON key, CSV column or other part at fault ("messages[1].role", "image", "archive")
    message: str  # what is wrong
    hint: str  # what to do about it

    def __post_init__(self):
        # Every part may quote the input (a file name with undecodable bytes, a control character, an
        # exception's text); a Problem must print on any console, so each part is made printable once, here.
        for name in ("file", "field", "message", "hint"):
            object.__setattr__(self, name, printable(getattr(self, name)))

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message} — {self.hint}"


class RecordError(ValueError):
    """Raised by the field checks; the reader adds file and line and turns it into a Problem."""

    def __init__(self, field: str, message: str, hint: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.hint = field, message, hint

    def at(self, file: str, line: int) -> Problem:
        return Problem(file, line, self.field, self.message, self.hint)


_PLACEHOLDER = re.compile(re.escape(IMAGE_TOKEN) + "\n?")  # as with_placeholders writes it
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by errors="surrogateescape"
UTF8_HINT = "re-save the file as UTF-8 (in most editors: Save As → Encoding: UTF-8)"
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")
_MAX_SHOWN = 80  # characters of a quoted value in a message: a 5,000-character name must not flood the report


def printable(text: str) -> str:
    """`text` with control characters, lone surrogates and undecodable bytes written as escapes (\\n, \\x00,
    \\ud800, \\xff), so it prints on one line on any console."""
    return _UNPRINTABLE.sub(_escape, text)


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape: show the byte
        return f"\\x{code - 0xDC00:02x}"
    return match.group().encode("unicode_escape").decode("ascii")


def shown(value: str) -> str:
    """`value` quoted for a message, shortened in the middle when long."""
    if len(value) <= _MAX_SHOWN:
        return repr(value)
    return f"{value[:50]!r}…{value[-20:]!r} ({len(value):,} characters)"


def encoding_error(text: str, field: str) -> RecordError | None:
    """A RecordError naming the first non-UTF-8 byte in `text` (decoded with surrogateescape), or None."""
    bad = _UNDECODABLE.search(text)
    if bad is None:
        return None
    byte = ord(bad.group()) - 0xDC00
    return RecordError(field, f"not valid UTF-8: byte 0x{byte:02x} at column {bad.start() + 1}", UTF8_HINT)


def raw_text_error(text: str, field: str) -> RecordError | None:
    """encoding_error, or a RecordError naming the first NUL byte: raw text from a file never holds one
    unless the file is binary or UTF-16, so it is reported rather than trained on."""
    bad = encoding_error(text, field)
    if bad is None and "\x00" in text:
        column = text.index("\x00") + 1
        bad = RecordError(field, f"contains a NUL byte (0x00) at column {column}", f"remove it; {UTF8_HINT}")
    return bad


def unexpected_error(exc: Exception, field: str = "record") -> RecordError:
    """A RecordError for an exception no check foresaw, so that one odd record costs only itself."""
    detail = printable(str(exc))
    if len(detail) > 200:
        detail = detail[:200] + "…"
    return RecordError(
        field,
        f"could not be read ({type(exc).__name__}: {detail})",
        "fix or remove this record; the rest of the file was read",
    )


def check_text(value, field: str, example: str = '"text": "Once upon a time..."') -> str:
    """`value` must be a non-empty string of valid Unicode; returns it."""
    if not isinstance(value, str):
        raise RecordError(field, f"expected text, got {type_name(value)}", f"write it as a string, e.g. {example}")
    if not value.strip():
        raise RecordError(field, "is empty", "remove the record or give it some text")
    problem = encoding_error(value, field)
    if problem is None and not _is_valid_unicode(value):
        problem = RecordError(field, "contains an unpaired surrogate escape (\\udXXX)", "fix the text's escapes")
    if problem is not None:
        raise problem
    return value


def check_messages(value) -> list[dict]:
    """A non-empty list of {role, content} with at least one assistant turn; returns clean copies."""
    one = '{"role": "user", "content": "Hi"}'
    example = f'[{one}, {{"role": "assistant", "content": "Hello!"}}]'
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type_name(value)
        raise RecordError("messages", f"expected a list of messages, got {got}", f'write e.g. "messages": {example}')
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RecordError(where, f"expected an object, got {type_name(message)}", f"each message looks like {one}")
        role = message.get("role")
        if role not in ROLES:
            said = "is missing" if role is None else f"{role!r} is not a known role"
            raise RecordError(f"{where}.role", said, f"use one of {', '.join(ROLES)}")
        content = check_text(message.get("content"), f"{where}.content", '"content": "Hello!"')
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError(
            "messages", "has no assistant turn, so there is nothing to learn", "add the reply the model should give"
        )
    return messages


def with_placeholders(text: str, n_images: int, field: str) -> str:
    """Ensure `text` holds one <image> per image: prepend them when there are none, else they must match."""
    found = text.count(IMAGE_TOKEN)
    if found == 0:
        return f"{IMAGE_TOKEN}\n" * n_images + text
    if found != n_images:
        raise RecordError(
            field,
            f"has {found} {IMAGE_TOKEN} placeholders for {n_images} images",
            f"write one {IMAGE_TOKEN} per image, or none to put them all at the start",
        )
    return text


def without_placeholders(text: str, field: str) -> str:
    """`text` of a record with no image, which must not hold <image>: the model would fill that position
    with an image that is not there, and training would stop."""
    if IMAGE_TOKEN in text:
        raise RecordError(
            field,
            f"holds {IMAGE_TOKEN} but the record has no image",
            f'remove {IMAGE_TOKEN} from the text, or give the record an "image"',
        )
    return text


def messages_without_placeholders(messages: list[dict]) -> list[dict]:
    for i, message in enumerate(messages):
        without_placeholders(message["content"], f"messages[{i}].content")
    return messages


def vqa_messages(messages: list[dict], n_images: int) -> list[dict]:
    """Visual Q&A: the images' placeholders go in the user turns (the first one when none is marked)."""
    for i, message in enumerate(messages):
        if message["role"] != "user" and IMAGE_TOKEN in message["content"]:
            raise RecordError(
                f"messages[{i}].content",
                f"a {message['role']} turn holds {IMAGE_TOKEN}",
                f"only user turns show images; remove {IMAGE_TOKEN} from it",
            )
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise RecordError(
            "messages", "has an image but no user turn to show it in", "add a user message asking about the image"
        )
    found = sum(messages[i]["content"].count(IMAGE_TOKEN) for i in users)
    if found == 0:
        first = users[0]
        messages[first] = {**messages[first], "content": with_placeholders(messages[first]["content"], n_images, "")}
    elif found != n_images:
        raise RecordError(
            "messages",
            f"has {found} {IMAGE_TOKEN} placeholders for {n_images} images",
            f"write one {IMAGE_TOKEN} per image in the user turns, or none",
        )
    return messages


def corpus_texts(records: Iterable[Record]) -> Iterator[str]:
    """The text to train a tokenizer on: every document and message, without placeholders or template."""
    for record in records:
        yield from record.texts()


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def type_name(value) -> str:
    names = {dict: "an object", list: "a list", str: "text", bool: "true/false", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)
