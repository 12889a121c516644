"""Models tab: the trained, imported and demo models with their cards; load one into Chat, export it as a
zip, import a bundle zip, delete (with a confirmation step). A run's checkpoints are listed under it on
request: a newcomer wants the models, not every snapshot the trainer kept.

Checkpoints are found in the run folders each time the list is drawn and registered, so the registry
always matches the disk (the trainer prunes old checkpoints on its own).
"""

from __future__ import annotations

import json
import re
import shutil
import time
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from apertis_core.filenames import BUNDLE_FILES

from ..jobs import PACKAGE_PARENT
from ..listings import kind_label, listed_models, model_options, step_of
from ..store import new_id

TABLE_HEADERS = ["model", "kind", "created", "id"]
SHOW_CHECKPOINTS = "models.show_checkpoints"  # the toggle, kept in the workspace's settings across restarts
NO_MODEL = "Pick a model to see its card."
# An absolute path in a card (one written before cards hid them, or an imported one): the folders a model
# was made in are nobody's business once it is shared. A path starts after a space, "(" or the line start,
# so relative paths (data/x.txt) and URLs (https://...) are left alone.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/\\])(?:[A-Za-z]:)?[\\/](?:[^\s|,`'\"()\\/]+[\\/])*([^\s|,`'\"()\\/]+)")


def _is_model_folder(path: Path) -> bool:
    return all((path / name).is_file() for name in BUNDLE_FILES)


def register_bundled_models(services) -> None:
    """Register the demo model(s) shipped in the repository's assets/ (read-only: never deleted)."""
    assets = PACKAGE_PARENT / "assets"
    for folder in sorted(p for p in assets.glob("**/") if _is_model_folder(p)) if assets.is_dir() else []:
        card = folder / "README.md"
        services.store.add_model(
            f"demo: {folder.name}", folder, kind="demo", card=card.read_text(encoding="utf-8") if card.exists() else ""
        )


def sync_checkpoints(services) -> None:
    """Register every checkpoint on disk; drop registry rows whose folder is gone."""
    from apertis_core.training import list_checkpoints

    for run in services.store.list_runs():
        for path in list_checkpoints(run["out_dir"]) if Path(run["out_dir"]).is_dir() else []:
            if _is_model_folder(Path(path)):
                name = f"{run['name']} · step {step_of(Path(path))}"
                services.store.add_model(name, path, kind="checkpoint", run_id=run["id"])
    for row in services.store.list_models():
        if not Path(row["path"]).is_dir():
            services.store.delete_model(row["id"])


# -- the list ---------------------------------------------------------------------------------------


def _show_checkpoints(services) -> bool:
    return bool(services.store.get_setting(SHOW_CHECKPOINTS, False))


def models_table(services, show_checkpoints: bool | None = None) -> list[list[Any]]:
    """The table's rows as the registry holds them (reads only: sync_checkpoints brings it up to date)."""
    show = _show_checkpoints(services) if show_checkpoints is None else show_checkpoints
    return [
        [
            ("↳ " if folded else "") + row["name"],
            kind_label(row),
            time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created"])),
            row["id"],
        ]
        for row, folded in listed_models(services, show)
    ]


def _options(services, show_checkpoints: bool | None = None) -> list[tuple[str, str]]:
    return model_options(services, _show_checkpoints(services) if show_checkpoints is None else show_checkpoints)


def _listing(services) -> tuple[list[list[Any]], gr.Dropdown]:
    """The list as on disk: checkpoints the trainer wrote or pruned since the last look are registered first."""
    sync_checkpoints(services)
    return models_table(services), gr.Dropdown(choices=_options(services))


def refresh(services) -> tuple[list[list[Any]], gr.Dropdown, gr.Checkbox]:
    """On entering the tab: the list as on disk, and the toggle as remembered (the page was built earlier)."""
    return *_listing(services), gr.Checkbox(value=_show_checkpoints(services))


def toggle_checkpoints(services, show: bool, selected: str | None) -> tuple[list[list[Any]], gr.Dropdown]:
    """Show or fold away the checkpoints (remembered for next time); a hidden selection moves to the first model."""
    services.store.set_setting(SHOW_CHECKPOINTS, bool(show))
    options = _options(services, bool(show))
    ids = [model_id for _, model_id in options]
    value = selected if selected in ids else (ids[0] if ids else None)
    return models_table(services, show_checkpoints=bool(show)), gr.Dropdown(choices=options, value=value)


# -- the card ---------------------------------------------------------------------------------------


def show_card(services, model_id: str | None) -> str:
    """The selected model's card: a trained model's is titled with its run's name and names its dataset;
    a checkpoint's says which run and step it is. No card shows a path on this computer."""
    row = services.store.get_model(model_id) if model_id else None
    if row is None:
        return NO_MODEL
    if row["kind"] == "checkpoint":
        return _checkpoint_card(services, row)
    card = Path(row["path"]) / "README.md"
    text = card.read_text(encoding="utf-8") if card.exists() else row["card"] or "_No model card in this folder._"
    if row["kind"] == "bundle" and row["run_id"]:
        text = edit_card(text, _run_name(services, row), _dataset_rows(services, row))
    return hide_paths(text)


def model_folder(services, model_id: str | None) -> str:
    """Where the selected model is on this computer (shown beside its card, never in it)."""
    row = services.store.get_model(model_id) if model_id else None
    return f"Folder: `{row['path']}`" if row else ""


def show_model(services, model_id: str | None) -> tuple[str, str]:
    return show_card(services, model_id), model_folder(services, model_id)


def edit_card(text: str, title: str | None = None, rows: dict[str, Any] | None = None) -> str:
    """A card (as apertis_core writes them: a "# title" and a | key | value | table) with its title and the
    named rows replaced; a row the card lacks is added at the end of its table."""
    lines = text.split("\n")
    if title:
        heading = next((i for i, line in enumerate(lines) if line.startswith("# ")), None)
        if heading is None:
            lines[:0] = [f"# {title}", ""]
        else:
            lines[heading] = f"# {title}"
    table = [i for i, line in enumerate(lines) if line.startswith("|")]
    for key, value in (rows or {}).items():
        row = f"| {key} | {str(value).replace('|', '/')} |"
        found = next((i for i in table if _row_key(lines[i]) == key), None)
        if found is not None:
            lines[found] = row
        elif table:
            table.append(table[-1] + 1)
            lines.insert(table[-1], row)
    return "\n".join(lines)


def hide_paths(text: str) -> str:
    """`text` with every absolute path cut to its last part (/home/me/data/x.jsonl -> x.jsonl)."""
    return _ABSOLUTE_PATH.sub(lambda match: match.group(1), text)


def _row_key(line: str) -> str:
    cells = line.strip().strip("|").split("|")
    return cells[0].strip() if len(cells) == 2 else ""


def _run_name(services, row: dict[str, Any]) -> str:
    run = services.store.get_run(row["run_id"]) if row["run_id"] else None
    return run["name"] if run else row["name"]


def _dataset_rows(services, row: dict[str, Any]) -> dict[str, str]:
    """{"dataset": its name in the Dataset tab} for a model trained here (the card knows only a folder name)."""
    run = services.store.get_run(row["run_id"]) if row["run_id"] else None
    dataset = services.store.get_dataset(run["dataset_id"]) if run and run["dataset_id"] else None
    return {"dataset": dataset["name"]} if dataset else {}


def _checkpoint_facts(services, row: dict[str, Any]) -> dict[str, Any]:
    """What the trainer's meta.json says about a checkpoint (step, tokens, losses), and its dataset."""
    try:
        meta = json.loads((Path(row["path"]) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    facts = {"step": step_of(Path(row["path"]))}
    if meta.get("total_steps"):
        facts["step"] = f"{facts['step']} of {meta['total_steps']}"
    facts |= {
        key.replace("_", " "): value
        for key, value in meta.items()
        if key in ("tokens_seen", "train_loss", "val_loss") and value is not None
    }
    return facts | _dataset_rows(services, row)


def _checkpoint_card(services, row: dict[str, Any]) -> str:
    run, step = _run_name(services, row), step_of(Path(row["path"]))
    rows = "\n".join(
        f"| {key} | {f'{value:.4f}' if isinstance(value, float) else value} |"
        for key, value in _checkpoint_facts(services, row).items()
    )
    return hide_paths(
        f"# {run} · step {step}\n\nA checkpoint: the model as it was at step {step} of the run **{run}**, saved so "
        "training can resume. Load it into Chat to try it, or export it as a model of its own.\n\n"
        f"| | |\n|---|---|\n{rows}\n"
    )


# -- export, import, delete -------------------------------------------------------------------------


def export_zip(services, model_id: str | None) -> str | None:
    """A zip of the bundle with the card the tab shows (a checkpoint is saved as a clean bundle first: no
    optimizer state)."""
    row = services.store.get_model(model_id) if model_id else None
    if row is None:
        gr.Warning("Pick a model to export.")
        return None
    folder = services.store.tmp_dir / "exports"
    folder.mkdir(parents=True, exist_ok=True)
    source, card = Path(row["path"]), None
    if row["kind"] == "checkpoint":
        try:
            source = _checkpoint_bundle(services, row, folder / f"{row['id']}-bundle")
        except (OSError, ValueError) as exc:  # a damaged checkpoint, or one too big to load here
            gr.Warning(f"Cannot export {row['name']}: {exc}")
            return None
    elif (source / "README.md").is_file():
        card = show_card(services, row["id"])  # as the tab shows it: the run's name, the dataset's, no paths
    name = re.sub(r"[^\w.-]+", "_", row["name"]).strip("_") or "model"
    return str(_zip_bundle(source, folder / f"{name}-{row['id']}.zip", card))


def _checkpoint_bundle(services, row: dict[str, Any], dest: Path) -> Path:
    from apertis_core.bundle import load_bundle, save_bundle

    run, step = _run_name(services, row), step_of(Path(row["path"]))
    model, tokenizer = load_bundle(row["path"])
    facts = {**_checkpoint_facts(services, row), "exported from": f"checkpoint step {step} of {run}"}
    return save_bundle(dest, model, tokenizer, facts, title=f"{run} · step {step}")


def _zip_bundle(folder: Path, archive: Path, card: str | None) -> Path:
    """Zip `folder`'s files (top level in the zip, as import expects); `card` replaces its README.md."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            if not (card is not None and name == "README.md"):
                zf.write(path, name)
        if card is not None:
            zf.writestr("README.md", card)
    return archive


def import_bundle(services, upload: str | None) -> tuple[str, list[list[Any]], gr.Dropdown]:
    """API `import_model`: unpack a bundle zip into models/ under the archive policy every zip the app opens
    keeps to; only the bundle's files are kept (never pickles), and the model is checked, and sized against
    free memory, before it is registered. A refused zip leaves nothing in models/."""
    if not upload:
        return "Choose a bundle .zip first.", *_listing(services)
    from apertis_core.bundle_zip import unpack_bundle
    from apertis_core.llama_import import import_llama_zip, is_hf_zip

    name = Path(upload).name
    dest = services.store.models_dir / new_id("import")
    # A zip of a Hugging Face Llama folder (config.json with model_type, *.safetensors, tokenizer.json) is
    # converted into a bundle under the same archive policy; anything else is unpacked as a bundle zip.
    unpack = import_llama_zip if is_hf_zip(upload) else unpack_bundle
    try:
        left_out = unpack(upload, dest, work_dir=services.store.tmp_dir / "imports")
    except (OSError, ValueError) as exc:  # ArchiveError and BundleError are ValueErrors
        shutil.rmtree(dest, ignore_errors=True)  # unpack_bundle writes nothing there unless it succeeds
        return f"Import failed: {import_refusal(name, exc)}", *_listing(services)
    card = dest / "README.md"
    services.store.add_model(
        Path(upload).stem,
        dest,
        kind="bundle",
        card=card.read_text(encoding="utf-8", errors="replace") if card.exists() else "",
    )
    return f"Imported {name}.{left_out_note(left_out)}", *_listing(services)


def import_refusal(name: str, exc: BaseException) -> str:
    """One line: what is wrong with the zip and what to do (an archive refusal carries its hint)."""
    hint = getattr(exc, "hint", None)
    if hint:  # the archive policy's words: "member 'x' is a symbolic link; refusing the archive"
        return f"{name}: {exc} — {hint}."
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}."
    return str(exc)


def left_out_note(names: list[str]) -> str:
    """What an import did not keep (anything but the bundle's own files; pickles are never stored)."""
    if not names:
        return ""
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f" Left out {len(names)} file{'s' if len(names) > 1 else ''} a model does not need ({shown}): an import "
        "keeps model.safetensors, config.json, tokenizer.json, README.md and meta.json, and never pickled files."
    )


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
        return "Nothing deleted: pick a model first.", gr.Button(visible=False), *_listing(services)
    folder = Path(row["path"]).resolve()
    if folder.is_relative_to(services.store.root):  # never remove anything outside the workspace
        shutil.rmtree(folder, ignore_errors=True)
    services.store.delete_model(row["id"])
    table, _ = _listing(services)
    options = _options(services)
    return (
        f"Deleted {row['name']}.",
        gr.Button(visible=False),
        table,
        gr.Dropdown(choices=options, value=options[0][1] if options else None),
    )  # the card follows


HELP = (
    "Every model you have trained or imported. Pick one to read its card, load it into Chat, export it as a "
    ".zip to use elsewhere, or import a model folder someone gave you as a .zip: an Apertis bundle, or a "
    "Hugging Face Llama folder (config.json, *.safetensors, tokenizer.json), which becomes a bundle."
)


def build(services) -> dict[str, Any]:
    gr.Markdown(HELP)
    # No checkpoint sync while the page is built: it imports torch (about 2 s of start-up), and selecting
    # the tab syncs anyway. A plain list for the choices: a gr.Dropdown made here would be drawn on the page.
    show = _show_checkpoints(services)
    options = _options(services, show)
    first = options[0][1] if options else None
    table = gr.Dataframe(headers=TABLE_HEADERS, value=models_table(services, show_checkpoints=show), interactive=False)
    with gr.Row():
        selected = gr.Dropdown(label="Model", choices=options, value=first, scale=3)
        checkpoints = gr.Checkbox(
            label="Show checkpoints", value=show, scale=1, info="the snapshots saved during training, under their run"
        )
        to_chat, export = gr.Button("Load into Chat", variant="primary"), gr.Button("Export zip")
        delete = gr.Button("Delete", variant="stop")
    confirm = gr.Button(visible=False, variant="stop")
    message = gr.Markdown()
    with gr.Row():
        with gr.Column(scale=2):
            card = gr.Markdown(show_card(services, first))  # the card of the model picked by default
            folder = gr.Markdown(model_folder(services, first))
        with gr.Column():
            download = gr.File(label="Exported bundle", interactive=False)
            upload = gr.File(label="Import a bundle (.zip)", file_types=[".zip"])
    selected.change(partial(show_model, services), selected, [card, folder], api_visibility="private")
    checkpoints.input(
        partial(toggle_checkpoints, services), [checkpoints, selected], [table, selected], api_visibility="private"
    )
    export.click(partial(export_zip, services), selected, download, api_name="export_model")
    upload.upload(partial(import_bundle, services), upload, [message, table, selected], api_name="import_model")
    delete.click(partial(ask_delete, services), selected, [message, confirm], api_visibility="private")
    confirm.click(
        partial(delete_model, services), selected, [message, confirm, table, selected], api_visibility="private"
    )
    return {
        "selected": selected,
        "to_chat": to_chat,
        "refresh": partial(refresh, services),
        "refresh_outputs": [table, selected, checkpoints],
    }
