"""A newcomer's first session in headless Chromium, clicking what a person clicks: upload a text file and an
image+caption zip made here -> each validates -> start a 20-step run -> a loss point in Metrics -> a chat
reply from the new model -> export -> the zip holds the bundle files. A screenshot of every step goes to
test-output/browser/journey-*.png; a JavaScript error anywhere fails the test."""

import io
import json
import re
import zipfile

from PIL import Image, ImageDraw

from browser import open_page, screenshot, settle, sync_api
from conftest import HANG_GUARD_S

WAIT_MS = HANG_GUARD_S * 1000
TINY_MODEL = "model.d_model=32\nmodel.n_layers=2\nmodel.n_heads=2\ntrain.log_every=1"
BUNDLE_FILES = {"model.safetensors", "config.json", "tokenizer.json", "README.md"}


def make_uploads(folder):
    """(a text file, a zip of pictures with a captions.jsonl), as a person might have them on disk."""
    notes = folder / "my-notes.txt"
    notes.write_text("".join(f"Note {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(300)))
    pictures = folder / "pictures.zip"
    rows = []
    with zipfile.ZipFile(pictures, "w") as zf:
        for index, colour in enumerate(["red", "green", "blue", "yellow"] * 2):
            image = Image.new("RGB", (32, 32), "white")
            ImageDraw.Draw(image).ellipse((8, 8, 24, 24), fill=colour)
            png = io.BytesIO()
            image.save(png, "PNG")
            zf.writestr(f"img{index}.png", png.getvalue())
            rows.append(json.dumps({"image": f"img{index}.png", "caption": f"a {colour} circle"}) + "\n")
        zf.writestr("captions.jsonl", "".join(rows))
    return notes, pictures


def add_dataset(page, path, name) -> str:
    """Upload `path` on the Dataset tab under `name`; returns the validation report the tab shows."""
    page.get_by_role("tab", name="Dataset").click()
    upload = page.locator("input[type=file]").first
    if page.get_by_role("button", name="Clear").filter(visible=True).count():
        page.get_by_role("button", name="Clear").filter(visible=True).first.click()
    upload.set_input_files(str(path))
    page.get_by_label("Name", exact=True).fill(name)
    settle(page)
    page.get_by_role("button", name="Add dataset").click()
    added = page.get_by_label("Dataset", exact=True).filter(visible=True)  # the tab picks the new dataset
    sync_api().expect(added).to_have_value(re.compile(f"^{re.escape(name)} · "), timeout=WAIT_MS)
    report = page.get_by_label("Validation report").input_value()
    assert "no problems found" in report, report
    return report


def pick(page, label: str, option: str) -> None:
    """Choose the option whose text contains `option` in the visible dropdown labelled `label`."""
    page.get_by_label(label, exact=True).filter(visible=True).click()
    page.get_by_role("option", name=re.compile(re.escape(option))).first.click()
    settle(page)


def start_tiny_run(page) -> None:
    page.get_by_role("tab", name="Train").click()
    pick(page, "Dataset", "my notes")
    for label, value in [("Training steps", "20"), ("Examples per step (batch size)", "4"),
                         ("Tokens per example (sequence length)", "32")]:  # fmt: skip
        page.get_by_label(label, exact=True).fill(value)
    page.get_by_text("Advanced").filter(visible=True).first.click()
    page.get_by_label("Vocabulary size of a new tokenizer").fill("300")
    page.get_by_label("More settings, one key=value per line (e.g. model.d_model=128)").fill(TINY_MODEL)
    page.get_by_role("button", name="Start", exact=True).click()
    sync_api().expect(page.get_by_text(re.compile(r"— finished"))).to_be_visible(timeout=WAIT_MS)


# How many points the Metrics tab's charts draw for train/loss.
LOSS_POINTS_JS = """() => Math.max(0, ...Array.from(document.querySelectorAll('.js-plotly-plot'))
    .flatMap(plot => (plot.data || []).filter(trace => trace.name === 'train/loss'))
    .map(trace => (trace.x || []).length))"""


def test_newcomer_uploads_trains_watches_chats_and_exports(studio_url, tmp_path):
    expect = sync_api().expect
    notes, pictures = make_uploads(tmp_path)
    with open_page(tmp_path / "chromium-profile", height=1000) as (page, errors):
        page.goto(studio_url, wait_until="load")
        assert "records: 1 (1 text)" in add_dataset(page, notes, "my notes")
        screenshot(page, "journey-1-text-added")
        report = add_dataset(page, pictures, "pictures")
        assert "records: 8 (8 image+caption)" in report and "images: 8" in report
        screenshot(page, "journey-2-images-added")

        start_tiny_run(page)
        screenshot(page, "journey-3-trained")

        page.get_by_role("tab", name="Metrics").click()
        pick(page, "Runs (choose several to overlay)", "my notes")
        page.keyboard.press("Escape")
        page.wait_for_function(f"() => ({LOSS_POINTS_JS})() > 0", timeout=WAIT_MS)
        screenshot(page, "journey-4-metrics")

        page.get_by_role("tab", name="Chat").click()
        pick(page, "Model", "my notes")
        page.get_by_placeholder("Ask something; attach an image with the clip").fill("Note 3: the quick")
        page.keyboard.press("Enter")
        reply = page.locator('[data-testid="bot"]').first
        expect(reply).to_be_visible(timeout=WAIT_MS)
        settle(page)
        assert reply.inner_text().strip(), "the model's reply is empty"
        screenshot(page, "journey-5-chat")

        page.get_by_role("tab", name="Models").click()
        pick(page, "Model", "my notes")
        page.get_by_role("button", name="Export zip").click()
        link = page.locator("a[download]").filter(visible=True).first
        expect(link).to_be_visible(timeout=WAIT_MS)
        with page.expect_download() as download:
            link.click()
        with zipfile.ZipFile(download.value.path()) as exported:
            assert BUNDLE_FILES <= set(exported.namelist()), exported.namelist()
        screenshot(page, "journey-6-exported")
    assert not errors, "JavaScript errors in the studio page:\n" + "\n".join(errors)
