"""Model bundles: a folder with model.safetensors, config.json, tokenizer.json and a README.md model card.

Saving takes the plain module (no DDP or torch.compile wrappers), stores tied weights once and writes the
whole folder atomically. Loading never unpickles anything and checks everything before it allocates: the
files are regular and of a sane size, the config's values are sane and the model fits in free memory
(apertis_core.sizing), the tokenizer agrees with the config, and the weights file's header names every
tensor with the shape the config gives it. A damaged or hostile bundle is refused with one message that
says what is wrong and what to do.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import finetune, sizing
from .bitnet_pack import TERNARY_PACKING, pack_state, packing_problem, unpack_state, unpacked_header
from .configio import ConfigError
from .fileio import atomic_write_bytes, atomic_write_text
from .filenames import BUNDLE_FILES
from .model import ApertisModel, ModelConfig
from .model_card import card_title, model_card
from .quantize import bundle_entry, quantize_model, read_bundle_entry
from .tokenizer import Tokenizer

FORMAT_VERSION = 1  # bumped when the folder layout or the weight names change incompatibly
# Other files a bundle or checkpoint folder may carry that are safe to keep (text and JSON, never pickles):
# the model card and a checkpoint's step and losses. An import keeps these and nothing else.
BUNDLE_EXTRAS = ("README.md", "meta.json")
MAX_CONFIG_BYTES = 1 << 20  # config.json holds a few dozen settings (~2 kB)
MAX_TOKENIZER_BYTES = 128 << 20  # a 65,536-token BPE tokenizer.json is ~5 MB
MAX_TEXT_BYTES = 1 << 20  # README.md and meta.json
_FILE_LIMITS = {"config.json": MAX_CONFIG_BYTES, "tokenizer.json": MAX_TOKENIZER_BYTES, "model.safetensors": None}


class BundleError(ValueError):
    """A bundle or checkpoint folder is missing, damaged or does not fit its config."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; on success it takes the place of `path`.

    A failure in the body leaves any previous folder at `path` untouched. Replacing an existing folder
    takes two renames; a crash between them leaves the old folder as `.NAME.old-*` beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---- weights ----------------------------------------------------------------------------------------
def _storage_key(tensor: torch.Tensor) -> tuple:
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
    )


def _canonical_names(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Each state-dict name -> the first name sharing its tensor (tied weights are stored once)."""
    first: dict[tuple, str] = {}
    return {name: first.setdefault(_storage_key(tensor), name) for name, tensor in state.items()}


def save_weights(path: str | Path, model: nn.Module, pack_ternary: bool = False) -> None:
    """Write the module's state as safetensors, atomically, each shared tensor once; `pack_ternary` stores a
    BitNet model's ternary weights two bits each (bitnet_pack)."""
    state = unwrap_model(model).state_dict()
    canonical = _canonical_names(state)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items() if canonical[name] == name}
    metadata = {"format": "pt", "apertis_format_version": str(FORMAT_VERSION)}
    if pack_ternary:
        tensors, metadata["weight_packing"] = pack_state(tensors, unwrap_model(model)), TERNARY_PACKING
    blob = save(tensors, metadata=metadata)
    atomic_write_bytes(path, _sorted_metadata(blob))


def _sorted_metadata(blob: bytes) -> bytes:
    """safetensors writes `__metadata__` in a per-process random order (a Rust HashMap); sort it, so the same
    weights always give the same file bytes. The header keeps its length (same pairs, spaces pad it)."""
    size = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + size])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    if len(text) > size:  # cannot happen with the same pairs, but never write a header that lies about its size
        return blob
    return blob[:8] + text.ljust(size, b" ") + blob[8 + size :]


def load_weights(path: str | Path, model: nn.Module) -> None:
    """Strictly load safetensors weights into `model`, with an error that says what does not fit.

    The file's header is checked against the model first (names, shapes, types, where the data lies), so a
    file that does not fit is refused before its tensors are read into memory."""
    path = Path(path)
    module = unwrap_model(model)
    groups, _ = _check_header(path, _read_header(path), module)
    try:
        saved = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise BundleError(f"{path} is damaged or not a safetensors file ({exc}); re-export the model") from exc
    saved = unpack_state(saved, module)  # a packed BitNet file's ternary weights, as float weights
    module.load_state_dict({name: saved[stored] for stored, names in groups.items() for name in names}, strict=True)


# Bytes per element of the safetensors dtypes; weights must be stored as one of the floating ones.
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER_BYTES = 16 << 20  # the largest model here lists a few hundred tensors in ~50 kB of header


def _damaged(path: Path, detail: str) -> BundleError:
    return BundleError(f"{path} is damaged or not a safetensors file ({detail}); re-export the model")


def _read_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file declares ({name: {dtype, shape, data_offsets}}), checked for sense
    against the file's size: nothing is read beyond the header, so a lying header costs nothing."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if length < 2 or length > MAX_HEADER_BYTES or 8 + length > size:
                raise _damaged(path, f"its header claims {length:,} bytes in a {size:,}-byte file")
            raw = handle.read(length)
    except OSError as exc:
        raise BundleError(f"{path} cannot be read ({exc.strerror or exc}); check the file") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _damaged(path, "its header is not JSON") from exc
    if not isinstance(header, dict):
        raise _damaged(path, "its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _damaged(path, "its __metadata__ is not a mapping of text")
    _check_layout(path, header, size - 8 - length)
    return header


def _check_layout(path: Path, header: dict[str, Any], data_bytes: int) -> None:
    """Each tensor's entry is well formed, its byte range matches its shape and type, and the ranges tile
    the data area exactly (as safetensors itself requires)."""
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _damaged(path, f"tensor {name!r} is not described by dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPE_BYTES or not _int_list(shape) or not _int_list(offsets) or len(offsets) != 2:
            raise _damaged(path, f"tensor {name!r} has an unreadable dtype, shape or data_offsets")
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != math.prod(shape) * _DTYPE_BYTES[dtype]:
            raise _damaged(
                path,
                f"tensor {name!r}: its {dtype} shape {tuple(shape)} does not match its {end - begin:,} bytes of data",
            )
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise _damaged(path, "its tensors overlap or leave gaps in the data")
        position = end
    if position != data_bytes:
        raise _damaged(path, f"its header describes {position:,} bytes of data but the file holds {data_bytes:,}")


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _state_groups(module: nn.Module) -> dict[str, list[str]]:
    """{first name: every state-dict name of that tensor}: tied weights share one entry. Found by identity
    of the parameters, so it also holds for a model built on the meta device (no storage to compare)."""
    keys = module.state_dict().keys()
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    first: dict[int, str] = {}
    groups: dict[str, list[str]] = {}
    for name, tensor in named:
        if name in keys:
            groups.setdefault(first.setdefault(id(tensor), name), []).append(name)
    return groups


def _check_header(path: Path, header: dict[str, dict[str, Any]], module: nn.Module) -> tuple[dict[str, list[str]], int]:
    """({stored name: the state-dict names it fills}, bytes of data) once the file's tensors fit `module`
    (real or on the meta device); BundleError naming what does not fit otherwise."""
    expected = module.state_dict()
    header = unpacked_header(header, module)  # a packed BitNet file's pairs, as the weights they unpack to
    groups = _state_groups(module)  # tied tensors: any one of their names may be the stored one
    source = {first: next((n for n in names if n in header), None) for first, names in groups.items()}
    problems = [f"missing {first}" for first, found in source.items() if found is None]
    problems += [f"unexpected {name}" for name in sorted(header.keys() - expected.keys())]
    problems += [
        f"{found}: saved {tuple(header[found]['shape'])}, config needs {tuple(expected[found].shape)}"
        for found in source.values()
        if found is not None and tuple(header[found]["shape"]) != tuple(expected[found].shape)
    ]
    problems += [  # weights are floating point; a few buffers (BatchNorm's batch counter) are integers
        f"{found}: stored as {header[found]['dtype']}, the model holds it as {str(expected[found].dtype).removeprefix('torch.')}"
        for found in source.values()
        if found is not None and (header[found]["dtype"] in _FLOAT_DTYPES) != expected[found].dtype.is_floating_point
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise BundleError(f"{path} was saved by a different config than the one beside it ({shown}); re-export it")
    data = sum(math.prod(entry["shape"]) * _DTYPE_BYTES[entry["dtype"]] for entry in header.values())
    return {found: groups[first] for first, found in source.items()}, data


# ---- bundles ----------------------------------------------------------------------------------------
def save_bundle(
    directory: str | Path,
    model: nn.Module,
    tokenizer: Tokenizer,
    card: dict[str, Any] | None = None,
    title: str | None = None,
    pack_ternary: bool = False,
    merge: bool = True,
) -> Path:
    """Write a self-contained model folder; `card` adds run facts (steps, train_loss, val_loss, data...).

    The card is titled `title`, by default the folder's name (see card_title). `pack_ternary`: see
    write_model_files. A model with LoRA adapters is saved as its adapter (finetune.py) and, with `merge`,
    also as the plain model with the adapters folded in, which loads without its base."""
    module = unwrap_model(model)
    config: ModelConfig = module.config
    if tokenizer.vocab_size != config.vocab_size:
        raise BundleError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model config says {config.vocab_size}"
        )
    adapted = finetune.has_adapter(module)
    card = {**(card or {}), **(finetune.adapter_facts(module) if adapted else {})}
    merged = finetune.merged_model(module) if adapted and merge else None
    with atomic_directory(directory) as tmp:
        write_model_files(tmp, module, tokenizer, pack_ternary)
        if merged is not None:
            write_model_files(tmp, merged, tokenizer, pack_ternary)
        shown = merged if merged is not None else module
        atomic_write_text(tmp / "README.md", model_card(shown, title or card_title(directory), card))
    return Path(directory)


def write_model_files(directory: Path, model: nn.Module, tokenizer: Tokenizer, pack_ternary: bool = False) -> None:
    """The three files every bundle and checkpoint has, into an existing folder. `pack_ternary` stores a
    BitNet model's ternary weights two bits each, recorded in config.json (bitnet_pack)."""
    module = unwrap_model(model)
    if finetune.has_adapter(module):  # a LoRA model: only its adapter; the weights stay in the base bundle
        finetune.write_adapter(directory, module)
    else:
        save_weights(directory / "model.safetensors", module, pack_ternary)
    config = {"format_version": FORMAT_VERSION, **module.config.to_dict(), **bundle_entry(module)}  # int8 weights
    if pack_ternary:
        config["weight_packing"] = TERNARY_PACKING
    atomic_write_text(directory / "config.json", json.dumps(config, indent=2) + "\n")
    tokenizer.save(directory / "tokenizer.json")


def read_model_config(path: str | Path) -> ModelConfig:
    """ModelConfig from a bundle's or checkpoint's config.json, refusing absurd values (a negative width, a
    million layers, text where a number belongs) before anything is built from them."""
    path = Path(path)
    return model_config_from_json(_read_small(path, MAX_CONFIG_BYTES), str(path))


def model_config_from_json(raw: bytes, where: str) -> ModelConfig:
    """ModelConfig from config.json's bytes (`where` names the file in messages); BundleError if they are not
    sane model settings."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise BundleError(
            f"{where} is larger than {MAX_CONFIG_BYTES // 1024:,} kB, far more than model settings "
            "take; the file is damaged or not from an Apertis bundle"
        )
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: JSON, 5,000-digit numbers
        raise BundleError(f"{where} cannot be read as JSON ({_short(exc)}); re-export the model") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{where} must hold a JSON object of model settings; re-export the model")
    version = data.pop("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        shown = version if isinstance(version, int) and abs(version) < 10**9 else type(version).__name__
        raise BundleError(f"{where} has format_version {shown!r}; this Apertis reads up to {FORMAT_VERSION}, update it")
    packing = packing_problem(data)  # pops "weight_packing": the weights file describes its own tensors
    if packing:
        raise BundleError(f"{where}: {packing}")
    try:
        read_bundle_entry(data, where)  # pops "quantization": bundle_quantization reads it for loading
    except ValueError as exc:
        raise BundleError(str(exc)) from exc
    try:
        sizing.check_model_mapping(data, where=where)
        config = ModelConfig.from_dict(data)
        sizing.check_config(config, where=where)
    except ConfigError as exc:
        raise BundleError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from exc
    except (ArithmeticError, TypeError) as exc:  # a combination the config's own checks did not foresee
        raise BundleError(f"{where}: these model settings cannot build a model ({exc}); re-export the model") from exc
    return config


def _read_small(path: Path, limit: int) -> bytes:
    """At most limit + 1 bytes of `path`: enough to tell it is too large without reading it all."""
    try:
        with path.open("rb") as handle:
            return handle.read(limit + 1)
    except OSError as exc:
        raise BundleError(f"{path} cannot be read ({exc.strerror or exc}); re-export the model") from exc


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bundle_file(directory: Path, name: str, limit: int | None = None) -> Path:
    """`directory/name`, once it is a regular file (a link to one is fine) no larger than `limit`."""
    path = directory / name
    try:
        info = path.stat()
    except OSError:
        raise BundleError(f"{directory} has no {name}; a model folder needs {', '.join(BUNDLE_FILES)}") from None
    if not stat.S_ISREG(info.st_mode):
        raise BundleError(
            f"{path} is not a regular file (a folder, device or pipe); a bundle's {name} must be "
            "a file. Re-export the model"
        )
    if limit is not None and info.st_size > limit:
        raise BundleError(
            f"{path} is {sizing.human_bytes(info.st_size)}, more than a {name} can be "
            f"({sizing.human_bytes(limit)}); the file is damaged or not from an Apertis bundle"
        )
    return path


def check_bundle(directory: str | Path, device: str | torch.device = "cpu") -> tuple[ModelConfig, Tokenizer]:
    """(config, tokenizer) of a bundle or checkpoint folder once everything about it has been checked
    without building the model: its files, config values, the memory it needs on `device`, the tokenizer
    against the config, and the weights file's header against the config's shapes. BundleError (a
    ValueError) saying what is wrong and what to do otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"{directory}: no such model folder")
    if finetune.is_adapter_dir(directory):
        return _check_adapter_dir(directory, device)
    files = {name: _bundle_file(directory, name, limit) for name, limit in _FILE_LIMITS.items()}
    config = read_model_config(files["config.json"])
    try:
        sizing.check_loadable(config, device, where=str(files["config.json"]))
    except sizing.ModelSizeError as exc:
        raise BundleError(f"{directory}: {exc}") from exc
    tokenizer = _read_tokenizer(files["tokenizer.json"], config)
    check_weights_file(files["model.safetensors"], config, bundle_quantization(directory))
    return config, tokenizer


def bundle_quantization(directory: Path) -> str:
    """How a checked model folder stores its weights: "none" (floating point) or "int8" (quantize.py)."""
    return read_bundle_entry(json.loads(_read_small(directory / "config.json", MAX_CONFIG_BYTES)), str(directory))


def _read_tokenizer(path: Path, config: ModelConfig) -> Tokenizer:
    directory = path.parent
    try:
        tokenizer = Tokenizer.load(path)
    except ConfigError as exc:
        raise BundleError(_short(exc, 400)) from exc
    if tokenizer.vocab_size != config.vocab_size:
        raise BundleError(
            f"{directory}: tokenizer.json has {tokenizer.vocab_size} tokens but config.json says vocab_size "
            f"{config.vocab_size}; the files come from different models, re-export it"
        )
    if config.image_encoder != "none" and config.image_token_id not in (-1, tokenizer.image_id):
        raise BundleError(
            f"{directory}: config.json marks images with token {config.image_token_id} but tokenizer.json's "
            f"<image> is {tokenizer.image_id}; the files come from different models, re-export it"
        )
    return tokenizer


def check_weights_file(path: str | Path, config: ModelConfig, quantization: str = "none") -> int:
    """Check a weights file's header against `config` (names, shapes, types, layout) without reading its
    tensors, and that this computer can hold them beside the model while loading; returns the data bytes.
    `quantization` is how config.json says the weights are stored (bundle_quantization)."""
    path = Path(path)
    header = _read_header(path)
    with torch.device("meta"):  # shapes only: the meta device allocates nothing
        skeleton = quantize_model(ApertisModel(config), quantization)
    _, data_bytes = _check_header(path, header, skeleton)
    if data_bytes > sizing.weight_bytes(config):  # stored wider than fp32: loading needs more than planned
        try:
            sizing.check_fits(
                sizing.weight_bytes(config) + data_bytes,
                "cpu",
                f"Loading {path}",
                "Close other programs, or re-export the model in fp32.",
            )
        except sizing.ModelSizeError as exc:
            raise BundleError(str(exc)) from exc
    return data_bytes


def load_bundle(
    directory: str | Path, device: str | torch.device = "cpu", merge: bool = True
) -> tuple[ApertisModel, Tokenizer]:
    """(model in eval mode on `device`, tokenizer) from a bundle or checkpoint folder. Everything is checked
    first (check_bundle), so a bundle that is damaged, hostile or too big is refused before it allocates.
    A LoRA adapter folder loads its base bundle with the adapter applied, folded into a plain model unless
    `merge` is False."""
    directory = Path(directory)
    config, tokenizer = check_bundle(directory, device)
    if finetune.is_adapter_dir(directory):
        model = apply_adapter(load_bundle(_adapter_settings(directory)[1])[0], directory)
        model = finetune.merged_model(model) if merge else model
    else:
        model = quantize_model(ApertisModel(config), bundle_quantization(directory))  # int8 modules if stored so
        load_weights(directory / "model.safetensors", model)
    return model.to(device).eval(), tokenizer


# ---- LoRA adapter folders (finetune.py) ----------------------------------------------------------------
def _adapter_settings(directory: Path) -> tuple[Any, Path]:
    """(peft's LoraConfig, base bundle folder) of an adapter folder."""
    path = _bundle_file(directory, finetune.ADAPTER_CONFIG, MAX_CONFIG_BYTES)
    try:
        lora = finetune.adapter_config(_read_small(path, MAX_CONFIG_BYTES), str(path))
    except finetune.AdapterError as exc:
        raise BundleError(str(exc)) from exc
    return lora, finetune.base_path(directory, lora)


def _check_adapter_dir(directory: Path, device: str | torch.device) -> tuple[ModelConfig, Tokenizer]:
    """check_bundle for a LoRA adapter folder: its base bundle in full, then that the adapter was made for
    that base (the architecture in its config.json) and its tokenizer and weights fit."""
    lora, base = _adapter_settings(directory)
    if finetune.is_adapter_dir(base):
        raise BundleError(f"{directory}: its base {base} is an adapter too; an adapter applies to a plain bundle")
    try:
        config, _ = check_bundle(base, device)
    except BundleError as exc:
        raise BundleError(f"{directory} is a LoRA adapter whose base model cannot be loaded: {exc}") from exc
    if read_model_config(_bundle_file(directory, "config.json", MAX_CONFIG_BYTES)) != config:
        raise BundleError(
            f"{directory}: its base {base} is no longer the model the adapter was trained on (their config.json "
            "differ); put the original base back, or fine-tune again"
        )
    tokenizer = _read_tokenizer(_bundle_file(directory, "tokenizer.json", MAX_TOKENIZER_BYTES), config)
    _check_adapter_weights(directory, config, lora)
    return config, tokenizer


def _check_adapter_weights(directory: Path, config: ModelConfig, lora: Any) -> Path:
    """The adapter's weights file, once its header names exactly the tensors, of the shapes, that peft gives
    `lora` on a model of `config` (nothing is read beyond the header)."""
    path = _bundle_file(directory, finetune.ADAPTER_WEIGHTS)
    header = _read_header(path)
    try:
        shapes = finetune.adapter_shapes(config, lora)
    except finetune.AdapterError as exc:
        raise BundleError(f"{directory}: {exc}") from exc
    problems = [f"missing {name}" for name in shapes if name not in header]
    problems += [f"unexpected {name}" for name in sorted(header.keys() - shapes.keys())]
    problems += [
        f"{name}: saved {tuple(entry['shape'])} as {entry['dtype']}, the adapter needs {shapes[name]}"
        for name, entry in header.items()
        if name in shapes and (tuple(entry["shape"]) != shapes[name] or entry["dtype"] not in _FLOAT_DTYPES)
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise BundleError(f"{path} does not fit its adapter_config.json and base model ({shown}); save it again")
    return path


def apply_adapter(model: ApertisModel, directory: str | Path, trainable: bool = False) -> ApertisModel:
    """Add the LoRA adapter saved in `directory` to `model` (a model of its base's architecture), its files
    checked first; `trainable` keeps the adapter trainable (a resumed LoRA run)."""
    directory = Path(directory)
    lora, _ = _adapter_settings(directory)
    path = _check_adapter_weights(directory, model.config, lora)
    try:
        weights = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise _damaged(path, str(exc)) from exc
    return finetune.load_adapter(model, lora, weights, trainable)
