"""benchmarks/vqa_probe.py: the object's patches are found in the picture, and the attention share it reports
is the share the model gives them."""

import pytest
import torch

from apertis_core import load_bundle
from apertis_core.data.shapes import COLOURS
from apertis_core.model.cross_attention import GatedCrossAttention
from benchmarks import vqa, vqa_probe


def test_named_patches_are_where_the_colour_is(tmp_path):
    from PIL import Image

    picture = Image.new("RGB", (32, 32), (255, 255, 255))
    for x in range(9, 12):  # a 3-pixel red stroke across the border of patch columns 1 and 2 (8 px patches)
        for y in range(20, 22):
            picture.putpixel((x + 5, y), COLOURS["red"])
    picture.save(tmp_path / "p.png")
    on = vqa_probe.named_patches(tmp_path / "p.png", COLOURS["red"], 8)
    assert on.shape == (16,) and on.nonzero().flatten().tolist() == [4 * 2 + 1, 4 * 2 + 2]
    assert not vqa_probe.named_patches(tmp_path / "p.png", COLOURS["blue"], 8).any()


def test_the_reported_share_is_the_models_attention_on_the_object(tmp_path, capsys):
    toy = [
        "--minutes", "0", "--scenes", "20", "--data", str(tmp_path / "shapes"), "--workdir", str(tmp_path / "work"),
        "--models", "apertis", "--set", "train.max_steps=1", "--set", "train.batch_size=2",
        "--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=4",
        "--set", "data.val_fraction=0", "--set", "model.cross_attn_pos=true",
    ]  # fmt: skip
    assert vqa.main(toy) == 0
    bundle, data = tmp_path / "work" / "run" / "final", tmp_path / "shapes"
    model, tokenizer = load_bundle(bundle, device="cpu")
    rows = vqa_probe.questions(data, 40)
    assert rows and all(f"the {r['colour']} object" in r["messages"][0]["content"] for r in rows)
    for layer in model.modules():  # no query: every head spreads evenly over the nothing slot and 64 patches
        if isinstance(layer, GatedCrossAttention):
            torch.nn.init.zeros_(layer.q.weight)
    shares, answered, carried, earlier = vqa_probe.look(model.eval(), tokenizer, data, rows, before=4)
    assert {layer for _, layer in shares} == {0, 1}
    assert {qtype for qtype, _ in answered} == {"closest_colour", "farthest_colour"}
    assert {(qtype, layer, back) for qtype, layer, back, _ in earlier} == {
        (q, at, b) for q, at in shares for b in (1, 2, 3, 4)
    }
    # "... the red object?": the colour word is 4 tokens before the position that predicts the answer
    colour_words = {word.strip() for qtype, _, back, word in earlier if back == 4 and qtype == "shape"}
    assert len(colour_words) == 1 and colour_words <= set(COLOURS)
    for share, even in [*shares.values(), *answered.values(), *earlier.values()]:
        assert 0 < even < 0.5 and abs(share - even * 64 / 65) < 1e-5
    assert carried.keys() == shares.keys()
    named = sorted(list(COLOURS).index(r["colour"]) for r in rows)
    for layer in (0, 1):
        got = [(x, c) for (_, at), pairs in carried.items() if at == layer for x, c in pairs]
        assert sorted(c for _, c in got) == named and {x.shape for x, _ in got} == {(32,)}
    vqa_probe.main([str(bundle), "--data", str(data), "--rows", "40", "--before", "2"])
    out = capsys.readouterr().out
    assert "look (before): best head's share on the named object" in out and "layer 1, 2 before (" in out
    assert "look: best head's share" in out and "keep (trained): shape from encoder tokens" in out
    assert "carry: the named colour" in out and "look (answer): best head's share on the object the answer" in out
    from apertis_core.data.shapes import generate_shapes

    generate_shapes(tmp_path / "two", n=20, seed=0, n_objects=2)  # two objects: no closest or farthest to ask
    vqa_probe.main([str(bundle), "--data", str(tmp_path / "two"), "--rows", "40"])
    out = capsys.readouterr().out
    assert "keep (trained): shape from encoder tokens" in out and "keep: no closest_colour questions" in out


def test_pictures_the_model_would_rescale_and_missing_data_are_refused(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (36, 32), COLOURS["red"]).save(tmp_path / "p.png")  # 4 x 4 patches of 8 px, not 5
    with pytest.raises(ValueError, match="the model sees 20 patches but the picture holds 16"):
        vqa_probe.object_patches(tmp_path / "p.png", "red", 8, 20)
    with pytest.raises(SystemExit):
        vqa_probe.main([str(tmp_path), "--data", str(tmp_path / "nowhere")])
    assert "has no test.jsonl" in capsys.readouterr().err


def test_carry_reads_a_colour_that_is_there_and_not_one_that_is_not():
    generator = torch.Generator().manual_seed(0)
    colours = torch.randint(0, 6, (300,), generator=generator)
    noise = torch.randn(300, 16, generator=generator)
    there = {
        ("hpos", 0): [(n + 3 * torch.nn.functional.one_hot(c, 16), int(c)) for n, c in zip(noise, colours, strict=True)]
    }
    absent = {("hpos", 0): [(n, int(c)) for n, c in zip(noise, colours, strict=True)]}
    assert vqa_probe.carry(there)[("hpos", 0)] > 0.9
    assert vqa_probe.carry(absent)[("hpos", 0)] < 0.4


def test_keep_probes_for_the_answer_of_the_question_type_asked(tmp_path):
    """Encoder tokens that hold, on each object, the colour of the object closest to it: the probe reads that
    for closest-colour questions and not the farthest object's colour from the same tokens."""
    from types import SimpleNamespace

    from PIL import Image

    from apertis_core.data.shapes import generate_shapes
    from apertis_core.vision import preprocess_image

    generate_shapes(tmp_path, n=600, seed=3)
    rows = vqa_probe.questions(tmp_path, 100_000)
    painted = {row["image"]: torch.zeros(64, len(COLOURS)) for row in rows}
    for row in rows:
        if row["qtype"] == "closest_colour":
            on = vqa_probe.object_patches(tmp_path / row["image"], row["colour"], 8, 64)
            answer = torch.tensor(list(COLOURS).index(row["messages"][-1]["content"]))
            painted[row["image"]][on] = torch.nn.functional.one_hot(answer, len(COLOURS)).float()
    pixels = {name: preprocess_image(Image.open(tmp_path / name).convert("RGB"), 8, 64) for name in painted}

    class Encoder(torch.nn.Module):
        config = SimpleNamespace(image_patch_size=8, image_max_patches=64)

        def vision(self, pictures):
            return [next(painted[n] for n, p in pixels.items() if torch.equal(p, picture)) for picture in pictures]

    closest = vqa_probe.keep(Encoder(), tmp_path, rows, "closest_colour")
    farthest = vqa_probe.keep(Encoder(), tmp_path, rows, "farthest_colour")
    assert closest == [1.0] and farthest[0] < 0.6
