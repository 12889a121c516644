"""The classic baselines of `apertis bench vqa`: question encoding, batching many questions per picture, and
that both learn a question about the picture in a short run (so a model failing there is the model's fault)."""

import json
import random

import pytest
import torch

from apertis_core.data.shapes import CAPTION_PROMPT, generate_shapes, make_scene, render, side
from apertis_core.tokenizer import IMAGE_LINE
from apertis_core.vision.baselines import BASELINES, bag_of_words, build_baseline, question_words
from benchmarks.vqa_baselines import read_set, train_baseline


def test_questions_become_bags_of_their_words():
    assert question_words("<image>\nIs the red object on the left or right?") == [
        "is", "the", "red", "object", "on", "the", "left", "or", "right",
    ]  # fmt: skip
    vocabulary = {"red": 0, "left": 1, "shape": 2}
    bags = bag_of_words(["Is the RED object on the left?", "What shape is the blue one?"], vocabulary)
    assert bags.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]  # unknown words ("blue") carry nothing


@pytest.mark.parametrize("name", BASELINES)
def test_many_questions_about_one_picture_match_one_picture_per_question(name):
    torch.manual_seed(0)
    model = build_baseline(name, n_words=5, n_answers=7, image_size=64).eval()
    pictures, questions = torch.randn(3, 3, 64, 64), torch.rand(6, 5)
    image_of = torch.tensor([0, 0, 2, 1, 2, 2])
    shared = model(pictures, questions, image_of)
    assert shared.shape == (6, 7)
    assert torch.allclose(shared, model(pictures[image_of], questions), atol=1e-5)
    assert not torch.allclose(shared[0], model(pictures[1:2], questions[:1])[0])  # the picture matters


def test_read_set_asks_every_turn_of_every_chat_and_keeps_the_score_groups(tmp_path):
    summary = generate_shapes(tmp_path, n=10, seed=0, conversations=True)
    train, test = read_set(tmp_path / "train.jsonl"), read_set(tmp_path / "test.jsonl")
    chats = [json.loads(line)["messages"] for line in (tmp_path / "train.jsonl").open()]
    assert len(train.questions) == sum(len(turns) // 2 - 1 for turns in chats)  # all but the caption turn
    assert CAPTION_PROMPT not in {question.removeprefix(IMAGE_LINE) for question in train.questions}
    assert train.pictures.shape == (summary["scenes"]["train"], 3, 64, 64) and train.pictures.dtype == torch.uint8
    assert len(test.questions) == summary["records"]["test"]
    assert all(len(g) == 2 and g[1].startswith(g[0] + "/") for g in test.groups)
    assert not any(train.groups)  # training chats mix kinds: they are never scored


def write_where_is_red(folder, n: int, seed: int) -> None:
    """32 px scenes of three shapes, asked where the red one is (left/right and top/bottom)."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n):
        scene = make_scene(rng, size=32, n_objects=3, radius=4)
        while "red" not in [o.colour for o in scene.objects]:
            scene = make_scene(rng, size=32, n_objects=3, radius=4)
        render(scene).save(folder / "images" / f"{index}.png")
        red = next(o for o in scene.objects if o.colour == "red")
        vertical, horizontal = side(scene, red)
        for question, answer, qtype in (
            ("Is the red object on the left or right?", horizontal, "hpos"),
            ("Is the red object at the top or bottom?", vertical, "vpos"),
        ):
            messages = [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}]
            rows.append({"image": f"images/{index}.png", "messages": messages, "kind": "nonrel", "qtype": qtype})
    (folder / f"{'test' if seed else 'train'}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_learns_where_the_red_object_is(tmp_path, name):
    write_where_is_red(tmp_path, 1500, seed=0)  # fewer scenes get memorised: the test score falls back to chance
    write_where_is_red(tmp_path, 60, seed=1)
    result = train_baseline(name, tmp_path, minutes=0, max_steps=120)
    assert result["steps"] == 120
    accuracy, count = result["accuracy"]["nonrel"]
    assert count == 120
    assert accuracy > 0.85, f"{name}: {accuracy:.2f} on a two-answer question (chance 0.5)"
