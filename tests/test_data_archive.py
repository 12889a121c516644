"""The archive policy every zip goes through: limits are checked before a byte is written, `keep` writes only
the chosen files, and a refused archive leaves nothing behind."""

import struct
import zipfile
from pathlib import Path, PurePosixPath

import pytest

from apertis_core.data.archive import (
    DATASET_POLICY,
    ArchiveError,
    ArchivePolicy,
    check_zip,
    extract_zip,
    safe_extract,
)


def make_zip(path: Path, members: dict[str, bytes | str]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_safe_extract_writes_only_the_kept_files_and_no_empty_folders(tmp_path):
    archive = make_zip(
        tmp_path / "bundle.zip",
        {"m/config.json": "{}", "m/model.safetensors": b"\0" * 10, "m/extra/notes.txt": "x", "m/trainer_state.pt": "p"},
    )
    wanted = {"config.json", "model.safetensors"}
    dest = safe_extract(archive, tmp_path / "out" / "m1", keep=lambda name: name.name in wanted)
    assert dest == tmp_path / "out" / "m1"
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "m",
        "m/config.json",
        "m/model.safetensors",
    ]
    assert leftovers(tmp_path / "out") == ["m1"]  # no staging folder left


def test_keep_sees_each_file_as_a_path_inside_the_archive(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"a/b.txt": "1", "c.txt": "2"})
    seen = []
    safe_extract(archive, tmp_path / "out", keep=lambda name: seen.append(name) or True)
    assert seen == [PurePosixPath("a/b.txt"), PurePosixPath("c.txt")]


def test_a_refused_archive_leaves_nothing_even_the_destination(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"ok.txt": "fine", "../evil.txt": "x"})
    with pytest.raises(ArchiveError, match="zip-slip") as refused:
        safe_extract(archive, tmp_path / "out" / "dest")
    assert refused.value.hint  # says what to do
    assert leftovers(tmp_path / "out") == [] and not (tmp_path / "evil.txt").exists()


def test_an_existing_destination_is_never_overwritten(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"a.txt": "new"})
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "a.txt").write_text("old")
    with pytest.raises(FileExistsError):
        safe_extract(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "a.txt").read_text() == "old"


@pytest.mark.parametrize(
    "policy, members, message",
    [
        (ArchivePolicy(max_members=2), {"a": "1", "b": "2", "c": "3"}, "declares 3 entries"),
        (ArchivePolicy(max_total_bytes=1000), {"a": "x" * 600, "b": "y" * 600}, "would expand to"),
        (ArchivePolicy(max_ratio=10, ratio_min_bytes=100), {"a": "0" * 5000}, "expands"),
    ],
)
def test_each_limit_of_a_policy_is_enforced_before_extracting(tmp_path, policy, members, message):
    archive = make_zip(tmp_path / "a.zip", members)
    with pytest.raises(ArchiveError, match=message):
        check_zip(archive, policy)
    with pytest.raises(ArchiveError, match=message):
        safe_extract(archive, tmp_path / "out" / "dest", policy)
    assert leftovers(tmp_path / "out") == []
    assert [m.filename for m in check_zip(archive, DATASET_POLICY)] == list(members)  # within the default limits


def test_an_end_record_that_understates_the_members_does_not_get_past_the_count(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"a": "1", "b": "2", "c": "3"})
    data = bytearray(archive.read_bytes())
    end = data.rindex(b"PK\x05\x06")
    struct.pack_into("<HH", data, end + 8, 1, 1)  # entries on this disk, entries in total: "1"
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="has 3 entries"):
        check_zip(archive, ArchivePolicy(max_members=2))


def test_extract_zip_reuses_one_extraction_per_content(tmp_path):
    archive = make_zip(tmp_path / "data.zip", {"d.txt": "hello"})
    first = extract_zip(archive, tmp_path / "cache")
    (first / "marker").write_text("still here")
    assert extract_zip(archive, tmp_path / "cache") == first and (first / "marker").exists()
    make_zip(archive, {"d.txt": "changed"})
    assert extract_zip(archive, tmp_path / "cache") != first


def test_a_folder_named_like_a_zip_is_refused_not_read(tmp_path):
    (tmp_path / "fake.zip").mkdir()
    with pytest.raises(ArchiveError, match="not a regular file"):
        check_zip(tmp_path / "fake.zip")
