"""The ViT's conv stem (`model.image_stem: conv`) and a frozen start for the image encoder
(`train.encoder_frozen_steps`): shapes, sizes, bundles, refusals, and that frozen means unchanged."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from apertis_core import ApertisModel, Tokenizer, load_bundle, save_bundle
from apertis_core.configio import ConfigError
from apertis_core.model import ModelConfig
from apertis_core.sizing import parameter_count
from apertis_core.training import RunConfig, TrainConfig, train
from apertis_core.training.optim import build_optimizer, set_learning_rate
from apertis_core.vision import num_image_tokens, preprocess_image

from conftest import tiny_image_config

TOK = Tokenizer.byte_level()


def conv_config(**changes) -> ModelConfig:
    return tiny_image_config(TOK).replace(image_stem="conv", **changes)


@pytest.mark.parametrize("patch", [2, 4, 8, 16])
def test_conv_stem_gives_one_token_per_patch_and_sizing_counts_it(patch):
    cfg = conv_config(image_patch_size=patch, image_max_patches=256)
    model = ApertisModel(cfg).eval()
    image = preprocess_image(Image.new("RGB", (40, 24), "red"), patch, cfg.image_max_patches)  # padded to the grid
    (tokens,) = model.vision([image])
    assert tokens.shape == (num_image_tokens(image, patch), cfg.d_model)
    assert parameter_count(cfg) == model.num_parameters()


def test_conv_stem_reaches_past_its_patch_where_a_patch_projection_does_not():
    image = torch.zeros(3, 32, 32)
    poked = image.clone()
    poked[:, 9:11, 6:8] = 3.0  # inside patch (1, 0), next to its border with patch (1, 1)
    for stem, reaches in (("patch", False), ("conv", True)):
        torch.manual_seed(0)
        cfg = ModelConfig(d_model=32, n_heads=4, image_encoder="vit", image_stem=stem, image_patch_size=8,
                          image_max_patches=16, image_encoder_layers=0)  # fmt: skip
        encoder = ApertisModel(cfg).vision.backbone.eval()
        with torch.no_grad():
            change = (encoder([poked])[0] - encoder([image])[0]).norm(dim=-1).view(4, 4)
        assert change[1, 0] > 0
        assert bool(change[1, 1] > 1e-6) == reaches  # token (1, 1) sees the dot only through the stem's overlap


def test_conv_stem_refusals_name_the_field():
    with pytest.raises(ConfigError, match="image_stem conv"):
        conv_config(image_patch_size=12)
    with pytest.raises(ConfigError, match="image_stem conv"):
        tiny_image_config(TOK).replace(image_encoder="resnet18", image_stem="conv")
    with pytest.raises(ConfigError, match="image_stem"):
        tiny_image_config(TOK).override(["image_stem=convolution"])
    with pytest.raises(ConfigError, match="encoder_frozen_steps"):
        TrainConfig(encoder_frozen_steps=-1)


def test_a_conv_stem_bundle_keeps_its_batch_norm_statistics(tmp_path):
    model = ApertisModel(conv_config())
    images = [torch.rand(3, 32, 32) for _ in range(4)]
    model.vision(images)  # training mode: the batch-norm running statistics move off their start
    model.eval()
    save_bundle(tmp_path / "b", model, TOK)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["image_stem"] == "conv"
    assert any(name.endswith("running_mean") for name in load_file(tmp_path / "b" / "model.safetensors"))
    loaded, _ = load_bundle(tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(loaded.vision(images[:1])[0], model.vision(images[:1])[0])


def test_a_frozen_encoder_keeps_its_weights_while_the_rest_learns():
    model = ApertisModel(conv_config())
    optimizer = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), torch.device("cpu"), separate_encoder=True)
    image = torch.rand(3, 16, 16)
    ids = torch.tensor([[10, *[TOK.image_id] * 4, 11, 12]])

    def step(frozen: bool) -> tuple[float, float]:
        encoder = [p.detach().clone() for p in model.vision.parameters()]
        embed = model.embed.weight.detach().clone()
        set_learning_rate(optimizer, 1e-2, encoder_frozen=frozen)
        model(ids, images=[image]).logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        moved = max(
            float((p.detach() - b).abs().max()) for p, b in zip(model.vision.parameters(), encoder, strict=True)
        )
        return moved, float((model.embed.weight.detach() - embed).abs().max())

    encoder_moved, embed_moved = step(frozen=True)
    assert encoder_moved == 0.0 < embed_moved  # exactly: lr 0 also stops AdamW's decoupled weight decay
    assert step(frozen=False)[0] > 0


def test_training_holds_the_encoder_for_the_first_steps_then_trains_it(tmp_path, picture):
    (tmp_path / "data.jsonl").write_text(
        "".join(json.dumps({"image": str(picture), "text": f"a red square, number {i}"}) + "\n" for i in range(8))
    )
    run = RunConfig.from_dict({
        "model": {"preset": "apertis-hybrid-nano", "d_model": 32, "n_layers": 2, "n_heads": 2, "n_experts": 0,
                  "image_encoder": "vit", "image_stem": "conv", "image_patch_size": 8, "image_max_patches": 16,
                  "image_encoder_layers": 1},
        "data": {"path": str(tmp_path / "data.jsonl"), "seq_len": 64, "vocab_size": 262, "val_fraction": 0.0},
        "train": {"batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "max_steps": 3, "encoder_frozen_steps": 2,
                  "save_every": 1, "keep_last": 5, "eval_every": 0, "log_every": 1, "precision": "fp32"},
        "out_dir": str(tmp_path / "run"),
    })  # fmt: skip
    train(run)
    steps = [load_file(tmp_path / "run" / "checkpoints" / f"step_{n:07d}" / "model.safetensors") for n in (1, 2, 3)]
    encoder = [n for n in steps[0] if n.startswith("vision.") and "running_" not in n and "num_batches" not in n]
    language = [n for n in steps[0] if n.startswith("blocks.")]
    assert encoder and language
    assert all(torch.equal(steps[0][n], steps[1][n]) for n in encoder)  # steps 1 and 2: held
    assert any(not torch.equal(steps[1][n], steps[2][n]) for n in encoder)  # step 3: trains
    assert any(not torch.equal(steps[0][n], steps[1][n]) for n in language)  # the rest learns all along
    assert RunConfig.load(tmp_path / "run" / "run.yaml").train.encoder_frozen_steps == 2
