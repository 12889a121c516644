"""The shapes demo set: deterministic by seed, correct answers, a disjoint held-out split, valid records."""

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from apertis_core.data.shapes import (
    CAPTION_PROMPT,
    COLOURS,
    Scene,
    Shape,
    generate_shapes,
    make_scene,
    question_types,
    questions,
    render,
)


def answers(scene):
    return {q.question: q.answer for q in questions(scene)}


def hand_scene():
    # red and orange are circles; gray is nearest to red; orange is farthest from red.
    return Scene(64, 5, (
        Shape("red", "circle", 10, 10), Shape("green", "square", 50, 10), Shape("blue", "triangle", 12, 52),
        Shape("orange", "circle", 52, 54), Shape("gray", "square", 30, 30),
    ))  # fmt: skip


def test_hand_checked_answers():
    got = answers(hand_scene())
    assert got["What shape is the red object?"] == "circle"
    assert got["Is the green object on the left or right?"] == "right"
    assert got["Is the blue object at the top or bottom?"] == "bottom"
    assert got["What shape is the object closest to the red object?"] == "square"
    assert got["What colour is the object closest to the red object?"] == "gray"
    assert got["What shape is the object farthest from the red object?"] == "circle"
    assert got["What colour is the object farthest from the red object?"] == "orange"
    assert got["How many objects have the same shape as the red object?"] == "2"  # itself and orange
    assert got["What colour is the triangle?"] == "blue"  # the only triangle
    assert "What colour is the circle?" not in got  # two circles: no unambiguous answer


def test_ties_ask_no_question():
    scene = Scene(
        64, 5, (Shape("red", "circle", 32, 32), Shape("blue", "square", 12, 32), Shape("green", "square", 52, 32))
    )
    got = answers(scene)
    assert not any("closest to the red" in q or "farthest from the red" in q for q in got)
    assert got["What colour is the object closest to the blue object?"] == "red"


def test_relational_answers_match_brute_force():
    rng = random.Random(3)
    for _ in range(20):
        scene = make_scene(rng)
        got = answers(scene)
        for o in scene.objects:
            by_distance = sorted(((p.x - o.x) ** 2 + (p.y - o.y) ** 2, p.colour) for p in scene.objects if p != o)
            nearest, farthest = by_distance[0], by_distance[-1]
            key = f"What colour is the object closest to the {o.colour} object?"
            if nearest[0] != by_distance[1][0]:
                assert got[key] == nearest[1]
            key = f"What colour is the object farthest from the {o.colour} object?"
            if farthest[0] != by_distance[-2][0]:
                assert got[key] == farthest[1]
            same = sum(p.shape == o.shape for p in scene.objects)
            assert got[f"How many objects have the same shape as the {o.colour} object?"] == str(same)


def test_scenes_use_each_colour_once_without_overlap_and_render_true_colours():
    scene = make_scene(random.Random(0))
    assert sorted(o.colour for o in scene.objects) == sorted(COLOURS)
    pixels = render(scene).load()
    for i, o in enumerate(scene.objects):
        assert pixels[o.x, o.y + 1] == COLOURS[o.colour]  # just below the centre is inside every shape
        for p in scene.objects[i + 1 :]:
            assert max(abs(o.x - p.x), abs(o.y - p.y)) > 2 * scene.radius + 2


def test_single_object_scenes_ask_its_colour():
    scene = make_scene(random.Random(1), n_objects=1)
    (only,) = scene.objects
    assert answers(scene)[f"What colour is the {only.shape}?"] == only.colour


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generation_is_deterministic_by_seed(tmp_path):
    def files(directory):
        return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}

    generate_shapes(tmp_path / "a", n=6, seed=7, questions_per_kind=3)
    generate_shapes(tmp_path / "b", n=6, seed=7, questions_per_kind=3)
    generate_shapes(tmp_path / "c", n=6, seed=8, questions_per_kind=3)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()


def test_heldout_split_is_disjoint_and_records_are_well_formed(tmp_path):
    summary = generate_shapes(tmp_path, n=10, seed=0, heldout_fraction=0.3, questions_per_kind=4)
    train, test = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "test.jsonl")
    train_images, test_images = {r["image"] for r in train}, {r["image"] for r in test}
    assert len(train_images) == 7 and len(test_images) == 3 and not train_images & test_images
    pngs = {name: (tmp_path / name).read_bytes() for name in train_images | test_images}
    assert not {pngs[n] for n in train_images} & {pngs[n] for n in test_images}
    assert summary["scenes"] == {"train": 7, "test": 3} and summary["records"]["test"] == len(test)

    captions = [r for r in train if "text" in r]
    assert len(captions) == 7 and not any("text" in r for r in test)
    for record in train + test:
        if "text" in record:
            continue
        user, assistant = record["messages"]
        assert user["role"] == "user" and user["content"].startswith("<image>\n")
        assert assistant["role"] == "assistant" and assistant["content"].isalnum()  # one word
        assert record["kind"] in ("nonrel", "rel") and record["qtype"]
    kinds = [r["kind"] for r in test]
    assert kinds.count("nonrel") == kinds.count("rel") == 12  # 4 of each kind per held-out scene


def where_each_colour_is(picture: Path) -> dict[str, tuple[float, float]]:
    """colour -> the (x, y) middle of its pixels' bounding box, read from the rendered file."""
    pixels = torch.frombuffer(bytearray(Image.open(picture).convert("RGB").tobytes()), dtype=torch.uint8).view(
        64, 64, 3
    )
    found = {}
    for name, rgb in COLOURS.items():
        ys, xs = (pixels == torch.tensor(rgb)).all(-1).nonzero(as_tuple=True)
        if len(xs):
            found[name] = ((xs.min() + xs.max()).item() / 2, (ys.min() + ys.max()).item() / 2)
    return found


def test_conversations_ask_for_each_scenes_own_caption_once_at_some_turn(tmp_path):
    generate_shapes(tmp_path, n=12, seed=1, heldout_fraction=0.0, questions_per_kind=4, conversations=True)
    chats = read_jsonl(tmp_path / "train.jsonl")
    assert len(chats) == 12 and all("messages" in chat for chat in chats)  # no separate caption records
    turns_asked = set()
    for chat in chats:
        asks = [m["content"] for m in chat["messages"][::2]]
        assert asks[0].startswith("<image>\n") and sum("<image>" in ask for ask in asks) == 1
        asks = [ask.removeprefix("<image>\n") for ask in asks]
        assert len(asks) == 9 and asks.count(CAPTION_PROMPT) == 1  # 8 questions and the caption
        turn = asks.index(CAPTION_PROMPT)
        turns_asked.add(turn)
        described = chat["messages"][2 * turn + 1]["content"].split(", ")
        places = where_each_colour_is(tmp_path / chat["image"])
        assert sorted(part.split()[1] for part in described) == sorted(places)  # every object, once
        for part in described:  # "a red circle at the top left", true of this chat's own picture
            _, colour, _, _, _, vertical, horizontal = part.split()
            x, y = places[colour]
            assert abs(y - 31.5) < 1 or vertical == ("top" if y < 31.5 else "bottom")
            assert abs(x - 31.5) < 1 or horizontal == ("left" if x < 31.5 else "right")
    assert len(turns_asked) > 2  # asked anywhere, not always first

    generate_shapes(tmp_path / "none", n=2, seed=1, heldout_fraction=0.0, questions_per_kind=0, conversations=True)
    for chat in read_jsonl(tmp_path / "none" / "train.jsonl"):  # no questions: the chat asks for the caption only
        assert [m["content"] for m in chat["messages"][::2]] == ["<image>\n" + CAPTION_PROMPT]


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="heldout_fraction"):
        generate_shapes(tmp_path, n=5, heldout_fraction=1.0)
    with pytest.raises(ValueError, match="n_objects"):
        make_scene(random.Random(0), n_objects=7)
    with pytest.raises(ValueError, match="larger size"):
        make_scene(random.Random(0), size=16, n_objects=6, radius=4)


def test_a_focused_set_asks_only_the_named_types_of_the_full_sets_scenes(tmp_path):
    generate_shapes(tmp_path / "full", n=12, seed=2, heldout_fraction=0.25, conversations=True)
    generate_shapes(tmp_path / "focus", n=12, seed=2, heldout_fraction=0.25, conversations=True, ask="shape,count")
    generate_shapes(tmp_path / "records", n=12, seed=2, heldout_fraction=0.25)
    generate_shapes(tmp_path / "plain", n=12, seed=2, heldout_fraction=0.25, ask=("caption", "farthest_colour"))
    for name, whole in (("focus", "full"), ("plain", "records")):  # same pictures and held-out questions
        for file in ("test.jsonl", "images/000003.png"):
            assert (tmp_path / name / file).read_bytes() == (tmp_path / whole / file).read_bytes()
    full, focus = read_jsonl(tmp_path / "full" / "train.jsonl"), read_jsonl(tmp_path / "focus" / "train.jsonl")
    assert len(focus) == len(full) == 9
    for whole, kept in zip(full, focus, strict=True):
        relative = ("closest", "farthest")  # "What shape is the object closest to ..." is not a named shape
        wanted = [
            (q, a)
            for q, a in turns(whole)
            if q.startswith(("What shape", "How many")) and not any(w in q for w in relative)
        ]
        assert turns(kept) == wanted and kept["image"] == whole["image"]
        assert kept["messages"][0]["content"].startswith("<image>\n")
    records, plain = read_jsonl(tmp_path / "records" / "train.jsonl"), read_jsonl(tmp_path / "plain" / "train.jsonl")
    assert plain == [row for row in records if row.get("qtype", row["kind"]) in ("caption", "farthest_colour")]
    assert any(row["kind"] == "caption" for row in plain) and any("qtype" in row for row in plain)
    assert json.loads((tmp_path / "focus" / "summary.json").read_text())["ask"] == ["shape", "count"]
    with pytest.raises(ValueError, match="unknown question type closest_size"):
        generate_shapes(tmp_path / "bad", n=2, ask="shape,closest_size")
    assert question_types(" shape, count,") == ("shape", "count")  # a trailing comma or spaces are not a type
    with pytest.raises(ValueError, match=r"unknown question type \(none\)"):
        question_types(" , ")


def turns(chat: dict) -> list[tuple[str, str]]:
    """(question, answer) pairs of a chat, without the image marker."""
    asked, answered = chat["messages"][::2], chat["messages"][1::2]
    return [(q["content"].removeprefix("<image>\n"), a["content"]) for q, a in zip(asked, answered, strict=True)]
