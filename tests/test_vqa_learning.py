"""A tiny image model learns, in a short CPU run, to name the colour of the one shape in a picture."""

import json
import random

from apertis_core import GenerationConfig, generate, load_bundle
from apertis_core.data import load_dataset
from apertis_core.data.shapes import COLOURS, make_scene, render
from apertis_core.evaluation import exact_match
from apertis_core.training import RunConfig, train
from apertis_core.vision import preprocess_image

RADIUS = 6  # a shape a few patches wide: the test is about wiring and learning, not acuity
SIZE = 32


def write_colour_set(folder, n: int, seed: int) -> None:
    rng = random.Random(seed)
    (folder / "images").mkdir(parents=True)
    rows = []
    for index in range(n):
        scene = make_scene(rng, size=SIZE, n_objects=1, radius=RADIUS)
        render(scene).save(folder / "images" / f"{index}.png")
        question = {"role": "user", "content": "<image>\nWhat colour is the shape?"}
        rows.append(
            {
                "image": f"images/{index}.png",
                "messages": [question, {"role": "assistant", "content": scene.objects[0].colour}],
            }
        )
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def greedy_answer(model, tokenizer, record) -> str:
    image = preprocess_image(record.images[0], model.config.image_patch_size, model.config.image_max_patches)
    ids, _ = tokenizer.encode_chat(record.messages[:1], add_generation_prompt=True)
    ids = model.expand_image_tokens(ids, [image])
    config = GenerationConfig(max_new_tokens=12, temperature=0.0, stop_ids=[tokenizer.eot_id])
    return tokenizer.decode(list(generate(model, ids, config, images=[image])))


def test_tiny_model_learns_the_colour_of_a_single_shape(tmp_path):
    write_colour_set(tmp_path / "train", 600, seed=0)
    write_colour_set(tmp_path / "test", 120, seed=1)
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
    result = train(run)
    model, tokenizer = load_bundle(result.bundle_dir)
    records, _ = load_dataset(tmp_path / "test" / "data.jsonl")
    correct = exact_match(model, tokenizer, records)
    accuracy = sum(correct) / len(records)
    chance = 1 / len(COLOURS)
    assert accuracy > 3 * chance, f"accuracy {accuracy:.2f} is not well above chance ({chance:.2f})"
    for record, ok in list(zip(records, correct, strict=True))[:12]:  # the one-pass score agrees with real generation
        assert (greedy_answer(model, tokenizer, record) == record.messages[-1]["content"]) == ok
