"""Tiny image models learn in short CPU runs: the colour of the one shape in a picture, and (with
cross-attention to the patches) which shape has the colour a question names, among two."""

import json
import random

from apertis_core import GenerationConfig, generate, load_bundle
from apertis_core.data import load_dataset
from apertis_core.data.shapes import COLOURS, SHAPES, Scene, Shape, render
from apertis_core.evaluation import exact_match
from apertis_core.training import RunConfig, train
from apertis_core.vision import preprocess_image

from conftest import write_colour_questions

SIZE = 32


def greedy_answer(model, tokenizer, record) -> str:
    image = preprocess_image(record.images[0], model.config.image_patch_size, model.config.image_max_patches)
    ids, _ = tokenizer.encode_chat(record.messages[:1], add_generation_prompt=True)
    ids = model.expand_image_tokens(ids, [image])
    config = GenerationConfig(max_new_tokens=12, temperature=0.0, stop_ids=[tokenizer.eot_id])
    return tokenizer.decode(list(generate(model, ids, config, images=[image])))


def trained_accuracy(run: RunConfig, test_file) -> float:
    """Train `run`, then its held-out exact-match accuracy on test_file; on the first answers, real greedy
    generation (which reads the picture from its state) must agree with the one-pass score."""
    model, tokenizer = load_bundle(train(run).bundle_dir)
    records, _ = load_dataset(test_file)
    correct = exact_match(model, tokenizer, records)
    for record, ok in list(zip(records, correct, strict=True))[:8]:
        assert (greedy_answer(model, tokenizer, record) == record.messages[-1]["content"]) == ok
    return sum(correct) / len(records)


def test_tiny_model_learns_the_colour_of_a_single_shape(tmp_path):
    write_colour_questions(tmp_path / "train", 600, seed=0)
    write_colour_questions(tmp_path / "test", 120, seed=1)
    run = RunConfig.from_dict({
        "model": {
            "preset": "apertis-nano", "d_model": 64, "n_layers": 2, "n_heads": 2, "n_experts": 0,
            "image_encoder": "vit", "image_patch_size": 8, "image_max_patches": 16, "image_encoder_layers": 1,
        },
        "data": {"path": str(tmp_path / "train" / "data.jsonl"), "seq_len": 64, "vocab_size": 262, "val_fraction": 0.05},
        "train": {"batch_size": 32, "lr": 3e-3, "warmup_steps": 10, "max_steps": 150, "eval_every": 0,
                  "save_every": 0, "log_every": 50, "precision": "fp32"},
        "out_dir": str(tmp_path / "run"),
    })  # fmt: skip
    accuracy = trained_accuracy(run, tmp_path / "test" / "data.jsonl")
    chance = 1 / len(COLOURS)
    assert accuracy > 3 * chance, f"accuracy {accuracy:.2f} is not well above chance ({chance:.2f})"


CELL = 8  # the patch size: each object is drawn inside one patch, so the patch size fits the objects


def write_two_object_set(folder, n: int, seed: int) -> None:
    """32 px scenes with two objects of different colours and different shapes, each 7 px inside its own
    8 px patch; one question per scene about one of them: knowing the shapes present is not enough."""
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for index in range(n):
        cells = rng.sample(range((SIZE // CELL) ** 2), 2)
        colours, shapes = rng.sample(list(COLOURS), 2), rng.sample(SHAPES, 2)
        objects = tuple(
            Shape(colour, shape, cell % (SIZE // CELL) * CELL + 3, cell // (SIZE // CELL) * CELL + 3)
            for colour, shape, cell in zip(colours, shapes, cells, strict=True)
        )
        render(Scene(SIZE, 3, objects)).save(folder / "images" / f"{index}.png")
        asked = rng.choice(objects)
        question = {"role": "user", "content": f"<image>\nWhat shape is the {asked.colour} object?"}
        rows.append(
            {"image": f"images/{index}.png", "messages": [question, {"role": "assistant", "content": asked.shape}]}
        )
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_cross_attention_learns_which_shape_has_the_named_colour(tmp_path):
    write_two_object_set(tmp_path / "train", 2000, seed=0)
    write_two_object_set(tmp_path / "test", 200, seed=1)
    run = RunConfig.from_dict({
        "model": {
            "preset": "apertis-nano", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_experts": 0,
            "image_encoder": "vit", "image_patch_size": CELL, "image_max_patches": 16, "image_encoder_layers": 1,
            "cross_attn_every": 1,
        },
        "data": {"path": str(tmp_path / "train" / "data.jsonl"), "seq_len": 64, "vocab_size": 262,
                 "val_fraction": 0.02, "image_augment": False},
        # The encoder nearly frozen (lr 3e-5): its random patch features keep colour and shape apart while
        # the language side learns to bind them; trained at 5e-3 too it stayed near the 50% shapes-present answer.
        "train": {"batch_size": 32, "lr": 5e-3, "encoder_lr_scale": 0.006, "warmup_steps": 10, "max_steps": 1000,
                  "eval_every": 0, "save_every": 0, "log_every": 50, "precision": "fp32",
                  "threads": 1},  # one thread: the same sums, so the same run, on every machine
        "out_dir": str(tmp_path / "run"),
    })  # fmt: skip
    accuracy = trained_accuracy(run, tmp_path / "test" / "data.jsonl")
    # Without the image: 1/3. Seeing which two shapes are there without binding them to colours: 1/2.
    # Measured 0.98 and 0.995 after these 1000 steps (seeds 1 and 1337); 0.82 after 600.
    assert accuracy >= 0.9, f"held-out accuracy {accuracy:.2f}; the prior is 0.33-0.50"
