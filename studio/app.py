"""Builds the studio's gr.Blocks from the five tab modules and launches it over one workspace.

The services (registry, job manager, loaded chat models) are created per app and handed to each tab's
`build`; nothing is module-global, so two apps in one process (as in tests) never share a run or a model.
"""

from __future__ import annotations

import webbrowser
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import gradio as gr

from .jobs import JobManager
from .store import Store
from .tabs import chat, dataset, metrics, models, train
from .tabs.chat import ModelCache

TITLE = "Apertis Studio"
TIMER_S = 2.0  # the Metrics and Train tabs refresh this often (the spec asks for at least every 2 s)


@dataclass
class Services:
    store: Store
    jobs: JobManager
    models: ModelCache = field(default_factory=ModelCache)


def make_services(workspace: str | Path) -> Services:
    store = Store(workspace)
    services = Services(store=store, jobs=JobManager(store))
    models.register_bundled_models(services)
    return services


def build_app(services: Services) -> gr.Blocks:
    """The whole UI; each tab wires its own handlers, and the few cross-tab links are made here."""
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"## {TITLE}\nWorkspace: `{services.store.root}`")
        with gr.Tabs() as tabs:
            with gr.Tab("Dataset", id="dataset") as dataset_tab:
                data_ui = dataset.build(services)
            with gr.Tab("Train", id="train") as train_tab:
                train_ui = train.build(services, TIMER_S)
            with gr.Tab("Metrics", id="metrics") as metrics_tab:
                metrics_ui = metrics.build(services, TIMER_S)
            with gr.Tab("Models", id="models") as models_tab:
                models_ui = models.build(services)
            with gr.Tab("Chat", id="chat") as chat_tab:
                chat_ui = chat.build(services)
        # Lists go stale when another tab (or a worker) adds something: refresh them on entering a tab.
        dataset_tab.select(data_ui["refresh"], None, data_ui["refresh_outputs"], api_visibility="private")
        train_tab.select(train_ui["refresh"], None, train_ui["refresh_outputs"], api_visibility="private")
        metrics_tab.select(metrics_ui["refresh"], None, metrics_ui["refresh_outputs"], api_visibility="private")
        models_tab.select(models_ui["refresh"], None, models_ui["refresh_outputs"], api_visibility="private")
        chat_tab.select(chat_ui["refresh"], None, chat_ui["refresh_outputs"], api_visibility="private")
        models_ui["to_chat"].click(
            partial(chat.select_model, services), models_ui["selected"], [chat_ui["model"], tabs], api_visibility="private"
        )
    return app


def launch(workspace: Path, host: str, port: int, auth: tuple[str, str] | None, open_browser: bool, max_upload: str) -> None:
    """Start the job watcher, build the UI and serve it until interrupted."""
    services = make_services(workspace)
    services.jobs.poll()  # re-attach live workers and mark dead ones before the first page is drawn
    services.jobs.start_watcher()
    app = build_app(services)
    app.queue(default_concurrency_limit=4)
    _, local_url, _ = app.launch(
        server_name=host, server_port=port, auth=auth, inbrowser=False, share=False, prevent_thread_lock=True,
        allowed_paths=[str(services.store.root)], max_file_size=max_upload, enable_monitoring=False,
        footer_links=["api"], show_error=True, quiet=True, ssr_mode=False,
    )
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/"
    print(f"Apertis Studio is running at {url} (workspace {services.store.root}). Press Ctrl+C to quit.", flush=True)
    if open_browser:
        webbrowser.open(url)
    try:
        app.block_thread()
    finally:
        services.jobs.close()
        app.close()
