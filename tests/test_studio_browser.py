"""The studio in headless Chromium: every tab opens and draws, a screenshot of each, no JavaScript errors."""

from browser import open_page, screenshot, settle, sync_api

# Each tab and a label only that tab shows once its components have drawn.
TABS = {
    "Dataset": "Validation report",
    "Train": "Learning rate",
    "Metrics": "Runs (choose several to overlay)",
    "Models": "Import a bundle (.zip)",
    "Chat": "System prompt",
}


def test_every_tab_draws_without_javascript_errors(studio_url, tmp_path):
    expect = sync_api().expect
    with open_page(tmp_path / "chromium-profile") as (page, errors):
        page.goto(studio_url, wait_until="load")
        for name, label in TABS.items():
            tab = page.get_by_role("tab", name=name)
            tab.click()
            expect(tab).to_have_attribute("aria-selected", "true")
            expect(page.get_by_text(label).first).to_be_visible()
            settle(page)
            screenshot(page, name.lower())
        # The listener works: an error logged now is caught, so an empty list above means no errors.
        with page.expect_console_message(lambda message: message.type == "error"):
            page.evaluate("console.error('apertis-probe')")
    assert errors.pop().startswith("console: apertis-probe"), errors
    assert not errors, "JavaScript errors in the studio page:\n" + "\n".join(errors)
