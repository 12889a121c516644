"""Dataset tab: upload files, a folder or a zip; add the demo data; validate, preview, count; train a tokenizer.

Every dataset is copied into the workspace (datasets/<id>/) before it is read, so runs never depend on
Gradio's temporary upload folder, and the registry keeps the validation summary for the other tabs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from ..charts import length_histogram
from ..store import new_id

PREVIEW_ROWS = 20
GALLERY_IMAGES = 12
DEMO_SHAPES_SCENES = 400  # enough for a few minutes of CPU training, written in about a second

HELP = (
    "Add what your model should learn from (files, a folder, a .zip or demo data), then train on it in the Train "
    "tab. Each dataset is checked as it is added: the report lists every problem with its file and line."
)


@dataclass(frozen=True)
class Layout:
    """One way to lay out training data, as the upload box lists it."""

    name: str
    files: str  # which files to give
    example: str  # shown as code; for .jsonl a real line (the tests read each one back)
    note: str  # what else to know, in a few words (Markdown)
    kind: str  # the kind apertis_core's reader gives its records ("" for a zip: whatever it holds)


_CHAT = '[{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": "A cat."}]'
# Every layout apertis_core's data readers accept (apertis_core/data/formats.py); written out here because
# the page is built without importing apertis_core (it brings torch). Tests check each against the readers.
LAYOUTS = (
    Layout("Plain text", ".txt .md", "Once upon a time...", "each file is one document", "text"),
    Layout("Text records", ".jsonl", '{"text": "Once upon a time..."}', "one JSON object per line", "text"),
    Layout("Chat", ".jsonl", f'{{"messages": {_CHAT}}}', "roles: system, user, assistant", "chat"),
    Layout("Image + caption", ".jsonl", '{"image": "cat.png", "caption": "A cat on a mat."}',
           '"text" works as well as "caption"; image paths are relative to the .jsonl file', "image+caption"),
    Layout("Image + messages", ".jsonl", f'{{"image": "cat.png", "messages": {_CHAT}}}',
           "the picture goes where a user turn says `<image>`, else before the first", "image chat"),
    Layout("Image folder", "images + .txt", "cat.png + cat.txt", "each image with its caption in a .txt of the same name",
           "image+caption"),
    Layout("Table", ".csv", "A cat on a mat.,cat.png", "under a header row `text,image`; the image column is optional",
           "image+caption"),
    Layout("Zip", ".zip", "my-data.zip", "any of these zipped, folders kept; upload it on its own", ""),
)  # fmt: skip


def layouts_markdown() -> str:
    """The upload box's list of accepted layouts, one line and one example each."""
    lines = [f"- **{layout.name}** ({layout.files}): `{layout.example}` — {layout.note}" for layout in LAYOUTS]
    return "**What you can add**\n" + "\n".join(lines)


def dataset_choices(services) -> list[tuple[str, str]]:
    out = []
    for row in services.store.list_datasets():
        records = (row.get("summary") or {}).get("records", "?")
        out.append((f"{row['name']} · {records} record{'' if records == 1 else 's'}", row["id"]))
    return out


def select_dataset(services, dataset_id: str | None) -> gr.Dropdown:
    """The dataset list with `dataset_id` picked (unchanged pick when it is empty, as after an error)."""
    choices = dataset_choices(services)
    return gr.Dropdown(choices=choices, value=dataset_id) if dataset_id else gr.Dropdown(choices=choices)


def _copy_uploads(paths: list[str], dest: Path) -> Path:
    """Copy uploads into `dest`; a lone .zip stays one file (the data loader opens zips itself)."""
    files = [Path(p) for p in paths]
    zips = [p for p in files if p.suffix.lower() == ".zip"]
    if zips and len(files) > 1:
        raise ValueError("upload a .zip on its own, or plain files and folders without a .zip")
    dest.mkdir(parents=True, exist_ok=True)
    if zips:
        return Path(shutil.copy2(zips[0], dest / zips[0].name))
    for src in files:
        target, n = dest / src.name, 1
        while target.exists():  # two uploads with one name (from different folders) must both survive
            target, n = dest / f"{src.stem}-{n}{src.suffix}", n + 1
        shutil.copy2(src, target)
    return dest


def register(services, name: str, path: Path) -> tuple[str, str]:
    """Validate `path` and record it; returns (dataset id, the validation report as text)."""
    from apertis_core.data import validate_dataset

    report = validate_dataset(path, cache_dir=services.store.tmp_dir / "unzipped")
    summary = {**report.stats, "problems": len(report.problems), "report": report.to_text()}
    return services.store.add_dataset(name, path, summary), report.to_text()


def upload_dataset(services, files: list[str] | None, name: str | None) -> tuple[str, str]:
    """API `upload_dataset`: files (paths) -> (report text, the new dataset's id or "" if none was added)."""
    paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]
    if not paths:
        return "Choose files, a folder or a .zip first, then press Add.", ""
    name = (name or "").strip() or Path(paths[0]).stem
    folder = services.store.datasets_dir / new_id("data")
    try:
        path = _copy_uploads(paths, folder)
        dataset_id, report = register(services, name, path)
    except (OSError, ValueError) as exc:
        shutil.rmtree(folder, ignore_errors=True)
        return f"Could not add the dataset: {exc}", ""
    return report, dataset_id


def add_demo(services, kind: str) -> tuple[str, str]:
    """API `add_demo_data`: kind 'shapes' (image Q&A) or 'text' -> (report, the new dataset's id)."""
    folder = services.store.datasets_dir / new_id("demo")
    try:
        if kind == "shapes":
            from apertis_core.data.shapes import generate_shapes

            generate_shapes(folder, n=DEMO_SHAPES_SCENES, questions_per_kind=3)
            dataset_id, report = register(services, "demo: shapes Q&A", folder / "train.jsonl")
        elif kind == "text":
            from apertis_core.data.demo_text import write_demo_text

            dataset_id, report = register(services, "demo: text sample", write_demo_text(folder / "sample.txt"))
        else:
            return f"Unknown demo {kind!r}; choose 'shapes' or 'text'.", ""
    except (OSError, ValueError) as exc:
        return f"Could not write the demo data: {exc}. Check the workspace folder is writable.", ""
    return report, dataset_id


def inspect_dataset(services, dataset_id: str | None) -> tuple[str, list[list[Any]], list[tuple[str, str]], Any]:
    """(report, preview rows [source, kind, text], gallery [(image, caption)], length histogram)."""
    row = services.store.get_dataset(dataset_id) if dataset_id else None
    if row is None:
        return "Pick a dataset, or add one above.", [], [], length_histogram({})
    from apertis_core.data import load_dataset

    try:
        records, report = load_dataset(row["path"], cache_dir=services.store.tmp_dir / "unzipped")
    except OSError as exc:
        return f"Cannot read {row['path']}: {exc}. Add the dataset again.", [], [], length_histogram({})
    preview, gallery = [], []
    for record in records[:PREVIEW_ROWS]:
        text = " | ".join(record.texts())
        preview.append([f"{record.source}:{record.line}", record.kind_label, text[:300]])
    for record in (r for r in records if r.images):
        gallery += [(str(image), " ".join(record.texts())[:120]) for image in record.images]
        if len(gallery) >= GALLERY_IMAGES:
            break
    return report.to_text(), preview, gallery[:GALLERY_IMAGES], length_histogram(report.stats.get("length", {}))


def train_tokenizer(services, dataset_id: str | None, vocab_size: float) -> str:
    """Train a tokenizer on the dataset and keep it beside the data; the Train tab then reuses it."""
    row = services.store.get_dataset(dataset_id) if dataset_id else None
    if row is None:
        return "Pick a dataset first."
    from apertis_core.data import load_dataset
    from apertis_core.tokenizer import Tokenizer

    records, _ = load_dataset(row["path"], cache_dir=services.store.tmp_dir / "unzipped")
    if not records:
        return "The dataset has no usable records; fix the problems in the report first."
    tokenizer = Tokenizer.train((t for r in records for t in r.texts()), vocab_size=int(vocab_size))
    path = services.store.datasets_dir / f"{dataset_id}-tokenizer.json"
    tokenizer.save(path)
    services.store.update_dataset_summary(dataset_id, tokenizer=str(path))
    sample = "The red circle is left of the square."
    return f"Tokenizer with {tokenizer.vocab_size} tokens saved to {path}.\n'{sample}' -> {len(tokenizer.encode(sample))} tokens."


def build(services) -> dict[str, Any]:
    gr.Markdown(HELP)
    with gr.Row():
        with gr.Column(scale=2):
            files = gr.File(label="Files or one .zip (.txt .md .jsonl .csv, images)", file_count="multiple")
            gr.Markdown(layouts_markdown())
            folder = gr.File(label="…or a whole folder", file_count="directory")
            name = gr.Textbox(label="Name", placeholder="my-data")
            add = gr.Button("Add dataset", variant="primary")
        with gr.Column(scale=1):
            gr.Markdown("**Demo data** (made on this computer)")
            demo_shapes = gr.Button("Add shapes Q&A (images)")
            demo_text = gr.Button("Add text sample")
            demo_kind = gr.Textbox(visible=False)
    choice = gr.Dropdown(label="Dataset", choices=dataset_choices(services), interactive=True, allow_custom_value=True)
    report = gr.Textbox(label="Validation report", lines=12, max_lines=30)
    with gr.Row():
        histogram = gr.Plot(label="Length histogram")
        gallery = gr.Gallery(label="Images", columns=6, height=260)
    preview = gr.Dataframe(headers=["source", "kind", "text"], label="Preview", interactive=False, wrap=True)
    with gr.Row():
        vocab = gr.Number(label="Tokenizer vocabulary size", value=2048, precision=0, minimum=262, maximum=65536)
        tok_btn = gr.Button("Train tokenizer")
    tok_out = gr.Textbox(label="Tokenizer", lines=2)

    new_id_box = gr.Textbox(visible=False)
    pick = partial(select_dataset, services)
    inspect_outputs = [report, preview, gallery, histogram]
    add.click(partial(upload_dataset, services), [files, name], [report, new_id_box], api_name="upload_dataset").then(
        pick, new_id_box, choice, api_visibility="private"
    )
    folder.upload(
        partial(upload_dataset, services), [folder, name], [report, new_id_box], api_visibility="private"
    ).then(pick, new_id_box, choice, api_visibility="private")
    for button, kind in ((demo_shapes, "shapes"), (demo_text, "text")):
        button.click(lambda k=kind: k, None, demo_kind, api_visibility="private").then(
            partial(add_demo, services), demo_kind, [report, new_id_box], api_visibility="private"
        ).then(pick, new_id_box, choice, api_visibility="private")
    gr.Button(visible=False).click(
        partial(add_demo, services), demo_kind, [report, new_id_box], api_name="add_demo_data"
    )
    choice.change(partial(inspect_dataset, services), choice, inspect_outputs, api_visibility="private")
    tok_btn.click(partial(train_tokenizer, services), [choice, vocab], tok_out, api_name="train_tokenizer")
    refresh = lambda: gr.Dropdown(choices=dataset_choices(services))  # noqa: E731 - keeps the current pick
    return {"choice": choice, "refresh": refresh, "refresh_outputs": [choice]}
