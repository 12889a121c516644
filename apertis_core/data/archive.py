"""Safe .zip extraction into a content-addressed cache: refuses path escapes, links and decompression bombs.

Every member is checked before anything is written, so a refused archive leaves nothing behind.
The cache folder is named by the archive's hash, so re-runs (and every DDP rank) reuse one extraction.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

MAX_TOTAL_BYTES = 4 << 30  # uncompressed; larger datasets should be given as a folder, not a zip
MAX_RATIO = 200  # text compresses ~4x and images ~1x; hundreds-to-one is a bomb's signature
MAX_MEMBERS = 200_000  # a bound on inode/metadata blow-up from millions of empty entries
_RATIO_MIN_BYTES = 1 << 20  # tiny members (a repetitive caption) can have wild ratios harmlessly
_CHUNK = 1 << 20


class ArchiveError(ValueError):
    """The archive was refused; `hint` says what to do."""

    def __init__(self, message: str, hint: str):
        super().__init__(message)
        self.hint = hint


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "apertis-datasets"


def extract_zip(
    zip_path: str | Path,
    cache_dir: str | Path | None = None,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    max_ratio: float = MAX_RATIO,
) -> Path:
    """Extract `zip_path` (once) and return the folder holding its contents; ArchiveError if unsafe."""
    zip_path = Path(zip_path)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = cache_dir / f"{zip_path.stem}-{_sha256(zip_path)[:16]}"
    if dest.is_dir():
        return dest
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = archive.infolist()
            _check_members(members, zip_path.stat().st_size, max_total_bytes, max_ratio)
            cache_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=cache_dir))
            try:
                _extract_members(archive, members, staging, max_total_bytes)
                os.rename(staging, dest)
            except OSError:
                if not dest.is_dir():  # another process did not win the race: a real failure
                    raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # bad directory, bad CRC, cut-off data
        raise ArchiveError(
            f"not a valid zip file ({exc})", "re-create the archive, or pass the folder instead"
        ) from exc
    return dest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_members(members: list[zipfile.ZipInfo], archive_bytes: int, max_total: int, max_ratio: float) -> None:
    recreate = "re-create the zip from the dataset folder with relative paths (e.g. `zip -r data.zip data/`)"
    if len(members) > MAX_MEMBERS:
        raise ArchiveError(f"has {len(members)} entries (limit {MAX_MEMBERS})", "pass the folder instead of a zip")
    total = 0
    for info in members:
        name = info.filename
        if _is_absolute(name):
            raise ArchiveError(f"member {name!r} has an absolute path; refusing the archive", recreate)
        if ".." in PurePosixPath(name.replace("\\", "/")).parts:
            raise ArchiveError(
                f"member {name!r} points outside the archive folder (zip-slip); refusing the archive", recreate
            )
        if stat.S_ISLNK(info.external_attr >> 16):
            raise ArchiveError(
                f"member {name!r} is a symbolic link; refusing the archive", "zip the files themselves (zip without -y)"
            )
        if info.flag_bits & 0x1:
            raise ArchiveError(f"member {name!r} is encrypted", "re-create the zip without a password")
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > _RATIO_MIN_BYTES and ratio > max_ratio:
            raise ArchiveError(
                f"member {name!r} expands {ratio:.0f}x (limit {max_ratio:.0f}x): looks like a decompression bomb; refusing the archive",
                "if the data is genuine, unzip it yourself and pass the folder",
            )
        total += info.file_size
    if total > max_total:
        raise ArchiveError(
            f"would expand to {total / 2**20:.1f} MiB (limit {max_total / 2**20:.1f} MiB); refusing the archive",
            "unzip it yourself and pass the folder",
        )
    if total > _RATIO_MIN_BYTES and total / max(archive_bytes, 1) > max_ratio:
        raise ArchiveError(
            f"expands {total / max(archive_bytes, 1):.0f}x overall: looks like a decompression bomb",
            "if the data is genuine, unzip it yourself and pass the folder",
        )


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None


def _extract_members(archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], dest: Path, max_total: int) -> None:
    """Stream each member out, counting real bytes: headers can lie about sizes."""
    root = dest.resolve()
    written = 0
    for info in members:
        target = (root / info.filename.replace("\\", "/")).resolve()
        if not target.is_relative_to(root):  # belt and braces after the name checks
            raise ArchiveError(f"member {info.filename!r} resolves outside the archive folder", "re-create the zip")
        if info.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with archive.open(info) as src, target.open("wb") as out:
            member_bytes = 0
            while chunk := src.read(_CHUNK):
                member_bytes += len(chunk)
                written += len(chunk)
                if member_bytes > info.file_size or written > max_total:
                    raise ArchiveError(
                        f"member {info.filename!r} holds more data than its header says; refusing the archive",
                        "re-create the archive; it may have been tampered with",
                    )
                out.write(chunk)
