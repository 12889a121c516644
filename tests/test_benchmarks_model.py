"""The model benchmark runs end to end at toy sizes and prints every table (the numbers are not checked)."""

import json

import torch

from benchmarks import model as bench

TABLES = [
    "### Machine",
    "### 1. SLA core vs causal SDPA",
    "### 2. Training tokens/s",
    "### 3. Decode per token",
    "### 4. AES (MoE) layer vs dense SwiGLU FFN",
]


def test_quick_run_prints_every_table_and_writes_json(capsys, tmp_path):
    threads = torch.get_num_threads()
    try:
        # One thread: on a busy machine each multi-threaded tiny op can wait milliseconds for a core.
        code = bench.main(["--quick", "--threads", "1", "--json", str(tmp_path / "results.json")])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert code == 0
    for title in TABLES:
        assert title in printed, f"missing table {title!r}"
    assert "parameter counts differ by" in printed  # the matched transformer is described
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"machine", "attention", "train", "decode", "moe"} <= set(results)


def test_unknown_section_is_an_error(capsys):
    try:
        bench.main(["--only", "atention"])
    except SystemExit as exit_:
        assert exit_.code == 2
    else:
        raise AssertionError("an unknown --only section must fail")
    assert "atention" in capsys.readouterr().err
