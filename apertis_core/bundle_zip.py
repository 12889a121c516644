"""Bundle zips: a model folder someone shared as a .zip, checked under the one archive policy and sized from
its config before anything is extracted; only the bundle's own files are kept, never pickles."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import torch

from . import sizing
from .bundle import (
    BUNDLE_EXTRAS,
    MAX_CONFIG_BYTES,
    MAX_TEXT_BYTES,
    MAX_TOKENIZER_BYTES,
    BundleError,
    check_bundle,
    model_config_from_json,
)
from .data.archive import ArchivePolicy, check_zip, safe_extract
from .filenames import BUNDLE_FILES
from .model import ModelConfig

# One archive policy for every zip the app opens (apertis_core.data.archive): paths, links, members, sizes
# and expansion ratio. A bundle has at most a few GB of weights, which compress hardly at all.
IMPORT_POLICY = ArchivePolicy(max_members=10_000, max_total_bytes=4 << 30)
_KEPT_FILES = (*BUNDLE_FILES, *BUNDLE_EXTRAS)
_IGNORED_FOLDERS = ("__MACOSX",)  # what macOS's Finder adds to every zip it makes


def unpack_bundle(
    zip_path: str | Path, dest: str | Path, device: str | torch.device = "cpu", work_dir: str | Path | None = None
) -> list[str]:
    """Unpack a bundle zip into the new folder `dest` and return the names of the files left out.

    The zip keeps to IMPORT_POLICY; its bundle is at the top or in one folder; its config is checked, and
    the model sized against the free memory of `device`, before anything is extracted; only the bundle's
    files (model.safetensors, config.json, tokenizer.json, README.md, meta.json) are written, never pickles
    or anything else; and the unpacked bundle passes check_bundle before it takes the name `dest`. A refused
    zip raises BundleError or ArchiveError (both ValueErrors) and leaves nothing behind. `work_dir` (by
    default beside `dest`) is where the files wait until they are checked.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    if dest.exists():
        raise FileExistsError(17, "the folder to import into already exists", str(dest))
    members = check_zip(zip_path, IMPORT_POLICY)
    folder = _bundle_folder(members)
    files = {_member_path(m).name: m for m in members if not m.is_dir() and _member_path(m).parent == folder}
    config = _zip_config(zip_path, files["config.json"])
    try:
        total = sizing.check_loadable(config, device, where=f"{zip_path.name}: config.json")
    except sizing.ModelSizeError as exc:
        raise BundleError(str(exc)) from exc
    _check_member_sizes(zip_path.name, files, total)
    kept = {folder / name for name, info in files.items() if name in _KEPT_FILES and _fits(name, info)}
    work_root = Path(work_dir) if work_dir is not None else dest.parent
    work_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=work_root))
    try:
        unpacked = safe_extract(zip_path, work / "zip", IMPORT_POLICY, keep=lambda name: name in kept) / folder
        check_bundle(unpacked, device)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(unpacked, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return sorted(
        str(_member_path(m))
        for m in members
        if not m.is_dir()
        and _member_path(m) not in kept
        and _member_path(m).parts[:1] not in [(name,) for name in _IGNORED_FOLDERS]
    )


def _member_path(info: zipfile.ZipInfo) -> PurePosixPath:
    return PurePosixPath(info.filename.replace("\\", "/"))


def _bundle_folder(members: list[zipfile.ZipInfo]) -> PurePosixPath:
    """Where in the zip the bundle's files are: its top, or one folder (a zipped bundle folder)."""
    files = {_member_path(m) for m in members if not m.is_dir()}
    folders = sorted(
        path.parent
        for path in files
        if path.name == "config.json"
        and len(path.parent.parts) <= 1
        and path.parts[0] not in _IGNORED_FOLDERS
        and all(path.parent / name in files for name in BUNDLE_FILES)
    )
    if not folders:
        raise BundleError(
            f"no model in the zip: it needs {', '.join(BUNDLE_FILES)} at its top or in one folder. Export the "
            "model from a studio's Models tab or with `apertis export`, and zip that folder"
        )
    if len(folders) > 1:
        shown = ", ".join(str(f) if str(f) != "." else "(top)" for f in folders[:5])
        raise BundleError(f"the zip holds {len(folders)} models ({shown}); import them one zip at a time")
    return folders[0]


def _zip_config(zip_path: Path, info: zipfile.ZipInfo) -> ModelConfig:
    """The bundle's config read straight from the zip (nothing extracted yet)."""
    where = f"{zip_path.name}: {info.filename}"
    if info.file_size > MAX_CONFIG_BYTES:
        raise BundleError(
            f"{where} is {sizing.human_bytes(info.file_size)}, far more than model settings take; "
            "the zip is damaged or not an Apertis bundle"
        )
    try:
        with zipfile.ZipFile(zip_path) as archive, archive.open(info) as member:
            raw = member.read(MAX_CONFIG_BYTES + 1)
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise BundleError(f"{where} cannot be read from the zip ({exc}); re-create the zip") from exc
    return model_config_from_json(raw, where)


def _check_member_sizes(zip_name: str, files: dict[str, zipfile.ZipInfo], parameters: int) -> None:
    """Refuse, before extracting, weights or a tokenizer larger than the config allows them to be."""
    weights = files["model.safetensors"].file_size
    most = parameters * 8 + (1 << 20)  # fp64 weights, the widest a bundle holds, and a header of ~100 bytes a tensor
    if weights > most:
        raise BundleError(
            f"{zip_name}: model.safetensors is {sizing.human_bytes(weights)}, more than the {parameters:,} "
            f"parameters its config.json describes can take ({sizing.human_bytes(most)}); the files do not "
            "belong together, re-export the model"
        )
    tokenizer = files["tokenizer.json"].file_size
    if tokenizer > MAX_TOKENIZER_BYTES:
        raise BundleError(
            f"{zip_name}: tokenizer.json is {sizing.human_bytes(tokenizer)}, more than a tokenizer "
            f"can be ({sizing.human_bytes(MAX_TOKENIZER_BYTES)}); re-export the model"
        )


def _fits(name: str, info: zipfile.ZipInfo) -> bool:
    """Whether a file the bundle needs, or a small text file it may carry, is kept; an oversized card or
    meta file is left out (the model runs without it)."""
    return name in BUNDLE_FILES or info.file_size <= MAX_TEXT_BYTES
