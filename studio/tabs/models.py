"""Models tab: every bundle and checkpoint with its model card; load into Chat, export as a zip, import a
bundle zip, and delete (with a confirmation step).

Checkpoints are found in the run folders each time the list is drawn and registered, so the registry
always matches the disk (the trainer prunes old checkpoints on its own).
"""

from __future__ import annotations

import shutil
import time
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from ..jobs import PACKAGE_PARENT
from ..store import new_id

MAX_IMPORT_BYTES = 4 * 2**30  # an unzipped bundle larger than this is refused (zip bombs)
BUNDLE_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def _is_model_folder(path: Path) -> bool:
    return all((path / name).is_file() for name in BUNDLE_FILES)


def register_bundled_models(services) -> None:
    """Register the demo model(s) shipped in the repository's assets/ (read-only: never deleted)."""
    assets = PACKAGE_PARENT / "assets"
    for folder in sorted(p for p in assets.glob("**/") if _is_model_folder(p)) if assets.is_dir() else []:
        card = folder / "README.md"
        services.store.add_model(f"demo: {folder.name}", folder, kind="demo", card=card.read_text(encoding="utf-8") if card.exists() else "")


def sync_checkpoints(services) -> None:
    """Register every checkpoint on disk; drop registry rows whose folder is gone."""
    from apertis_core.training import list_checkpoints

    for run in services.store.list_runs():
        for path in list_checkpoints(run["out_dir"]) if Path(run["out_dir"]).is_dir() else []:
            if _is_model_folder(Path(path)):
                services.store.add_model(f"{run['name']} @ {Path(path).name}", path, kind="checkpoint", run_id=run["id"])
    for row in services.store.list_models():
        if not Path(row["path"]).is_dir():
            services.store.delete_model(row["id"])


def models_table(services, sync: bool = True) -> list[list[Any]]:
    if sync:
        sync_checkpoints(services)
    return [[m["id"], m["name"], m["kind"], m["run_id"] or "", time.strftime("%Y-%m-%d %H:%M", time.localtime(m["created"]))]
            for m in services.store.list_models()]


def _options(services) -> list[tuple[str, str]]:
    return [(f"{m['name']} · {m['kind']}", m["id"]) for m in services.store.list_models()]


def _choices(services) -> gr.Dropdown:
    return gr.Dropdown(choices=_options(services))


def refresh(services) -> tuple[list[list[Any]], gr.Dropdown]:
    return models_table(services), _choices(services)


def show_card(services, model_id: str | None) -> str:
    row = services.store.get_model(model_id) if model_id else None
    if row is None:
        return "Pick a model to see its card."
    card = Path(row["path"]) / "README.md"
    text = card.read_text(encoding="utf-8") if card.exists() else row["card"] or "_No model card in this folder._"
    return f"{text}\n\n`{row['path']}`"


def export_zip(services, model_id: str | None) -> str | None:
    """A zip of the bundle (a checkpoint is exported as a clean bundle first: no optimizer state)."""
    row = services.store.get_model(model_id) if model_id else None
    if row is None:
        gr.Warning("Pick a model to export.")
        return None
    folder = services.store.tmp_dir / "exports"
    source = Path(row["path"])
    if row["kind"] == "checkpoint":
        from apertis_core.bundle import load_bundle, save_bundle

        source = folder / f"{row['id']}-bundle"
        model, tokenizer = load_bundle(row["path"])
        save_bundle(source, model, tokenizer, {"exported from": row["name"]})
    archive = shutil.make_archive(str(folder / f"{Path(row['name']).name.replace(' ', '_')}-{row['id']}"), "zip", source)
    return archive


def _safe_extract(archive: Path, dest: Path) -> Path:
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        if sum(m.file_size for m in members) > MAX_IMPORT_BYTES:
            raise ValueError("the zip unpacks to more than 4 GiB; that is not a small-model bundle")
        for m in members:
            target = (dest / m.filename).resolve()
            if not target.is_relative_to(dest.resolve()):
                raise ValueError(f"the zip entry {m.filename!r} points outside its folder; refusing to unpack it")
        zf.extractall(dest)
    found = [p for p in [dest, *dest.glob("*/")] if _is_model_folder(p)]
    if not found:
        raise ValueError(f"no {', '.join(BUNDLE_FILES)} found in the zip; export the bundle from a studio or `apertis export`")
    return found[0]


def import_bundle(services, upload: str | None) -> tuple[str, list[list[Any]], gr.Dropdown]:
    if not upload:
        return "Choose a bundle .zip first.", *refresh(services)
    dest = services.store.models_dir / new_id("import")
    try:
        from apertis_core.bundle import load_bundle

        folder = _safe_extract(Path(upload), dest)
        load_bundle(folder)  # refuse corrupt or mismatched bundles now, not at chat time
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        return f"Import failed: {exc}", *refresh(services)
    card = folder / "README.md"
    services.store.add_model(Path(upload).stem, folder, kind="bundle", card=card.read_text(encoding="utf-8") if card.exists() else "")
    return f"Imported {Path(upload).name}.", *refresh(services)


def ask_delete(services, model_id: str | None) -> tuple[str, gr.Button]:
    row = services.store.get_model(model_id) if model_id else None
    if row is None:
        return "Pick a model to delete.", gr.Button(visible=False)
    if row["kind"] == "demo":
        return "The demo model ships with the app and cannot be deleted.", gr.Button(visible=False)
    return f"Delete **{row['name']}** and its folder for good?", gr.Button(f"Yes, delete {row['name']}", visible=True)


def delete_model(services, model_id: str | None) -> tuple[str, gr.Button, list[list[Any]], gr.Dropdown]:
    row = services.store.get_model(model_id) if model_id else None
    if row is None:
        return "Nothing deleted: pick a model first.", gr.Button(visible=False), *refresh(services)
    folder = Path(row["path"]).resolve()
    if folder.is_relative_to(services.store.root):  # never remove anything outside the workspace
        shutil.rmtree(folder, ignore_errors=True)
    services.store.delete_model(row["id"])
    return f"Deleted {row['name']}.", gr.Button(visible=False), *refresh(services)


def build(services) -> dict[str, Any]:
    # No checkpoint sync while the page is built: it imports torch (about 2 s of start-up), and selecting
    # the tab syncs anyway. A plain list for the choices: a gr.Dropdown made here would be drawn on the page.
    table = gr.Dataframe(headers=["id", "name", "kind", "run", "created"], value=models_table(services, sync=False),
                         interactive=False)
    with gr.Row():
        selected = gr.Dropdown(label="Model", choices=_options(services), scale=3)
        to_chat, export = gr.Button("Load into Chat", variant="primary"), gr.Button("Export zip")
        delete = gr.Button("Delete", variant="stop")
    confirm = gr.Button(visible=False, variant="stop")
    message = gr.Markdown()
    with gr.Row():
        card = gr.Markdown("Pick a model to see its card.")
        with gr.Column():
            download = gr.File(label="Exported bundle", interactive=False)
            upload = gr.File(label="Import a bundle (.zip)", file_types=[".zip"])
    selected.change(partial(show_card, services), selected, card, api_visibility="private")
    export.click(partial(export_zip, services), selected, download, api_name="export_model")
    upload.upload(partial(import_bundle, services), upload, [message, table, selected], api_name="import_model")
    delete.click(partial(ask_delete, services), selected, [message, confirm], api_visibility="private")
    confirm.click(partial(delete_model, services), selected, [message, confirm, table, selected], api_visibility="private")
    return {"selected": selected, "to_chat": to_chat, "refresh": partial(refresh, services), "refresh_outputs": [table, selected]}
