"""Hostile and damaged model bundles, as folders (load_bundle, `apertis generate`) and as zips (the studio's
Models import). Every case must end in one clear message, with no uncaught error, no model built (so no
memory allocated for it), no pickle ever read, and nothing left behind.

The cases are tables: add a row to cover a new attack. Property tests (hypothesis) throw arbitrary config
values, safetensors headers and zip member names at the same code.
"""

import json
import math
import os
import pickle
import re
import shutil
import struct
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import apertis_core.bundle as bundle_module
import apertis_core.bundle_zip as bundle_zip_module
from apertis_core import ApertisModel
from apertis_core.bundle import BundleError, load_bundle, save_bundle
from apertis_core.bundle_zip import unpack_bundle
from apertis_core.cli.main import main as apertis
from apertis_core.tokenizer import Tokenizer

from conftest import tiny_config

BIG_TENSOR = 1 << 24  # elements: far more than any tensor of the tiny bundle these cases start from


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A small, valid bundle every case starts from."""
    tokenizer = Tokenizer.byte_level()
    model = ApertisModel(tiny_config("apertis-nano", vocab_size=tokenizer.vocab_size))
    folder = tmp_path_factory.mktemp("good") / "bundle"
    save_bundle(folder, model, tokenizer, card={"steps": 1})
    return folder


@dataclass
class Guard:
    built: list = field(default_factory=list)  # configs a real (not meta-device) model was built from
    big: list = field(default_factory=list)  # shapes of large tensors asked for
    unpickled: list = field(default_factory=list)


@pytest.fixture
def guard(monkeypatch) -> Guard:
    """Records every real model built, every large tensor asked for and every unpickling, refusing the
    latter two outright: a hostile bundle must be refused before any of them happen."""
    seen = Guard()
    real_model, real_empty = bundle_module.ApertisModel, torch.empty

    def on_meta() -> bool:  # inside `with torch.device("meta")`: shapes only, nothing allocated
        return torch.get_default_device().type == "meta"

    def model(cfg):
        if not on_meta():
            seen.built.append(cfg)
        return real_model(cfg)

    def empty(*size, **kwargs):
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        if math.prod(shape) > BIG_TENSOR and not on_meta() and str(kwargs.get("device")) != "meta":
            seen.big.append(tuple(shape))
            raise AssertionError(f"a {tuple(shape)} tensor was allocated")
        return real_empty(*size, **kwargs)

    def unpickle(*args, **kwargs):
        seen.unpickled.append(args)
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(bundle_module, "ApertisModel", model)
    monkeypatch.setattr(torch, "empty", empty)
    for target, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(target, name, unpickle)
    return seen


# ---- building hostile files ------------------------------------------------------------------------------
def config_of(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def set_config(**changes) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps({**config_of(folder), **changes}))

    return mutate


def write_text(name: str, text: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_text(text)


def remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def write_safetensors(path: Path, header: dict, data: bytes, length: int | None = None) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)


def edit_header(change: Callable[[dict], None], data: Callable[[bytes], bytes] = lambda d: d) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        header, payload = read_safetensors(folder / "model.safetensors")
        change(header)
        write_safetensors(folder / "model.safetensors", header, data(payload))

    return mutate


def first_tensor(header: dict) -> str:
    return next(name for name in header if name != "__metadata__")


def weights_of_another_config(folder: Path) -> None:
    tokenizer = Tokenizer.byte_level()
    other = folder.parent / "wider"
    save_bundle(
        other, ApertisModel(tiny_config("apertis-nano", vocab_size=tokenizer.vocab_size, d_model=48)), tokenizer
    )
    shutil.copy(other / "model.safetensors", folder / "model.safetensors")
    shutil.rmtree(other)


def rename_tensor(header: dict) -> None:
    name = first_tensor(header)
    header["not.a.weight"] = header.pop(name)


def as_integers(header: dict) -> None:
    entry = header[first_tensor(header)]
    entry["dtype"] = "I32"  # same bytes per element as F32: only the type is wrong


def tokenizer_of_another_model(folder: Path) -> None:
    Tokenizer.train(["hello world " * 50], vocab_size=300).save(folder / "tokenizer.json")


def pickle_instead_of_safetensors(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))


def link(name: str, target: str) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).symlink_to(target)

    return mutate


def folder_named(name: str) -> Callable[[Path], None]:
    def mutate(folder: Path) -> None:
        (folder / name).unlink()
        (folder / name).mkdir()

    return mutate


def sparse(name: str, size: int) -> Callable[[Path], None]:
    """`name` grown to `size` bytes without using the disk (a sparse file): a size that must not be read."""

    def mutate(folder: Path) -> None:
        with (folder / name).open("r+b") as handle:
            handle.truncate(size)

    return mutate


def nested_once_more(folder: Path) -> None:
    inner = folder / "inner"
    inner.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (folder / name).rename(inner / name)


@dataclass
class Case:
    id: str
    mutate: Callable[[Path], None]
    message: str  # a regular expression the refusal must match
    free_memory: int | None = None  # pretend the computer has this much free (None: as it is)


DEEP_JSON = "[" * 100_000 + "]" * 100_000
CASES = [
    # config.json: sizes and values
    Case("huge dims", set_config(d_model=65536, n_layers=64), r"d_model is 65,536, beyond 32,768"),
    Case(
        "beyond free memory",
        set_config(d_model=1024, n_layers=24, n_heads=16),
        r"needs about [\d.]+ GB of memory, but this computer has 1.0 GB free\. Close other programs, or use a "
        r"smaller model",
        free_memory=10**9,
    ),
    Case(
        "over 100 billion parameters",
        set_config(d_model=32768, n_layers=1024, n_heads=256),
        r"trillion parameters .* more than any model this app can build",
    ),
    Case("negative width", set_config(d_model=-256), r"d_model is -256; it must be positive"),
    Case("zero heads", set_config(n_heads=0), r"n_heads is 0; it must be positive"),
    Case("negative ffn", set_config(ffn_hidden=-5), r"ffn_hidden is -5; it must be at least 0"),
    Case("huge vocabulary", set_config(vocab_size=10**7), r"vocab_size is 10,000,000, beyond"),
    Case("fractional width", set_config(d_model=256.5), r"d_model: expected an integer, got 256.5"),
    Case("text width", set_config(d_model="256px"), r"d_model: expected an integer, got '256px'"),
    Case("boolean depth", set_config(n_layers=True), r"n_layers: expected an integer, got True"),
    Case("list width", set_config(d_model=[256]), r"d_model: expected an integer"),
    Case(
        "nan epsilon",
        write_text("config.json", '{"preset": "apertis-nano", "norm_eps": NaN}'),
        r"norm_eps is nan; it must be a finite number",
    ),
    Case(
        "5000-digit number",
        write_text("config.json", '{"d_model": ' + "9" * 5000 + "}"),
        r"config.json cannot be read as JSON .*re-export",
    ),
    Case("unknown setting", set_config(d_modle=256), r"unknown .*d_modle.*Did you mean 'd_model'"),
    Case("unhashable preset", set_config(preset=["apertis-nano"]), r"config.json"),
    Case("newer format", set_config(format_version=99), r"format_version 99; this Apertis reads up to 1"),
    Case("format version text", set_config(format_version="1"), r"format_version 'str'"),
    Case("config not an object", write_text("config.json", "[1, 2, 3]"), r"must hold a JSON object"),
    Case("config not json", write_text("config.json", "d_model: 256"), r"cannot be read as JSON"),
    Case("config deeply nested", write_text("config.json", DEEP_JSON), r"cannot be read as JSON"),
    Case(
        "config of megabytes",
        write_text("config.json", " " * (2 << 20) + "{}"),
        r"config.json is 2.1 MB, more than a config.json can be \(1.0 MB\)",
    ),
    Case(
        "image token of another tokenizer",
        set_config(image_encoder="vit", image_token_id=7),
        r"marks images with token 7 but tokenizer.json's <image> is 2",
    ),
    # files
    Case("no weights", remove("model.safetensors"), r"has no model.safetensors"),
    Case("pickle instead of weights", pickle_instead_of_safetensors, r"has no model.safetensors"),
    Case("no tokenizer", remove("tokenizer.json"), r"has no tokenizer.json"),
    Case("no config", remove("config.json"), r"has no config.json"),
    Case("files one folder down", nested_once_more, r"has no config.json; a model folder needs"),
    Case("config is a device", link("config.json", "/dev/zero"), r"config.json is not a regular file"),
    Case("weights is a folder", folder_named("model.safetensors"), r"model.safetensors is not a regular file"),
    Case("dangling link", link("tokenizer.json", "/nonexistent/tokenizer.json"), r"has no tokenizer.json"),
    Case("tokenizer of gigabytes", sparse("tokenizer.json", 3 << 30), r"tokenizer.json is 3.2 GB, more than"),
    # tokenizer
    Case(
        "tokenizer of another model", tokenizer_of_another_model, r"tokenizer.json has \d+ tokens but config.json says"
    ),
    Case("tokenizer garbage", write_text("tokenizer.json", '{"model": 42}'), r"not a valid tokenizer.json"),
    Case("tokenizer empty", write_text("tokenizer.json", ""), r"not a valid tokenizer.json"),
    # weights: the header against the file, then against the config
    Case(
        "header length lies",
        lambda f: write_safetensors(f / "model.safetensors", {}, b"", length=1 << 62),
        r"damaged or not a safetensors file \(its header claims",
    ),
    Case(
        "header not json",
        lambda f: (f / "model.safetensors").write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{["),
        r"damaged .*header is not JSON",
    ),
    Case("file of two bytes", write_text("model.safetensors", "PK"), r"damaged or not a safetensors file"),
    Case(
        "offsets past the end",
        edit_header(lambda h: h[first_tensor(h)].update(data_offsets=[0, 1 << 40])),
        r"damaged .*does not match",
    ),
    Case(
        "shape lies about bytes",
        edit_header(lambda h: h[first_tensor(h)].update(shape=[1 << 20, 1 << 20])),
        r"damaged .*does not match",
    ),
    Case("data cut short", edit_header(lambda h: None, lambda d: d[:-100]), r"damaged .*header describes"),
    Case("data beyond header", sparse("model.safetensors", 100 << 30), r"damaged .*header describes"),
    Case(
        "unknown dtype", edit_header(lambda h: h[first_tensor(h)].update(dtype="F128")), r"damaged .*unreadable dtype"
    ),
    Case("negative shape", edit_header(lambda h: h[first_tensor(h)].update(shape=[-1])), r"damaged .*unreadable"),
    Case("metadata not text", edit_header(lambda h: h.update(__metadata__={"format": 1})), r"damaged .*__metadata__"),
    Case(
        "weights of another config",
        weights_of_another_config,
        r"different config .*saved \(262, 48\), config needs \(262, 32\).*re-export",
    ),
    Case("renamed tensor", edit_header(rename_tensor), r"different config .*missing .*unexpected not.a.weight"),
    Case(
        "integer weights", edit_header(as_integers), r"different config .*stored as I32, the model holds it as float32"
    ),
]


def files_under(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.lstat().st_size for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_bundle_folder_is_refused_before_it_is_built(case, good, tmp_path, guard, monkeypatch, capsys):
    folder = tmp_path / "bundle"
    shutil.copytree(good, folder)
    case.mutate(folder)
    if case.free_memory is not None:
        monkeypatch.setattr(
            "apertis_core.sizing.available_memory", lambda device="cpu": (case.free_memory, "this computer")
        )
    before = files_under(tmp_path)
    with pytest.raises(BundleError, match=case.message) as refused:
        load_bundle(folder)
    message = str(refused.value)
    assert str(folder) in message and len(message) < 1000, message  # says where, in a readable line
    assert guard.built == [] and guard.big == [] and guard.unpickled == []
    # The command line says the same in one line, exit code 2, no traceback.
    assert apertis(["generate", "--model", str(folder), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert files_under(tmp_path) == before  # nothing written


@pytest.mark.parametrize("encoder", ["resnet18", "vit"])
def test_image_bundles_load_with_their_integer_buffers(tmp_path, guard, encoder):
    """BatchNorm's batch counter is stored as an integer: the header check must take it as the model does."""
    tokenizer = Tokenizer.byte_level()
    cfg = tiny_config(
        "apertis-nano",
        vocab_size=tokenizer.vocab_size,
        image_encoder=encoder,
        image_patch_size=16,
        image_token_id=tokenizer.image_id,
    )
    save_bundle(tmp_path / "b", ApertisModel(cfg), tokenizer)
    model, _ = load_bundle(tmp_path / "b")
    assert model.config == cfg and len(guard.built) == 1


def test_the_shipped_demo_model_loads(guard):
    from conftest import REPO

    model, tokenizer = load_bundle(REPO / "assets" / "demo-model")
    assert model.config.image_encoder != "none" and tokenizer.vocab_size == model.config.vocab_size


def test_pickles_beside_a_good_bundle_are_never_read(good, tmp_path, guard):
    folder = tmp_path / "bundle"
    shutil.copytree(good, folder)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name in ("pytorch_model.bin", "trainer_state.pt", "extra.pkl"):
        (folder / name).write_bytes(pickle.dumps(Payload()))
    model, _ = load_bundle(folder)
    assert not marker.exists() and guard.unpickled == [] and len(guard.built) == 1


# ---- zips through the studio's import --------------------------------------------------------------------
@pytest.fixture
def services(tmp_path):
    from studio.app import Services
    from studio.jobs import JobManager
    from studio.store import Store

    store = Store(tmp_path / "ws")
    return Services(store=store, jobs=JobManager(store))


def zip_folder(folder: Path, archive: Path, prefix: str = "", extra: dict | None = None) -> Path:
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, prefix + path.name)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return archive


def with_config(good: Path, tmp: Path, **changes) -> Path:
    folder = tmp / "changed"
    shutil.copytree(good, folder)
    set_config(**changes)(folder)
    return folder


def symlink_member(archive: Path, good: Path) -> None:
    zip_folder(good, archive)
    with zipfile.ZipFile(archive, "a") as zf:
        info = zipfile.ZipInfo("README.md.link")
        info.external_attr = 0o120777 << 16  # a symbolic link, as `zip -y` stores one
        zf.writestr(info, "/etc/passwd")


def encrypted_member(archive: Path, good: Path) -> None:
    """A member flagged as encrypted (zipfile never writes one, so the flag is set in the written bytes)."""
    zip_folder(good, archive, extra={"notes.txt": "secret"})
    raw = bytearray(archive.read_bytes())
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local header, central directory
        start = 0
        while (at := raw.find(signature, start)) >= 0:
            start = at + 4
            name_at = at + (30 if flag_at == 6 else 46)
            if raw[name_at : name_at + 9] == b"notes.txt":
                raw[at + flag_at] |= 0x1
    archive.write_bytes(bytes(raw))


def oversized_weights(archive: Path, good: Path, tmp: Path) -> None:
    """3 MB of weights beside a config describing a model of ~10,000 parameters."""
    folder = with_config(good, tmp, d_model=8, n_heads=2)
    (folder / "model.safetensors").write_bytes(os.urandom(3 << 20))
    zip_folder(folder, archive)


def bomb(archive: Path, good: Path) -> None:
    """A 1 GiB model.safetensors of zeros that zips to about 1 MB, beside a valid config and tokenizer."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in ("config.json", "tokenizer.json"):
            zf.write(good / name, name)
        with zf.open("model.safetensors", "w", force_zip64=True) as out:
            zeros = bytes(16 << 20)
            for _ in range(64):
                out.write(zeros)


def duplicate_member(archive: Path, good: Path) -> None:
    zip_folder(good, archive)
    with zipfile.ZipFile(archive, "a") as zf:
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("config.json", json.dumps({"d_model": 65536}))


def many_members(archive: Path, good: Path) -> None:
    zip_folder(good, archive, extra={f"junk/{i}.txt": "" for i in range(10_001)})


def append_folder(archive: Path, folder: Path, prefix: str) -> None:
    with zipfile.ZipFile(archive, "a") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, prefix + path.name)


def replace_tokenizer(archive: Path, good: Path, tmp: Path) -> None:
    folder = tmp / "other-tokenizer"
    shutil.copytree(good, folder)
    tokenizer_of_another_model(folder)
    zip_folder(folder, archive)


def other_weights_zip(archive: Path, good: Path, tmp: Path) -> None:
    folder = tmp / "other-weights"
    shutil.copytree(good, folder)
    weights_of_another_config(folder)
    zip_folder(folder, archive)


@dataclass
class ZipCase:
    id: str
    make: Callable[[Path, Path, Path], None]  # (archive, good bundle, tmp folder)
    message: str
    extracts: bool = True  # whether anything may be extracted before the refusal


ZIP_CASES = [
    ZipCase("zip bomb of 1 GiB", lambda a, g, t: bomb(a, g), r"expands \d+x .*decompression bomb", extracts=False),
    ZipCase("zip-slip", lambda a, g, t: zip_folder(g, a, extra={"../../evil.txt": "x"}), r"zip-slip", extracts=False),
    ZipCase(
        "absolute path",
        lambda a, g, t: zip_folder(g, a, extra={"/tmp/evil.txt": "x"}),
        r"absolute path",
        extracts=False,
    ),
    ZipCase(
        "windows drive path",
        lambda a, g, t: zip_folder(g, a, extra={"C:/evil.txt": "x"}),
        r"absolute path",
        extracts=False,
    ),
    ZipCase("symlink member", lambda a, g, t: symlink_member(a, g), r"symbolic link", extracts=False),
    ZipCase("encrypted member", lambda a, g, t: encrypted_member(a, g), r"encrypted", extracts=False),
    ZipCase("duplicate names", lambda a, g, t: duplicate_member(a, g), r"appears twice", extracts=False),
    ZipCase(
        "ten thousand members", lambda a, g, t: many_members(a, g), r"10,005 entries .*limit 10,000", extracts=False
    ),
    ZipCase(
        "not a zip", lambda a, g, t: a.write_bytes(b"PK\x03\x04 but nothing else"), r"not a valid zip", extracts=False
    ),
    ZipCase("empty zip", lambda a, g, t: zipfile.ZipFile(a, "w").close(), r"no model in the zip", extracts=False),
    ZipCase(
        "only pickles",
        lambda a, g, t: zip_folder(t, a, extra={"pytorch_model.bin": pickle.dumps([1])}),
        r"no model in the zip",
        extracts=False,
    ),
    ZipCase(
        "two folders down",
        lambda a, g, t: zip_folder(g, a, prefix="a/b/"),
        r"no model in the zip: it needs .* "
        r"at its top or in one folder",
        extracts=False,
    ),
    ZipCase(
        "two models",
        lambda a, g, t: (zip_folder(g, a, prefix="one/"), append_folder(a, g, "two/")),
        r"holds 2 models \(one, two\)",
        extracts=False,
    ),
    ZipCase(
        "hostile config",
        lambda a, g, t: zip_folder(with_config(g, t, d_model=65536, n_layers=64), a),
        r"d_model is 65,536, beyond",
        extracts=False,
    ),
    ZipCase(
        "config too big for memory",
        lambda a, g, t: zip_folder(with_config(g, t, d_model=8192, n_layers=32), a),
        r"needs about .* of memory, but",
        extracts=False,
    ),
    ZipCase(
        "weights larger than the config",
        oversized_weights,
        r"model.safetensors is 3.1 MB, more than the [\d,]+ parameters",
        extracts=False,
    ),
    ZipCase("tokenizer of another model", replace_tokenizer, r"tokenizer.json has \d+ tokens but config.json says"),
    ZipCase("weights of another config", other_weights_zip, r"different config"),
]


def workspace_state(services) -> tuple:
    store = services.store
    return (
        files_under(store.models_dir),
        files_under(store.tmp_dir / "imports") if (store.tmp_dir / "imports").exists() else {},
        [row["id"] for row in store.list_models()],
    )


@pytest.mark.parametrize("case", ZIP_CASES, ids=[c.id for c in ZIP_CASES])
def test_hostile_zip_import_is_refused_and_leaves_nothing(case, good, tmp_path, services, guard, monkeypatch):
    from studio.tabs import models

    monkeypatch.setattr("apertis_core.sizing.available_memory", lambda device="cpu": (4 * 10**9, "this computer"))
    archive = tmp_path / "upload" / "bundle.zip"
    archive.parent.mkdir()
    (tmp_path / "scratch").mkdir()
    case.make(archive, good, tmp_path / "scratch")
    if not case.extracts:  # refused from the zip's directory and its config alone: nothing is written
        monkeypatch.setattr(bundle_zip_module, "safe_extract", lambda *a, **k: pytest.fail("extracted a refused zip"))
    before = workspace_state(services)
    message, table, _ = models.import_bundle(services, str(archive))
    assert message.startswith("Import failed: ") and re.search(case.message, message), message
    assert "Traceback" not in message and len(message) < 800
    assert workspace_state(services) == before  # no folder in models/, nothing waiting in tmp/, no registry row
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()
    assert guard.built == [] and guard.big == [] and guard.unpickled == []


def test_import_keeps_only_the_bundle_files(good, tmp_path, services, guard):
    from studio.tabs import models

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    extra = {
        "mymodel/pytorch_model.bin": pickle.dumps(Payload()),
        "mymodel/trainer_state.pt": pickle.dumps(Payload()),
        "mymodel/weights.pkl": pickle.dumps(Payload()),
        "mymodel/run.sh": "rm -rf ~",
        "__MACOSX/._config.json": "x",
    }
    archive = zip_folder(good, tmp_path / "mymodel.zip", prefix="mymodel/", extra=extra)
    message, _, _ = models.import_bundle(services, str(archive))
    assert message.startswith("Imported mymodel.zip.") and "Left out 4 files" in message, message
    assert "pytorch_model.bin" in message and "never pickled files" in message
    (row,) = [row for row in services.store.list_models() if row["kind"] == "bundle"]
    folder = Path(row["path"])
    assert folder.parent == services.store.models_dir
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    assert not marker.exists() and guard.unpickled == [] and guard.built == []  # checked, not built, at import
    assert list((services.store.tmp_dir / "imports").iterdir()) == []
    model, _ = bundle_module.load_bundle(folder)  # and it loads
    assert model.config == bundle_module.read_model_config(good / "config.json")


# ---- properties ------------------------------------------------------------------------------------------
FIELDS = [
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "ffn_hidden",
    "n_experts",
    "moe_top_k",
    "strc_every",
    "sla_chunk_size",
    "max_seq_len",
    "image_encoder",
    "norm_eps",
    "layer_pattern",
    "nope_layers",
    "format_version",
    "preset",
    "tie_embeddings",
]
VALUES = st.one_of(
    st.integers(min_value=-(10**6), max_value=10**6),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.booleans(),
    st.none(),
    st.lists(st.integers(min_value=-3, max_value=100), max_size=3),
    st.sampled_from(["S", "A", "SSSA", "vit", "apertis-large"]),
)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(changes=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4))
def test_any_config_values_load_or_are_refused_cleanly(good, tmp_path_factory, guard, changes):
    folder = tmp_path_factory.mktemp("prop") / "bundle"
    shutil.copytree(good, folder)
    (folder / "config.json").write_text(json.dumps({**config_of(good), **changes}))
    guard.built.clear()
    try:
        model, _ = load_bundle(folder)
    except BundleError as exc:
        assert str(exc) and guard.built == []  # refused before building
    else:
        assert len(guard.built) == 1 and model.num_parameters() < BIG_TENSOR
    assert guard.big == [] and guard.unpickled == []


@PROPERTY
@given(
    header=st.binary(max_size=200),
    length=st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
    tail=st.binary(max_size=64),
)
def test_any_weights_header_is_refused_cleanly(good, tmp_path_factory, guard, header, length, tail):
    folder = tmp_path_factory.mktemp("prop") / "bundle"
    shutil.copytree(good, folder)
    size = len(header) if length is None else length
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", size) + header + tail)
    with pytest.raises(BundleError, match=r"model.safetensors"):
        load_bundle(folder)
    assert guard.built == [] and guard.big == []


@PROPERTY
@given(names=st.lists(st.text(alphabet=st.sampled_from("ab./\\:.\x00 "), min_size=1, max_size=12), max_size=4))
def test_any_member_names_stay_inside_the_destination(good, tmp_path_factory, names):
    tmp = tmp_path_factory.mktemp("prop")
    archive = tmp / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names are part of the attack
        for path in sorted(good.iterdir()):
            zf.write(path, path.name)
        for name in names:
            try:
                zf.writestr(name, "x")
            except Exception:  # a name zipfile itself will not write: nothing to test
                pass
    dest = tmp / "models" / "m"
    outside_before = files_under(tmp)
    try:
        unpack_bundle(archive, dest, work_dir=tmp / "work")
    except (ValueError, OSError):
        assert not dest.exists()
    else:
        assert sorted(p.name for p in dest.iterdir()) <= [
            "README.md",
            "config.json",
            "model.safetensors",
            "tokenizer.json",
        ]
    written = set(files_under(tmp)) - set(outside_before)
    assert all(name.startswith(("models", "work")) for name in written), written
    assert not (tmp / "work").exists() or list((tmp / "work").iterdir()) == []
