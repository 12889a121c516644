"""Byte-level BPE tokenizer (HF `tokenizers`) with Apertis special tokens, chat template and streaming decode.

Any string encodes (unknown characters fall back to their UTF-8 bytes), and `decode(encode(s)) == s`.
Special-token strings typed by a user stay plain text, except the `<image>` placeholder that marks where
image embeddings go. The file format is HF's `tokenizer.json`, so other tools can read it too.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from .configio import ConfigError
from .fileio import atomic_write_text

IMAGE_TOKEN = "<image>"
IMAGE_LINE = IMAGE_TOKEN + "\n"  # an image as the data formats and chat prompts place it: its own line before the text
# Order fixes the ids 0..5 in every tokenizer this module makes, so special ids never depend on the corpus.
SPECIAL_TOKENS = ("<|eot|>", "<|pad|>", IMAGE_TOKEN, "<|system|>", "<|user|>", "<|assistant|>")
ROLES = ("system", "user", "assistant")


@lru_cache(maxsize=1)
def _byte_to_char() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as HF's ByteLevel pre-tokenizer uses."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _new_backend(model):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, pre_tokenizers

    backend = HFTokenizer(model)
    # add_prefix_space=False keeps decode(encode(s)) == s exactly; no normalizer for the same reason
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


def _special_added_tokens():
    from tokenizers import AddedToken

    return [AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS]


class Tokenizer:
    """Wraps a HF `tokenizers.Tokenizer`; build one with `train`, `load` or `from_json_str`."""

    def __init__(self, backend, source: str = "tokenizer"):
        ids = [backend.token_to_id(s) for s in SPECIAL_TOKENS]
        missing = [s for s, i in zip(SPECIAL_TOKENS, ids, strict=True) if i is None]
        if missing:
            raise ConfigError(
                f"{source}: not an Apertis tokenizer: special tokens {', '.join(missing)} are missing. "
                "Train a new one (leave data.tokenizer empty) or point data.tokenizer at a bundle's tokenizer.json."
            )
        # User text must never turn into control tokens; <image> is split out by `encode` itself.
        backend.encode_special_tokens = True
        self._backend = backend
        self.eot_id, self.pad_id, self.image_id, self.system_id, self.user_id, self.assistant_id = ids
        self.special_ids = frozenset(ids)
        self._token_bytes = self._build_token_bytes()

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096) -> Tokenizer:
        """Learn BPE merges on `texts`. With vocab_size <= 256 + specials every byte stays one token."""
        from tokenizers import models, trainers

        if vocab_size <= 256 + len(SPECIAL_TOKENS):
            return cls.byte_level()
        backend = _new_backend(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=_special_added_tokens(),
            initial_alphabet=sorted(_byte_to_char().values()),  # every byte encodable, even if unseen
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend)

    @classmethod
    def byte_level(cls) -> Tokenizer:
        """No merges: ids 0..5 are the specials, id 6 + b is byte b (so ASCII text is character-level)."""
        from tokenizers import models

        vocab = {s: i for i, s in enumerate(SPECIAL_TOKENS)}
        vocab.update({ch: len(SPECIAL_TOKENS) + b for b, ch in _byte_to_char().items()})
        backend = _new_backend(models.BPE(vocab=vocab, merges=[]))
        backend.add_special_tokens(_special_added_tokens())
        return cls(backend)

    @classmethod
    def from_json_str(cls, text: str, source: str = "tokenizer JSON") -> Tokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            backend = HFTokenizer.from_str(text)
        except Exception as exc:  # the Rust side raises a bare Exception with its parse message
            raise ConfigError(
                f"{source}: not a valid tokenizer.json ({exc}). Re-save or retrain the tokenizer."
            ) from exc
        return cls(backend, source)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Read `path` (a tokenizer.json, or a folder holding one)."""
        path = _json_path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(
                f"{path}: cannot read tokenizer ({exc}). Check data.tokenizer or the bundle folder."
            ) from exc
        return cls.from_json_str(text, source=str(path))

    def to_json_str(self) -> str:
        return self._backend.to_str()

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json atomically to `path` (a .json file, or a folder) and return the file path."""
        path = _json_path(path)
        atomic_write_text(path, self._backend.to_str(pretty=True))
        return path

    # ---- encoding -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no specials added; only a literal `<image>` becomes a special id."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` for many texts at once (the Rust side runs them in parallel)."""
        pieces = [text.split(IMAGE_TOKEN) for text in texts]
        flat = [p for parts in pieces for p in parts]
        encoded = iter(self._backend.encode_batch(flat, add_special_tokens=False))
        out = []
        for parts in pieces:
            ids: list[int] = []
            for k in range(len(parts)):
                if k:
                    ids.append(self.image_id)
                ids.extend(next(encoded).ids)
            out.append(ids)
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return b"".join(self.bytes_of(ids, skip_special)).decode("utf-8", errors="replace")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """`<|role|>content<|eot|>` per message -> (ids, train_mask); the mask is True only on assistant
        content and the <|eot|> that closes each assistant turn. `add_generation_prompt` appends `<|assistant|>`."""
        role_ids = {"system": self.system_id, "user": self.user_id, "assistant": self.assistant_id}
        ids: list[int] = []
        mask: list[bool] = []
        contents = self.encode_batch([_message_content(m, i) for i, m in enumerate(messages)])
        for i, (message, content) in enumerate(zip(messages, contents, strict=True)):
            role = message.get("role")
            if role not in role_ids:
                raise ValueError(f"messages[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
            train = role == "assistant"
            ids += [role_ids[role], *content, self.eot_id]
            mask += [False] + [train] * (len(content) + 1)
        if add_generation_prompt:
            ids.append(self.assistant_id)
            mask.append(False)
        return ids, mask

    # ---- bytes (for decode and streaming) -----------------------------------------------------------

    def _build_token_bytes(self) -> list[bytes]:
        char_to_byte = {ch: b for b, ch in _byte_to_char().items()}
        table = [b""] * self.vocab_size
        for token, i in self._backend.get_vocab(with_added_tokens=True).items():
            if i in self.special_ids:
                table[i] = token.encode("utf-8")
            else:
                table[i] = bytes(char_to_byte[ch] for ch in token)
        return table

    def bytes_of(self, ids: Iterable[int], skip_special: bool = True) -> Iterable[bytes]:
        """The raw bytes of each token (a token may hold part of a multi-byte character)."""
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self._token_bytes):
                raise ValueError(f"token id {i} is outside the vocabulary (0..{len(self._token_bytes) - 1})")
            if not (skip_special and i in self.special_ids):
                yield self._token_bytes[i]


def _message_content(message, index: int) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise ValueError(f"messages[{index}]: expected {{'role': ..., 'content': <text>}}, got {message!r}")
    return message["content"]


def _json_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix.lower() == ".json" else path / "tokenizer.json"


class StreamDecoder:
    """Turns generated ids into text as they arrive, holding back bytes that end mid-UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token ("" while a multi-byte character is still incomplete)."""
        return "".join(self._utf8.decode(b) for b in self._tokenizer.bytes_of([token_id], self._skip_special))

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD); the decoder is then reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
