"""The one policy for every .zip the app opens (datasets, model imports): safe extraction that refuses path
escapes, links, special files, duplicate names and decompression bombs.

Every member is checked before anything is written, and extraction goes to a staging folder that is
renamed into place only when complete, so a refused archive leaves nothing behind. Sizes are checked twice:
from the headers before extracting, then by counting the bytes actually written, since headers can lie.

    policy = ArchivePolicy(max_total_bytes=4 << 30)           # or DATASET_POLICY
    safe_extract("bundle.zip", dest, policy, keep=lambda name: name.name in WANTED)
    extract_zip("data.zip", cache_dir)                        # datasets: extracted once, by content hash
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

_CHUNK = 1 << 20
_RECREATE = "re-create the zip from the folder with relative paths (e.g. `zip -r data.zip data/`)"
_UNZIP_YOURSELF = "if the data is genuine, unzip it yourself and pass the folder"
_READABLE_METHODS = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA})
# A central-directory entry is at least 46 bytes plus its name; 1 KiB each is far more than any real
# archive needs, and bounds what reading the directory allocates before the member count can be checked.
_DIRECTORY_BYTES_PER_MEMBER = 1024


@dataclass(frozen=True)
class ArchivePolicy:
    """Limits a zip must keep to before any of it is written to disk."""

    max_members: int = 200_000  # entries, directories included: bounds inode and metadata blow-up
    max_total_bytes: int = 4 << 30  # uncompressed, all members together; larger data belongs in a folder
    # Text compresses ~4x and images or weights ~1x; hundreds-to-one is a bomb's signature. Checked per member
    # and for the whole archive, only above ratio_min_bytes: a tiny repetitive file has wild ratios harmlessly.
    max_ratio: float = 200
    ratio_min_bytes: int = 1 << 20


DATASET_POLICY = ArchivePolicy()
MAX_TOTAL_BYTES, MAX_RATIO, MAX_MEMBERS = (
    DATASET_POLICY.max_total_bytes,
    DATASET_POLICY.max_ratio,
    DATASET_POLICY.max_members,
)


class ArchiveError(ValueError):
    """The archive was refused; the message says why, `hint` says what to do."""

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
    """A dataset zip, extracted (once) into a folder named by its content hash under `cache_dir`, so re-runs
    and every DDP rank reuse one extraction; ArchiveError if it breaks DATASET_POLICY (or the given limits)."""
    zip_path = Path(zip_path)
    _require_regular_file(zip_path)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        dest = cache_dir / f"{zip_path.stem}-{_sha256(zip_path)[:16]}"
    except OSError as exc:
        raise ArchiveError(f"cannot read the archive ({exc.strerror or exc})", "check the file is readable") from exc
    if dest.is_dir():
        return dest
    policy = ArchivePolicy(max_members=DATASET_POLICY.max_members, max_total_bytes=max_total_bytes, max_ratio=max_ratio)
    try:
        return safe_extract(zip_path, dest, policy)
    except FileExistsError:  # another process extracted the same archive meanwhile
        return dest


def safe_extract(
    zip_path: str | Path,
    dest: str | Path,
    policy: ArchivePolicy = DATASET_POLICY,
    keep: Callable[[PurePosixPath], bool] | None = None,
) -> Path:
    """Extract `zip_path` into `dest` (which must not exist yet) and return `dest`.

    Every member is checked against `policy` first (see check_members); `keep(name)`, given each file's
    path inside the archive, chooses which files are written (the others are checked but never written).
    Raises ArchiveError (nothing written) when the archive is refused, damaged or cannot be written out,
    and FileExistsError when `dest` already exists.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists")
    _require_regular_file(zip_path)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as exc:
        raise ArchiveError(f"cannot create a folder to extract into ({exc})", "check the disk has space") from exc
    try:
        with _opened(zip_path, policy) as archive:
            members = archive.infolist()
            check_members(members, zip_path.stat().st_size, policy)
            # With `keep`, folders come only as the parents of kept files: no empty folders from what was left out.
            wanted = [m for m in members if keep is None or (not m.is_dir() and keep(_name(m)))]
            _extract_members(archive, wanted, staging, policy)
        _move_into_place(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def check_zip(zip_path: str | Path, policy: ArchivePolicy = DATASET_POLICY) -> list[zipfile.ZipInfo]:
    """The members of `zip_path` if it keeps to `policy` (nothing is extracted); ArchiveError if not."""
    zip_path = Path(zip_path)
    _require_regular_file(zip_path)
    with _opened(zip_path, policy) as archive:
        members = archive.infolist()
        check_members(members, zip_path.stat().st_size, policy)
    return members


def check_members(members: list[zipfile.ZipInfo], archive_bytes: int, policy: ArchivePolicy = DATASET_POLICY) -> None:
    """ArchiveError unless every member is safe to write: a relative path inside the archive folder, a file
    or folder (no link, device or FIFO), not encrypted, a compression this app reads, each name once, and
    sizes and expansion ratios within `policy`."""
    if len(members) > policy.max_members:
        raise ArchiveError(
            f"has {len(members):,} entries (limit {policy.max_members:,}); refusing the archive",
            "pass the folder instead of a zip",
        )
    seen: set[str] = set()
    for info in members:
        _check_name(info, seen)
        _check_kind(info)
        _check_ratio(info.filename, info.file_size, info.compress_size, policy)
    total = sum(info.file_size for info in members)
    if total > policy.max_total_bytes:
        raise ArchiveError(
            f"would expand to {total / 2**20:.1f} MiB (limit {policy.max_total_bytes / 2**20:.1f} MiB); refusing the archive",
            "unzip it yourself and pass the folder",
        )
    if total > policy.ratio_min_bytes and total / max(archive_bytes, 1) > policy.max_ratio:
        raise ArchiveError(
            f"expands {total / max(archive_bytes, 1):.0f}x overall (limit {policy.max_ratio:.0f}x): "
            "looks like a decompression bomb; refusing the archive",
            _UNZIP_YOURSELF,
        )


def _check_name(info: zipfile.ZipInfo, seen: set[str]) -> None:
    name = info.filename
    if _is_absolute(name):
        raise ArchiveError(f"member {name!r} has an absolute path; refusing the archive", _RECREATE)
    path = _name(info)
    if ".." in path.parts:
        raise ArchiveError(
            f"member {name!r} points outside the archive folder (zip-slip); refusing the archive", _RECREATE
        )
    # Two entries for one path: which one wins depends on the tool, so what was checked may not be what is used.
    key = path.as_posix().rstrip("/")
    if key in seen and not info.is_dir():
        raise ArchiveError(f"member {name!r} appears twice; refusing the archive", _RECREATE)
    seen.add(key)


def _check_kind(info: zipfile.ZipInfo) -> None:
    name, mode = info.filename, info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise ArchiveError(
            f"member {name!r} is a symbolic link; refusing the archive", "zip the files themselves (zip without -y)"
        )
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ArchiveError(f"member {name!r} is a device, FIFO or socket entry; refusing the archive", _RECREATE)
    if info.flag_bits & 0x1:
        raise ArchiveError(f"member {name!r} is encrypted", "re-create the zip without a password")
    if info.compress_type not in _READABLE_METHODS:
        raise ArchiveError(
            f"member {name!r} uses compression method {info.compress_type}, which this app cannot read",
            "re-create the zip with ordinary (deflate) compression",
        )


def _check_ratio(name: str, size: int, compressed: int, policy: ArchivePolicy) -> None:
    ratio = size / max(compressed, 1)
    if size > policy.ratio_min_bytes and ratio > policy.max_ratio:
        raise ArchiveError(
            f"member {name!r} expands {ratio:.0f}x (limit {policy.max_ratio:.0f}x): looks like a decompression bomb; "
            "refusing the archive",
            _UNZIP_YOURSELF,
        )


def _name(info: zipfile.ZipInfo) -> PurePosixPath:
    return PurePosixPath(info.filename.replace("\\", "/"))


def _is_absolute(name: str) -> bool:
    return name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) is not None


def _require_regular_file(path: Path) -> None:
    # Reading a FIFO waits for a writer forever; a folder or device named .zip is no archive either.
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError) as exc:
        raise ArchiveError(
            f"cannot read the archive ({getattr(exc, 'strerror', None) or exc})", "check the path"
        ) from None
    if not stat.S_ISREG(mode):
        raise ArchiveError("is not a regular file", "pass a .zip file")


@contextlib.contextmanager
def _opened(path: Path, policy: ArchivePolicy) -> Iterator[zipfile.ZipFile]:
    """zipfile.ZipFile(path), refused before its central directory is read when the end record declares
    more members, or a larger directory, than `policy` allows; a damaged zip, found on opening or while
    reading members, becomes ArchiveError."""
    try:
        declared = _declared_directory(path)
        if declared is not None:
            _check_declared(*declared, policy)
        archive = zipfile.ZipFile(path)
    except OSError as exc:
        raise ArchiveError(f"cannot read the archive ({exc.strerror or exc})", "check the file is readable") from exc
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, struct.error, ValueError) as exc:
        if isinstance(exc, ArchiveError):
            raise
        raise _damaged(exc) from exc
    with archive:
        try:
            yield archive
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
            raise _damaged(exc) from exc  # a bad CRC, cut-off data, a method the headers hid


def _damaged(exc: BaseException) -> ArchiveError:
    return ArchiveError(f"not a valid zip file ({exc})", "re-create the archive, or pass the folder instead")


_EOCD = struct.Struct("<4s4H2LH")  # end of central directory: ..., entries (index 4), directory size (5), ...
_ZIP64_LOCATOR = struct.Struct("<4sLQL")  # ..., offset of the zip64 end record (index 2), ...
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")  # ..., entries (index 7), directory size (8), ...


def _declared_directory(path: Path) -> tuple[int, int] | None:
    """(members, central directory bytes) as the end record declares them, or None if there is none
    (zipfile then reports the damage)."""
    with path.open("rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        tail_start = max(0, size - _EOCD.size - 0xFFFF)  # the end record is followed by a comment of < 64 KiB
        handle.seek(tail_start)
        tail = handle.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + _EOCD.size > len(tail):
            return None
        fields = _EOCD.unpack_from(tail, at)
        if fields[4] != 0xFFFF and fields[5] != 0xFFFFFFFF:
            return fields[4], fields[5]
        if at < _ZIP64_LOCATOR.size:
            return None
        locator = _ZIP64_LOCATOR.unpack_from(tail, at - _ZIP64_LOCATOR.size)
        if locator[0] != b"PK\x06\x07":
            return None
        handle.seek(locator[2])
        record = handle.read(_ZIP64_EOCD.size)
        if len(record) < _ZIP64_EOCD.size or record[:4] != b"PK\x06\x06":
            return None
        fields = _ZIP64_EOCD.unpack(record)
        return fields[7], fields[8]


def _check_declared(members: int, directory_bytes: int, policy: ArchivePolicy) -> None:
    if members > policy.max_members or directory_bytes > policy.max_members * _DIRECTORY_BYTES_PER_MEMBER:
        raise ArchiveError(
            f"declares {members:,} entries in a {directory_bytes:,}-byte directory (limit {policy.max_members:,} "
            "entries); refusing the archive",
            "pass the folder instead of a zip",
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _extract_members(
    archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], dest: Path, policy: ArchivePolicy
) -> None:
    """Stream each member out, counting real bytes: headers can lie about sizes."""
    root = dest.resolve()
    written = 0
    for info in members:
        target = (root / _name(info)).resolve()
        if not target.is_relative_to(root):  # belt and braces after the name checks
            raise ArchiveError(f"member {info.filename!r} resolves outside the archive folder", _RECREATE)
        try:
            written += _write_member(archive, info, target, policy.max_total_bytes - written)
        except OSError as exc:  # a name too long for the disk, a file where a folder should be, a full disk
            raise ArchiveError(
                f"cannot extract member {info.filename!r} ({exc.strerror or exc}); refusing the archive",
                "check the disk has space; if it has, unzip it yourself and pass the folder",
            ) from exc


def _write_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: int) -> int:
    """Bytes written for one member; ArchiveError when it holds more than its header says or than `budget`."""
    if info.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    member_bytes = 0
    with archive.open(info) as src, target.open("xb") as out:
        while chunk := src.read(_CHUNK):
            member_bytes += len(chunk)
            if member_bytes > info.file_size or member_bytes > budget:
                raise ArchiveError(
                    f"member {info.filename!r} holds more data than its header says; refusing the archive",
                    "re-create the archive; it may have been tampered with",
                )
            out.write(chunk)
    return member_bytes


def _move_into_place(staging: Path, dest: Path) -> None:
    try:
        os.rename(staging, dest)
    except OSError as exc:
        if dest.exists():
            raise FileExistsError(f"{dest} already exists") from exc
        raise ArchiveError(
            f"cannot move the extracted files into place ({exc.strerror or exc})", "check the disk"
        ) from exc
