"""`apertis bench vqa` runs end to end at toy size: data, training, per-kind scoring and its report."""

import json

from benchmarks import vqa


def test_vqa_benchmark_reports_each_question_kind(tmp_path, capsys):
    toy = [
        "--minutes", "0", "--scenes", "20", "--data", str(tmp_path / "shapes"), "--workdir", str(tmp_path / "work"),
        "--json", str(tmp_path / "result.json"),
        "--set", "train.max_steps=2", "--set", "train.batch_size=4", "--set", "train.warmup_steps=1",
        "--set", "model.image_encoder=vit", "--set", "model.d_model=32", "--set", "model.n_layers=4",
        "--set", "data.val_fraction=0",
    ]  # fmt: skip
    assert vqa.main(toy) == 0
    report = capsys.readouterr().out
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["steps"] == 2
    summary = json.loads((tmp_path / "shapes" / "summary.json").read_text())
    for kind in ("nonrel", "rel"):
        value, count = result["accuracy"][kind]
        assert 0.0 <= value <= 1.0 and count > 0
        assert f"{value:.1%}" in report
    assert (
        sum(count for name, (_, count) in result["accuracy"].items() if "/" not in name) == summary["records"]["test"]
    )
    assert "Command: apertis bench vqa --minutes 0" in report
