"""Gated cross-attention to image patches, 2-D patch positions and the encoder's own learning rate.

With the options off a model is what it was; with cross-attention on, generation (prompt in parallel,
then `step`) still gives the parallel forward's logits because the patches travel in the state; bundles
with the new fields load in chat, the CLI and the studio.
"""

import io
import json
import sys

import pytest
import torch

from apertis_core import ApertisModel, Tokenizer, load_bundle, save_bundle
from apertis_core.cli.main import main
from apertis_core.configio import ConfigError
from apertis_core.generation import GenerationConfig, can_batch, generate, generate_many
from apertis_core.model.config import PLACE_FREQUENCIES
from apertis_core.model.cross_attention import GatedCrossAttention, ImageMemory
from apertis_core.sizing import parameter_count
from apertis_core.training import RunConfig, TrainConfig, train
from apertis_core.training.optim import build_optimizer, set_learning_rate
from apertis_core.vision import num_image_tokens
from apertis_core.vision.positions import Rope2D, grid_positions, patch_places

from conftest import tiny_config

IMAGE_ID = 5


def image_config(preset="apertis-nano", **overrides):
    settings = dict(image_encoder="vit", image_patch_size=8, image_max_patches=16, image_token_id=IMAGE_ID)
    return tiny_config(preset, **{**settings, **overrides})


def open_gates(model, value=1.0):
    """Fresh gates and place maps are 0 (a no-op); tests of what the layer reads need them to add something."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, GatedCrossAttention):
            module.gate.data.fill_(value)
            for param in module.place_parameters():
                torch.nn.init.normal_(param, std=0.5)
    return model


def with_images(*images, text=(10, 11, 12, 13, 14)):
    ids = [1, 2]
    for image in images:
        ids += [IMAGE_ID] * num_image_tokens(image, 8) + [7]
    return torch.tensor([ids + list(text)])


@pytest.mark.parametrize("preset", ["apertis-nano", "apertis-hybrid-nano"])
@pytest.mark.parametrize("image_pos", ["learned2d", "rope2d", "none", "learned2d+places", "none+relative"])
def test_step_after_the_prompt_matches_the_parallel_forward(preset, image_pos):
    pos, places, relative = image_pos.split("+")[0], image_pos.endswith("+places"), image_pos.endswith("+relative")
    config = image_config(
        preset, cross_attn_every=2, image_pos=pos, cross_attn_pos=places, cross_attn_relative_heads=2 * relative
    )
    model = open_gates(ApertisModel(config).eval())
    images = [torch.rand(3, 8, 32), torch.rand(3, 16, 16)]
    ids = with_images(*images)
    with torch.no_grad():
        full = model(ids, images=images).logits
        # The prompt in two pieces (one image each) and then single steps: the patches live in the state.
        split = 2 + num_image_tokens(images[0], 8) + 1
        state = model(ids[:, :split], images=images[:1], state=model.init_state(1)).state
        state = model(ids[:, split:-3], images=images[1:], state=state).state
        stepped = []
        for token in ids[0, -3:]:
            logits, state = model.step(token[None], state)
            stepped.append(logits[0])
    assert (full[0, -3:] - torch.stack(stepped)).abs().max() <= 1e-4


@pytest.mark.parametrize("relative_heads", [0, 2])
def test_batched_decoding_gives_each_prompt_what_it_gets_alone(relative_heads):
    config = image_config("apertis-hybrid-nano", cross_attn_every=1, cross_attn_relative_heads=relative_heads)
    model = open_gates(ApertisModel(config).eval())
    images = [[torch.rand(3, 8, 32)], [torch.rand(3, 16, 16), torch.rand(3, 8, 8)], None]
    prompts = [with_images(*(found or []))[0].tolist() for found in images]
    config = GenerationConfig(max_new_tokens=6, temperature=0.0, repetition_penalty=1.0)
    alone = [list(generate(model, ids, config, images=found)) for ids, found in zip(prompts, images, strict=True)]
    assert can_batch(model)
    together: list[list[int]] = [[] for _ in prompts]
    for index, token in generate_many(model, prompts, config, images=images):
        together[index].append(token)
    assert together == alone


def test_the_answer_reads_the_image_and_nothing_before_an_image_does():
    model = open_gates(ApertisModel(image_config(cross_attn_every=1)).eval())
    first, second, other = torch.rand(3, 8, 16), torch.rand(3, 8, 16), torch.rand(3, 8, 16)
    ids = with_images(first, second)
    with torch.no_grad():
        a = model(ids, images=[first, second]).logits
        b = model(ids, images=[first, other]).logits
        state = model(ids, images=[first, second], state=model.init_state(1)).state
        step_a, _ = model.step(torch.tensor([9]), state)
        state = model(ids, images=[first, other], state=model.init_state(1)).state
        step_b, _ = model.step(torch.tensor([9]), state)
    before_second = 2 + 2 + 1
    assert torch.equal(a[0, :before_second], b[0, :before_second])  # causal: a later image is not seen
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-4
    assert (step_a - step_b).abs().max() > 1e-4  # a generated token still reads the picture


def test_a_sample_without_images_is_unchanged_by_the_others_in_its_batch():
    model = open_gates(ApertisModel(image_config(cross_attn_every=1)).eval())
    image = torch.rand(3, 8, 24)
    with_image = with_images(image)
    text_only = torch.tensor([[1, 2, 3, 4, 6] + [8] * (with_image.shape[1] - 5)])
    with torch.no_grad():
        alone = model(text_only).logits
        batched = model(torch.cat([with_image, text_only]), images=[image]).logits
    assert (alone[0] - batched[1]).abs().max() <= 1e-5


def test_options_off_or_gates_closed_change_nothing():
    plain_cfg = image_config()
    cross_cfg = image_config(cross_attn_every=1, cross_attn_gate_init=0.0)
    assert plain_cfg.image_pos == "learned2d" and plain_cfg.cross_attn_every == 0  # defaults as before
    plain = ApertisModel(plain_cfg).eval()
    cross = ApertisModel(cross_cfg).eval()
    missing, unexpected = cross.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".xattn." in key for key in missing)
    image = torch.rand(3, 16, 16)
    ids = with_images(image)
    with torch.no_grad():
        assert torch.equal(plain(ids, images=[image]).logits, cross(ids, images=[image]).logits)  # gates at 0
        text = torch.tensor([[1, 2, 3, 4]])
        assert torch.equal(plain(text).logits, open_gates(cross)(text).logits)  # no image: reads nothing


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"cross_attn_every": 1},
        {"cross_attn_every": 2, "image_pos": "rope2d"},
        {"image_pos": "none"},
        {"cross_attn_every": 1, "cross_attn_pos": True},
        {"cross_attn_every": 2, "cross_attn_pos": True, "cross_attn_relative_heads": 3},
    ],
)
def test_sizing_counts_the_new_parameters(overrides):
    cfg = image_config("apertis-hybrid-nano", **overrides)
    assert parameter_count(cfg) == ApertisModel(cfg).num_parameters()


def test_bad_settings_are_clear_config_errors():
    with pytest.raises(ConfigError, match="cross_attn_every"):
        tiny_config("apertis-nano", cross_attn_every=1)  # no image encoder: nothing to attend to
    with pytest.raises(ConfigError, match="cross_attn_every"):
        image_config(cross_attn_every=-1)
    with pytest.raises(ConfigError, match="image_pos"):
        image_config().override(["image_pos=rope3d"])
    with pytest.raises(ConfigError, match="divisible by 4"):
        ApertisModel(image_config(d_model=24, n_heads=4, image_pos="rope2d"))  # head width 6
    with pytest.raises(ConfigError, match="encoder_lr_scale"):
        TrainConfig(encoder_lr_scale=0)
    with pytest.raises(ConfigError, match="cross_attn_relative_heads .* only with cross_attn_every > 0"):
        image_config(cross_attn_relative_heads=1)  # no cross-attention layer to add them to
    with pytest.raises(ConfigError, match="cross_attn_relative_heads must be between 0 and n_heads"):
        image_config(cross_attn_every=1, cross_attn_relative_heads=5)  # 4 ordinary heads to follow
    with pytest.raises(ConfigError, match="cross_attn_relative_init .* only with cross_attn_relative_heads"):
        image_config(cross_attn_every=1, cross_attn_relative_init=20.0)  # no relative heads to start
    with pytest.raises(ConfigError, match="cross_attn_relative_init must be >= 0"):
        image_config(cross_attn_every=1, cross_attn_relative_heads=2, cross_attn_relative_init=-1.0)
    assert image_config().override(["cross_attn_every=2", "image_pos=rope2d"]).cross_attn_every == 2


def test_rope2d_attention_depends_on_the_offset_between_patches_only():
    rope = Rope2D(8)
    grid = grid_positions(3, 4, "cpu")[None]  # (1, 12, 2)
    q, k = torch.randn(1, 1, 12, 8), torch.randn(1, 1, 12, 8)
    scores = rope.apply(q, rope.cos_sin(grid, q.dtype)) @ rope.apply(k, rope.cos_sin(grid, k.dtype)).transpose(-1, -2)
    moved = rope.cos_sin(grid + torch.tensor([5, 7]), q.dtype)  # every patch shifted by the same offset
    shifted = rope.apply(q, moved) @ rope.apply(k, moved).transpose(-1, -2)
    assert (scores - shifted).abs().max() <= 1e-4
    swapped = rope.cos_sin(grid.flip(-1), q.dtype)  # rows and columns exchanged: a different geometry
    assert (scores - rope.apply(q, swapped) @ rope.apply(k, swapped).transpose(-1, -2)).abs().max() > 1e-3


def test_the_encoder_learns_at_its_own_rate():
    model = ApertisModel(image_config(cross_attn_every=1))
    assert len(build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), torch.device("cpu")).param_groups) == 2  # as before
    optimizer = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), torch.device("cpu"), encoder_lr_scale=1e-6)
    encoder_before = [p.detach().clone() for p in model.vision.parameters()]
    head_before = model.embed.weight.detach().clone()
    image = torch.rand(3, 8, 16)
    model(with_images(image), images=[image]).logits.square().mean().backward()
    optimizer.step()
    encoder_moved = max((p - b).abs().max() for p, b in zip(model.vision.parameters(), encoder_before, strict=True))
    assert encoder_moved < 1e-6 < (model.embed.weight - head_before).abs().max()
    assert {group["lr"] for group in optimizer.param_groups} == {1e-2}  # the schedule's lr, unscaled


@pytest.fixture
def cross_bundle(tmp_path):
    pytest.importorskip("torchvision")
    from PIL import Image

    tokenizer = Tokenizer.byte_level()
    config = image_config(
        vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_id, max_seq_len=128,
        cross_attn_every=1, image_pos="rope2d", cross_attn_relative_heads=2,
    )  # fmt: skip
    save_bundle(tmp_path / "vlm", open_gates(ApertisModel(config).eval(), 0.5), tokenizer)
    Image.new("RGB", (40, 24), (200, 10, 10)).save(tmp_path / "red.png")
    return tmp_path / "vlm", tmp_path / "red.png"


def test_bundles_with_the_new_fields_load_in_the_cli_and_chat(cross_bundle, monkeypatch, capsys):
    folder, picture = cross_bundle
    saved = json.loads((folder / "config.json").read_text())
    assert saved["cross_attn_every"] == 1 and saved["image_pos"] == "rope2d" and saved["cross_attn_relative_heads"] == 2
    model, _ = load_bundle(folder)
    assert model.blocks[0].xattn.gate.item() == 0.5
    assert model.blocks[0].xattn.relative.weights.abs().sum() > 0  # open_gates' weights, saved and loaded
    common = ["--model", str(folder), "--max-new-tokens", "4", "--temperature", "0"]
    assert main(["generate", *common, "--prompt", "colour?", "--image", str(picture), "--chat"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/image {picture}\nwhat is it?\nand now?\n"))
    assert main(["chat", *common]) == 0
    out = capsys.readouterr().out
    assert "image attached" in out and "error" not in out


def test_bundles_with_the_new_fields_load_in_the_studio_chat(cross_bundle, tmp_path):
    pytest.importorskip("gradio")
    from studio.app import Services
    from studio.jobs import JobManager
    from studio.store import Store
    from studio.tabs import chat

    folder, picture = cross_bundle
    store = Store(tmp_path / "ws")
    services = Services(store=store, jobs=JobManager(store))
    model_id = store.add_model("cross", folder, kind="bundle")
    message = {"text": "What is in the picture?", "files": [{"path": str(picture)}]}
    *_, (history, speed) = chat.chat(services, message, [], model_id, "", 0.0, 20, 0.95, 4, 1.1)
    assert "tokens/s" in speed and history[-1]["role"] == "assistant"


def test_bundles_from_before_these_fields_still_load(tmp_path):
    tokenizer = Tokenizer.byte_level()
    model = ApertisModel(image_config(vocab_size=tokenizer.vocab_size, image_token_id=tokenizer.image_id)).eval()
    save_bundle(tmp_path / "old", model, tokenizer)
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    del config["cross_attn_every"], config["image_pos"]  # what a bundle written before them holds
    config_file.write_text(json.dumps(config))
    loaded, _ = load_bundle(tmp_path / "old")
    image = torch.rand(3, 8, 16)
    ids = torch.tensor([[1] + [tokenizer.image_id] * 2 + [40, 41]])
    with torch.no_grad():
        assert torch.equal(loaded(ids, images=[image]).logits, model(ids, images=[image]).logits)


def test_patch_places_tell_the_halves_apart_on_every_grid():
    for rows, cols in [(8, 8), (2, 6), (5, 3)]:
        places = patch_places(rows, cols, "cpu")
        grid = grid_positions(rows, cols, "cpu")
        assert places.shape == (rows * cols, 4 * PLACE_FREQUENCIES)
        # cos(pi * u) of the row, then of the column: positive exactly in the top / left half
        assert torch.equal(places[:, 0] > 1e-6, grid[:, 0] < (rows - 1) / 2)
        assert torch.equal(places[:, PLACE_FREQUENCIES * 2] > 1e-6, grid[:, 1] < (cols - 1) / 2)
    # a place is a fraction of the picture: the same spot on a finer grid has the same features
    assert torch.allclose(patch_places(2, 2, "cpu")[0], patch_places(6, 6, "cpu")[7], atol=1e-6)


def test_each_sample_reads_the_places_of_its_own_images():
    model = ApertisModel(image_config(cross_attn_every=1, cross_attn_pos=True))
    first, second, third = torch.rand(3, 8, 32), torch.rand(3, 16, 16), torch.rand(3, 24, 8)
    ids = torch.cat([with_images(first, second, text=(10,) * 9), with_images(third, text=(10,) * 15)])
    caught = []
    block = next(b for b in model.blocks if b.xattn is not None)
    block.xattn.register_forward_pre_hook(lambda module, args: caught.append(args[1]))
    model(ids, images=[first, second, third])
    places = caught[0].places
    assert torch.equal(places[0], torch.cat([patch_places(1, 4, "cpu"), patch_places(2, 2, "cpu")]))
    assert torch.equal(places[1, :3], patch_places(3, 1, "cpu"))
    assert torch.equal(places[1, 3:], torch.zeros(5, 4 * PLACE_FREQUENCIES))  # padding slots, never visible


def test_the_answer_reads_where_a_patch_is_and_the_option_off_reads_the_same_as_before():
    cfg = image_config(cross_attn_every=1, cross_attn_pos=True)
    layer = open_gates(GatedCrossAttention(cfg))
    patches, text = torch.randn(1, 4, cfg.d_model), torch.randn(1, 3, cfg.d_model)
    positions = torch.arange(4)[None]
    here, there = patch_places(2, 2, "cpu"), patch_places(2, 2, "cpu").flip(0)  # same patches, other places
    with torch.no_grad():
        reads = [layer(text, ImageMemory(patches, positions, places[None]))[0] for places in (here, there)]
        assert (reads[0] - reads[1]).abs().max() > 1e-3
        off = open_gates(GatedCrossAttention(image_config(cross_attn_every=1)))
        off.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("place.")})
        layer.place.weight.zero_()
        assert torch.equal(
            layer(text, ImageMemory(patches, positions, here[None]))[0], off(text, ImageMemory(patches, positions))[0]
        )


def test_place_maps_start_at_zero_and_a_run_can_hold_them_there():
    model = open_gates(ApertisModel(image_config(cross_attn_every=1, cross_attn_pos=True)), value=1.0)
    layers = [m for m in model.modules() if isinstance(m, GatedCrossAttention)]
    fresh = [p for m in ApertisModel(model.config).modules() if isinstance(m, GatedCrossAttention)
             for p in m.place_parameters()]  # fmt: skip
    assert len(fresh) == len(layers) and all(not p.detach().any() for p in fresh)
    for layer in layers:  # open_gates gave the maps weights
        layer.reset_place()
    optimizer = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), torch.device("cpu"), separate_places=True)
    assert sum(len(g["params"]) for g in optimizer.param_groups if g.get("places")) == len(layers)
    image = torch.rand(3, 16, 16)
    ids = with_images(image)

    def step(frozen: bool) -> tuple[float, float]:
        before = [p.detach().clone() for layer in layers for p in layer.place_parameters()]
        query = layers[0].q.weight.detach().clone()
        set_learning_rate(optimizer, 1e-2, places_frozen=frozen)
        model(ids, images=[image]).logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        after = [p.detach() for layer in layers for p in layer.place_parameters()]
        moved = max(float((a - b).abs().max()) for a, b in zip(after, before, strict=True))
        return moved, float((layers[0].q.weight.detach() - query).abs().max())

    places_moved, query_moved = step(frozen=True)
    assert places_moved == 0.0 < query_moved  # held exactly at zero while the rest learns
    assert step(frozen=False)[0] > 0  # a zero map still gets a gradient: it learns once released


@pytest.mark.parametrize("where", ["encoder curves", "relative heads' weights"])
def test_distance_curves_are_held_with_the_places_and_then_learn_at_the_full_rate(where):
    if where == "encoder curves":
        model = ApertisModel(image_config(cross_attn_every=1, image_distance_bias=True))
        curves = model.vision.backbone.distance_bias.curves
    else:
        model = ApertisModel(image_config(cross_attn_every=1, cross_attn_relative_heads=2))
        curves = model.blocks[0].xattn.relative.weights
    optimizer = build_optimizer(
        model, 1e-2, 0.1, (0.9, 0.95), torch.device("cpu"), encoder_lr_scale=0.1, separate_encoder=True,
        separate_places=True,
    )  # fmt: skip
    (group,) = [g for g in optimizer.param_groups if any(p is curves for p in g["params"])]
    assert group["places"] and group["lr_scale"] == 1.0  # not the encoder's 0.1: the curves start from nothing
    image = torch.rand(3, 16, 16)
    for frozen in (True, False):
        before = curves.detach().clone()
        set_learning_rate(optimizer, 1e-2, places_frozen=frozen)
        model(with_images(image), images=[image]).logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.equal(curves.detach(), before) == frozen


def test_holding_places_needs_a_model_that_has_them(tmp_path):
    with pytest.raises(ConfigError, match="places_frozen_steps"):
        TrainConfig(places_frozen_steps=-1)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(8)))
    run = RunConfig.from_dict({
        "model": {"preset": "apertis-nano", "d_model": 32, "n_layers": 1, "n_heads": 2, "n_experts": 0},
        "data": {"path": str(tmp_path / "data.jsonl"), "seq_len": 16, "vocab_size": 262, "val_fraction": 0.0},
        "train": {"batch_size": 2, "max_steps": 1, "places_frozen_steps": 5},
        "out_dir": str(tmp_path / "run"),
    })  # fmt: skip
    with pytest.raises(ConfigError, match=r"model.cross_attn_pos=true \(or model.image_distance_bias=true, or"):
        train(run)


@pytest.mark.parametrize("relative_heads", [0, 2])
def test_attention_weights_are_what_the_layer_reads_with(relative_heads):
    cfg = image_config(cross_attn_every=1, cross_attn_pos=True, cross_attn_relative_heads=relative_heads)
    layer = open_gates(GatedCrossAttention(cfg)).eval()
    patches, text = torch.randn(1, 4, cfg.d_model), torch.randn(1, 6, cfg.d_model)
    positions = torch.tensor([[1, 2, 3, 4]])  # text position 0 comes before the picture
    memory = ImageMemory(patches, positions, patch_places(2, 2, "cpu")[None])
    with torch.no_grad():
        weights = layer.attention_weights(text, memory)  # (1, H, 6, 1 + 4)
        values = layer.kv(layer.memory_norm(patches)) + layer.place(memory.places)
        values = values.unflatten(-1, (2 * layer.heads, layer.head_dim)).transpose(1, 2).chunk(2, dim=1)[1]
        read = weights @ torch.cat([values.new_zeros(1, layer.heads, 1, layer.head_dim), values], 2)
        expected = torch.tanh(layer.gate) * layer.out(read.transpose(1, 2).flatten(-2))
        assert torch.allclose(layer(text, memory)[0], expected, atol=1e-5)
    assert torch.allclose(weights.sum(-1), torch.ones(1, layer.heads, 6))
    assert torch.equal(weights[0, :, 0, 1:], torch.zeros(layer.heads, 4))  # before the picture: nothing to see
    assert torch.equal(weights[0, :, 1, 2:], torch.zeros(layer.heads, 3))  # at patch 1: only patch 1
