"""Metrics charts: traces per run and key, overlays, the expert heat map and the sample timeline."""

from studio.charts import all_figures, expert_heatmap, metric_figure, sample_timeline


def _rows(*items):
    return [{"step": s, "key": k, "value": v} for s, k, v in items]


RUN_A = _rows(
    (10, "train/loss", 3.0),
    (20, "train/loss", 2.5),
    (20, "val/loss", 2.7),
    (10, "lr", 1e-3),
    (10, "experts/layer1", [0.25, 0.75]),
    (20, "experts/layer1", [0.5, 0.5]),
    (20, "sample/prompt", "Once"),
    (20, "sample/text", "upon"),
    (30, "sample/prompt", "The"),
    (30, "sample/text", "end"),
)
RUN_B = _rows((10, "train/loss", 3.2), (20, "train/loss", 2.9))


def test_loss_chart_has_train_and_val_traces():
    figure = metric_figure({"a": RUN_A}, "loss")
    assert sorted(t.name for t in figure.data) == ["train/loss", "val/loss"]
    train = next(t for t in figure.data if t.name == "train/loss")
    assert list(train.x) == [10, 20] and list(train.y) == [3.0, 2.5]


def test_overlay_names_traces_by_run():
    figure = metric_figure({"a": RUN_A, "b": RUN_B}, "loss")
    assert {t.name for t in figure.data} == {"a · train/loss", "a · val/loss", "b · train/loss"}


def test_chart_without_data_says_so():
    figure = metric_figure({"b": RUN_B}, "mfu")
    assert not figure.data and "no data yet" in figure.layout.annotations[0].text


def test_expert_heatmap_rows_are_layer_expert_and_columns_steps():
    heat = expert_heatmap(RUN_A).data[0]
    assert list(heat.x) == [10, 20] and list(heat.y) == ["layer1 · e0", "layer1 · e1"]
    assert [list(r) for r in heat.z] == [[0.25, 0.5], [0.75, 0.5]]
    assert not expert_heatmap(RUN_B).data


def test_sample_timeline_newest_first():
    assert sample_timeline(RUN_A) == [[30, "The", "end"], [20, "Once", "upon"]]


def test_all_figures_covers_every_chart():
    assert set(all_figures({"a": RUN_A})) == {"loss", "lr", "grad_norm", "throughput", "mfu", "system", "experts"}
