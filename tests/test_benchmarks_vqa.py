"""`apertis bench vqa` runs end to end at toy size: data, training the model and the baselines, per-kind scoring
beside chance and the most common answer, and its report."""

import json

import pytest

from benchmarks import vqa


def test_vqa_benchmark_reports_each_model_and_question_kind(tmp_path, capsys):
    toy = [
        "--minutes", "0", "--scenes", "20", "--data", str(tmp_path / "shapes"), "--workdir", str(tmp_path / "work"),
        "--json", str(tmp_path / "result.json"), "--baseline-steps", "2",
        "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "train.warmup_steps=1",
        "--set", "model.image_encoder=vit", "--set", "model.d_model=32", "--set", "model.n_layers=4",
        "--set", "data.val_fraction=0",
    ]  # fmt: skip
    assert vqa.main(toy) == 0
    report = capsys.readouterr().out
    result = json.loads((tmp_path / "result.json").read_text())
    summary = json.loads((tmp_path / "shapes" / "summary.json").read_text())
    assert list(result["models"]) == ["apertis", "cnn_mlp", "rn"]
    for name, model in result["models"].items():
        assert model["steps"] == 2, name
        for kind in ("nonrel", "rel"):
            value, count = model["accuracy"][kind]
            assert 0.0 <= value <= 1.0 and count > 0
            assert f"{value:.1%}" in report
        kinds = [count for group, (_, count) in model["accuracy"].items() if "/" not in group]
        assert sum(kinds) == summary["records"]["test"]
    chance, common = result["chance"]["nonrel/hpos"][0], result["common"]["nonrel/hpos"][0]
    assert chance == 0.5 and 0.5 <= common <= 1.0  # two answers, left or right
    assert "| questions | held-out | chance | most common | apertis | cnn_mlp | rn | target |" in report
    assert "Command: apertis bench vqa --minutes 0" in report


def test_models_option_picks_what_runs_and_refuses_unknown_names(tmp_path, capsys):
    args = ["--minutes", "0", "--scenes", "20", "--data", str(tmp_path), "--baseline-steps", "1", "--json"]
    assert vqa.main([*args, str(tmp_path / "r.json"), "--models", "rn"]) == 0
    assert list(json.loads((tmp_path / "r.json").read_text())["models"]) == ["rn"]
    with pytest.raises(SystemExit):
        vqa.main(["--models", "rn,resnet"])
    assert "unknown model resnet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vqa.main(["--minutes", "0", "--models", "cnn_mlp"])  # no budget at all
    assert "the baselines need a budget" in capsys.readouterr().err


def test_a_kept_set_is_reused_only_when_it_is_this_benchmarks_scenes(tmp_path):
    from apertis_core.data.shapes import generate_shapes

    folder = tmp_path / "shapes"
    generate_shapes(folder, n=20, seed=0, n_objects=3, conversations=True)  # same seed and size, other scenes
    vqa.prepare_data(folder, scenes=20, seed=0)
    assert json.loads((folder / "summary.json").read_text())["n_objects"] == 6
    written = (folder / "train.jsonl").stat().st_mtime_ns
    vqa.prepare_data(folder, scenes=20, seed=0)
    assert (folder / "train.jsonl").stat().st_mtime_ns == written


def test_a_focused_set_is_kept_apart_from_the_full_one(tmp_path, capsys):
    folder = tmp_path / "shapes"
    vqa.prepare_data(folder, scenes=20, seed=0)
    full = (folder / "train.jsonl").read_text()
    vqa.prepare_data(folder, scenes=20, seed=0, ask=("farthest_colour",))  # not the full set: written anew
    focused = (folder / "train.jsonl").read_text()
    assert focused != full and "Describe the picture." not in focused and "farthest from" in focused
    assert json.loads((folder / "summary.json").read_text())["ask"] == ["farthest_colour"]
    with pytest.raises(SystemExit):
        vqa.main(["--ask", "shape,colours"])
    assert "unknown question type colours" in capsys.readouterr().err
