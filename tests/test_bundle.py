"""Bundles: save -> load gives identical logits; tied weights stored once; damaged or mismatched bundles
fail with an error that says what is wrong."""

import json

import pytest
import torch
from safetensors.torch import load_file

from apertis_core import ApertisModel
from apertis_core.bundle import BundleError, atomic_directory, load_bundle, save_bundle
from apertis_core.tokenizer import Tokenizer

from conftest import tiny_config


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.byte_level()  # 262 tokens, no training needed


def model_for(tokenizer, preset="apertis-nano", **overrides):
    return ApertisModel(tiny_config(preset, vocab_size=tokenizer.vocab_size, **overrides)).eval()


@pytest.mark.parametrize("preset", ["apertis-nano", "transformer-nano"])
def test_round_trip_gives_identical_logits(tmp_path, tokenizer, preset):
    model = model_for(tokenizer, preset)
    save_bundle(tmp_path / "b", model, tokenizer, card={"steps": 5, "val_loss": 1.25, "data": {"path": "x.txt"}})
    loaded, tok = load_bundle(tmp_path / "b")
    ids = torch.randint(0, tokenizer.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert tok.to_json_str() == tokenizer.to_json_str()
    assert not loaded.training and loaded.config == model.config
    card = (tmp_path / "b" / "README.md").read_text()
    assert preset in card and "val loss | 1.2500" in card and f"{model.num_parameters():,}" in card


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path, tokenizer):
    model = model_for(tokenizer, tie_embeddings=True)
    save_bundle(tmp_path / "b", model, tokenizer)
    stored = load_file(tmp_path / "b" / "model.safetensors")
    assert "embed.weight" in stored and "lm_head.weight" not in stored
    loaded, _ = load_bundle(tmp_path / "b")
    assert loaded.lm_head.weight is loaded.embed.weight


def test_compiled_and_wrapped_modules_save_without_prefixes(tmp_path, tokenizer):
    model = model_for(tokenizer, "transformer-nano")

    class Wrapper(torch.nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    save_bundle(tmp_path / "b", Wrapper(model), tokenizer)
    assert all(not k.startswith("_orig_mod") for k in load_file(tmp_path / "b" / "model.safetensors"))
    load_bundle(tmp_path / "b")


def test_config_json_carries_the_format_version(tmp_path, tokenizer):
    save_bundle(tmp_path / "b", model_for(tokenizer), tokenizer)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    assert config["format_version"] == 1 and config["preset"] == "apertis-nano"
    config["format_version"] = 99
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(tmp_path / "b")


def test_missing_file_is_named(tmp_path, tokenizer):
    save_bundle(tmp_path / "b", model_for(tokenizer), tokenizer)
    (tmp_path / "b" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="no tokenizer.json"):
        load_bundle(tmp_path / "b")
    with pytest.raises(BundleError, match="no such model folder"):
        load_bundle(tmp_path / "nowhere")


def test_truncated_weights_are_reported_as_damaged(tmp_path, tokenizer):
    save_bundle(tmp_path / "b", model_for(tokenizer), tokenizer)
    weights = tmp_path / "b" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(BundleError, match="damaged or not a safetensors file"):
        load_bundle(tmp_path / "b")


def test_weights_from_a_different_config_are_rejected(tmp_path, tokenizer):
    save_bundle(tmp_path / "b", model_for(tokenizer, d_model=32), tokenizer)
    save_bundle(tmp_path / "wider", model_for(tokenizer, d_model=48), tokenizer)
    (tmp_path / "b" / "model.safetensors").write_bytes((tmp_path / "wider" / "model.safetensors").read_bytes())
    with pytest.raises(
        BundleError, match=r"different config.*embed.weight: saved \(262, 48\), config needs \(262, 32\).*re-export"
    ):
        load_bundle(tmp_path / "b")


def test_tokenizer_that_disagrees_with_the_config_is_rejected(tmp_path, tokenizer):
    save_bundle(tmp_path / "b", model_for(tokenizer), tokenizer)
    Tokenizer.train(["hello world " * 50], vocab_size=300).save(tmp_path / "b" / "tokenizer.json")
    with pytest.raises(BundleError, match="tokenizer.json has .* tokens but config.json says vocab_size 262"):
        load_bundle(tmp_path / "b")


def test_failed_save_leaves_the_previous_bundle_intact(tmp_path, tokenizer):
    first = model_for(tokenizer)
    save_bundle(tmp_path / "b", first, tokenizer)
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}

    class Broken:
        vocab_size = tokenizer.vocab_size

        def save(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_bundle(tmp_path / "b", model_for(tokenizer), Broken())
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no temporary folder left behind


def test_atomic_directory_replaces_an_existing_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old.txt").write_text("old")
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "new.txt").write_text("new")
        assert (tmp_path / "d" / "old.txt").exists()  # nothing changes until the body succeeds
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_card_is_titled_by_run_and_names_data_without_paths(tmp_path, tokenizer):
    """A run's final/ bundle is titled with the run folder's name; the card names its dataset by file name
    and shows no absolute path, whatever the facts it was given."""
    data = tmp_path / "home" / "someone" / "stories" / "train.jsonl"
    card = {"steps": 7, "data": {"path": str(data), "records": 3}, "exported from": str(tmp_path / "runs" / "x")}
    save_bundle(tmp_path / "runs" / "my-run" / "final", model_for(tokenizer), tokenizer, card)
    text = (tmp_path / "runs" / "my-run" / "final" / "README.md").read_text()
    assert text.startswith("# my-run\n") and "| dataset | train.jsonl |" in text and "| data | records: 3 |" in text
    assert "| exported from | x |" in text and str(tmp_path) not in text and "someone" not in text
    save_bundle(
        tmp_path / "b", model_for(tokenizer), tokenizer, {"data": {"path": "C:\\Users\\me\\d.txt"}}, title="mine"
    )
    text = (tmp_path / "b" / "README.md").read_text()
    assert text.startswith("# mine\n") and "| dataset | d.txt |" in text and "Users" not in text
