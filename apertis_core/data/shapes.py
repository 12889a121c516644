"""The built-in demo data: a Sort-of-CLEVR-style set of coloured-shape scenes with captions and questions.

Deterministic by seed: the same arguments write byte-identical files. Each scene has one object per
colour (as in Sort-of-CLEVR), so "the red object" is always unambiguous. Questions are non-relational
("kind": "nonrel": one named object's shape, side, or the colour of a shape present once) or relational
("kind": "rel": the object closest to / farthest from a named one, how many share its shape); the extra
"kind" and "qtype" fields let a benchmark score them separately and are ignored by the data loader.
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from ..chat_prompt import with_images
from ..fileio import atomic_write_text
from .sources import SUMMARY_FILE

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 0, 255),
    "orange": (255, 150, 0),
    "gray": (128, 128, 128),
    "yellow": (230, 210, 0),
}
SHAPES = ("circle", "square", "triangle")
# What a training set may ask (generate_shapes' `ask`): the question types, and the caption.
QUESTION_TYPES = (
    "shape", "hpos", "vpos", "colour", "closest_shape", "closest_colour", "farthest_shape", "farthest_colour", "count",
)  # fmt: skip
CAPTION = "caption"
CAPTION_PROMPT = "Describe the picture."  # how a conversation asks for the scene's caption
BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    x: int  # centre, pixels from the left edge
    y: int  # centre, pixels from the top edge


@dataclass(frozen=True)
class Scene:
    size: int  # the canvas is size x size pixels
    radius: int  # half the side of each object's bounding box
    objects: tuple[Shape, ...]


@dataclass(frozen=True)
class Question:
    question: str
    answer: str  # a single word
    kind: str  # "nonrel" or "rel"
    qtype: str  # shape, hpos, vpos, colour, closest_shape, closest_colour, farthest_shape, farthest_colour, count


def make_scene(rng: random.Random, size: int = 64, n_objects: int = 6, radius: int = 0) -> Scene:
    """Random non-overlapping objects, each a different colour; radius 0 means about size / 13."""
    if not 1 <= n_objects <= len(COLOURS):
        raise ValueError(f"n_objects must be between 1 and {len(COLOURS)}, got {n_objects}")
    radius = radius or max(2, round(size / 13))
    colours = rng.sample(list(COLOURS), n_objects)
    objects: list[Shape] = []
    for _ in range(10_000):  # rejection sampling; a canvas too small to fit them all must not hang
        x, y = rng.randint(radius, size - 1 - radius), rng.randint(radius, size - 1 - radius)
        # Bounding boxes at least 2 px apart, so no object hides part of another.
        if all(max(abs(x - o.x), abs(y - o.y)) > 2 * radius + 2 for o in objects):
            objects.append(Shape(colours[len(objects)], rng.choice(SHAPES), x, y))
            if len(objects) == n_objects:
                return Scene(size, radius, tuple(objects))
    raise ValueError(
        f"could not place {n_objects} objects of radius {radius} apart on a {size}px canvas; use a larger size"
    )


def render(scene: Scene) -> Image.Image:
    """The scene as a PIL RGB image (no anti-aliasing, so colours are exact and output is deterministic)."""
    img = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    r = scene.radius
    for o in scene.objects:
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([o.x - r, o.y - r, o.x + r, o.y + r], fill=fill)
        elif o.shape == "square":
            draw.rectangle([o.x - r, o.y - r, o.x + r, o.y + r], fill=fill)
        else:
            draw.polygon([(o.x, o.y - r), (o.x - r, o.y + r), (o.x + r, o.y + r)], fill=fill)
    return img


def side(scene: Scene, o: Shape) -> tuple[str, str]:
    """("top" | "bottom", "left" | "right") of an object's centre relative to the canvas centre."""
    half = scene.size / 2
    return ("top" if o.y < half else "bottom"), ("left" if o.x < half else "right")


def caption(scene: Scene) -> str:
    parts = [f"{_article(o.colour)} {o.colour} {o.shape} at the {' '.join(side(scene, o))}" for o in scene.objects]
    return ", ".join(parts)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def questions(scene: Scene) -> list[Question]:
    """Every question with an unambiguous answer, in a fixed order (callers sample from it)."""
    found: list[Question] = []
    shape_counts = {s: sum(o.shape == s for o in scene.objects) for s in SHAPES}
    for o in scene.objects:
        vertical, horizontal = side(scene, o)
        the = f"the {o.colour} object"
        found += [
            Question(f"What shape is {the}?", o.shape, "nonrel", "shape"),
            Question(f"Is {the} on the left or right?", horizontal, "nonrel", "hpos"),
            Question(f"Is {the} at the top or bottom?", vertical, "nonrel", "vpos"),
        ]
        if shape_counts[o.shape] == 1:
            found.append(Question(f"What colour is the {o.shape}?", o.colour, "nonrel", "colour"))
        found += _relational(scene, o, the)
        found.append(
            Question(f"How many objects have the same shape as {the}?", str(shape_counts[o.shape]), "rel", "count")
        )
    return found


def _relational(scene: Scene, o: Shape, the: str) -> list[Question]:
    others = sorted((math.dist((o.x, o.y), (p.x, p.y)), i) for i, p in enumerate(scene.objects) if p is not o)
    if len(others) < 2:
        return []  # with one other object "closest" and "farthest" are the same, and zero is meaningless
    found = []
    for word, qword, first, second in (
        ("closest", "to", others[0], others[1]),
        ("farthest", "from", others[-1], others[-2]),
    ):
        if first[0] == second[0]:
            continue  # a tie would make the answer ambiguous
        target = scene.objects[first[1]]
        found += [
            Question(f"What shape is the object {word} {qword} {the}?", target.shape, "rel", f"{word}_shape"),
            Question(f"What colour is the object {word} {qword} {the}?", target.colour, "rel", f"{word}_colour"),
        ]
    return found


def _question_record(image: str, q: Question) -> dict:
    return {
        "image": image,
        "messages": [
            {"role": "user", "content": with_images(q.question, 1)},
            {"role": "assistant", "content": q.answer},
        ],
        "kind": q.kind,
        "qtype": q.qtype,
    }


def _conversation_record(image: str, asked: list[Question], described: str | None = None, at: int = 0) -> dict:
    """One chat about `image`: the questions in order, and the caption `described` asked for as turn `at`."""
    pairs = [(q.question, q.answer) for q in asked]
    if described is not None:
        pairs.insert(at, (CAPTION_PROMPT, described))
    turns = []
    for index, (question, answer) in enumerate(pairs):
        question = with_images(question, 1) if index == 0 else question
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    kinds = {q.kind for q in asked}
    return {"image": image, "messages": turns, "kind": kinds.pop() if len(kinds) == 1 else "conversation"}


def generate_shapes(
    out_dir: str | Path,
    n: int = 2000,
    seed: int = 0,
    image_size: int = 64,
    heldout_fraction: float = 0.1,
    questions_per_kind: int = 10,
    n_objects: int = 6,
    conversations: bool = False,
    curriculum: bool = False,
    ask: str | tuple[str, ...] = (),
) -> dict:
    """Write images/NNNNNN.png, train.jsonl, test.jsonl and summary.json under out_dir; return the summary.

    The last round(n * heldout_fraction) scenes are held out: test.jsonl asks questions about them only
    and train.jsonl never shows them. Each scene gets up to questions_per_kind non-relational and as many
    relational questions (sampled without repeats), and train.jsonl has each scene's caption as a record of its
    own. With `conversations`, train.jsonl asks each scene's questions in one multi-turn chat instead of one
    record each, with the caption as the answer to CAPTION_PROMPT at a random turn: the image is then encoded
    once for all of them, which makes training several times cheaper, and no batch row is a short caption
    padded to a chat's width (benchmarks/README.md: this is what lets the VQA recipe learn where objects are
    in 30 CPU minutes). test.jsonl always has one question per record, for scoring. With `curriculum`,
    train.jsonl lists the easy records first (captions and non-relational questions of every scene), then the
    relational ones (each scene then has two chats, one per kind), for a loader that starts on the first ones
    (data.curriculum_epochs). With `ask` (question types from QUESTION_TYPES, and CAPTION), train.jsonl keeps
    only those of each scene's drawn questions, and the caption only if asked: a focused set for one phase of
    training, with the same scenes, draws and held-out questions as the full set of that seed.
    """
    if n < 1 or not 0.0 <= heldout_fraction < 1.0 or questions_per_kind < 0:
        raise ValueError("need n >= 1, 0 <= heldout_fraction < 1 and questions_per_kind >= 0")
    ask = question_types(ask) if ask else ()
    captioned = not ask or CAPTION in ask
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    # A second generator (same seed, drawn from separately), so where the caption turn goes leaves a seed's
    # scenes and questions as they were; the shipped demo model was trained on exactly this stream.
    turn_rng = random.Random(seed)
    n_test = round(n * heldout_fraction)
    lines: dict[str, list[str]] = {"train": [], "test": []}
    hard: list[str] = []  # with a curriculum: the relational records, listed after all the easy ones
    for index in range(n):
        scene = make_scene(rng, image_size, n_objects)
        image = f"images/{index:06d}.png"
        # Plain writes: the jsonl files, written atomically last, are what make the images part of the set.
        (out / image).write_bytes(_png_bytes(render(scene)))
        split = "test" if index >= n - n_test else "train"
        asked = _sample(rng, questions(scene), questions_per_kind)
        if conversations and split == "train":
            rng.shuffle(asked)  # relational and non-relational questions mixed, in any order
            asked = [q for q in asked if not ask or q.qtype in ask]
            groups = [[q for q in asked if q.kind == kind] for kind in ("nonrel", "rel")] if curriculum else [asked]
            groups = [group for group in groups if group] or [[]]
            at = turn_rng.randrange(len(groups[0]) + 1)  # the caption is asked for anywhere in the (easy) chat
            records = [_conversation_record(image, groups[0], caption(scene) if captioned else None, at)]
            records += [_conversation_record(image, group) for group in groups[1:]]
            records = [record for record in records if record["messages"]]
        else:
            if split == "train":
                asked = [q for q in asked if not ask or q.qtype in ask]
            records = [_question_record(image, q) for q in asked]
            if split == "train" and captioned:
                records.insert(0, {"image": image, "text": caption(scene), "kind": "caption"})
        if curriculum and split == "train":
            hard += [json.dumps(r) for r in records if r["kind"] == "rel"]
            records = [r for r in records if r["kind"] != "rel"]
        lines[split] += [json.dumps(r) for r in records]
    lines["train"] += hard
    for split, rows in lines.items():
        atomic_write_text(out / f"{split}.jsonl", "".join(row + "\n" for row in rows))
    summary = {
        "seed": seed, "image_size": image_size, "n_objects": n_objects, "conversations": conversations,
        "curriculum": curriculum, "caption_turns": conversations, "ask": list(ask),
        "scenes": {"train": n - n_test, "test": n_test},
        "records": {split: len(rows) for split, rows in lines.items()},
        "files": {"train": "train.jsonl", "test": "test.jsonl"},  # relative to out_dir
    }  # fmt: skip
    # Data validation skips this file by name, so the folder validates clean.
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return {**summary, "out_dir": str(out)}


def question_types(names: str | tuple[str, ...]) -> tuple[str, ...]:
    """Question types to ask, from a tuple or comma-separated text; ValueError naming any that do not exist."""
    names = tuple(n.strip() for n in names.split(",") if n.strip()) if isinstance(names, str) else tuple(names)
    unknown = [name for name in names if name not in (*QUESTION_TYPES, CAPTION)]
    if unknown or not names:
        raise ValueError(
            f"unknown question type {', '.join(unknown) or '(none)'}; choose from {', '.join(QUESTION_TYPES)}, {CAPTION}"
        )
    return names


def _sample(rng: random.Random, found: list[Question], per_kind: int) -> list[Question]:
    chosen = []
    for kind in ("nonrel", "rel"):
        pool = [q for q in found if q.kind == kind]
        chosen += rng.sample(pool, min(per_kind, len(pool)))
    return chosen


def _png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()
