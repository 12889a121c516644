"""The visual Q&A pipeline end to end, with checks that would catch a silent bug: a picture reaching another
sample's positions, patches out of place, the image cache mixing files up, or the loss missing the answers."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from apertis_core import ApertisModel, ConfigError, ModelConfig, load_bundle
from apertis_core.data import BatchLoader, DataConfig, Record, build_datasets, load_dataset
from apertis_core.data.dataset import IGNORE_INDEX
from apertis_core.data.shapes import CAPTION_PROMPT, generate_shapes
from apertis_core.tokenizer import Tokenizer
from apertis_core.training import RunConfig, train
from apertis_core.vision import ImageCache, num_image_tokens, preprocess_image
from apertis_core.vision.encoder import UnifiedMultimodalEncoder

from conftest import tiny_image_config, write_colour_questions

TOK = Tokenizer.byte_level()
WHITE, RED = (255, 255, 255), (255, 0, 0)


def numbered_pictures(folder, n: int) -> list:
    """n files of different sizes and colours (so patch counts and pixels differ), named 0.png ... n-1.png."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.new("RGB", (8 * rng.randint(1, 4), 8 * rng.randint(1, 4)), (i * 37 % 256, i * 91 % 256, 128)).save(path)
        paths.append(path)
    return paths


# ---- each sample's picture reaches that sample's positions ------------------------------------------


def test_batches_pair_each_sample_with_its_own_pictures(tmp_path):
    paths = numbered_pictures(tmp_path, 12)
    records = [
        Record("chat", None, [{"role": "user", "content": f"<image>\npicture {i}?"}, {"role": "assistant", "content": str(i)}], [p])
        for i, p in enumerate(paths)
    ]  # fmt: skip
    cache = ImageCache(patch_size=8, max_patches=16)
    train_data, _ = build_datasets(records, TOK, DataConfig(seq_len=64, val_fraction=0.0), cache.file_tokens)
    loader = BatchLoader(train_data, batch_size=5, seed=3)
    for _ in range(6):  # more than an epoch: batches cross the epoch boundary too
        batch = next(loader)
        pixels = cache.batch(batch.images, train=False)
        assert len(pixels) == sum(len(p) for p in batch.images)
        for ids, pictures, tensor in zip(batch.input_ids, batch.images, pixels, strict=True):
            number = TOK.decode(ids.tolist()).split("picture ")[1].split("?")[0]
            assert pictures == [tmp_path / f"{number}.png"]
            assert torch.equal(tensor, preprocess_image(pictures[0], 8, 16))
            assert int((ids == TOK.image_id).sum()) == num_image_tokens(tensor, 8)


def multi_image_batch(cfg: ModelConfig):
    """Three samples: one picture, two pictures, one picture, of different patch counts, at different places."""
    torch.manual_seed(1)
    sizes = [(16, 32), (24, 8), (32, 32), (8, 16)]
    images = [torch.randn(3, h, w, requires_grad=True) for h, w in sizes]
    counts = [num_image_tokens(i, cfg.image_patch_size) for i in images]
    image_id = cfg.image_token_id
    rows = [
        [7] * 3 + [image_id] * counts[0] + [8] * 6,
        [9] + [image_id] * counts[1] + [10] * 2 + [image_id] * counts[2] + [11],
        [12] * 5 + [image_id] * counts[3] + [13] * 4,
    ]
    length = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    return ids, images, [[0], [1, 2], [3]]


ENCODERS = [
    {"image_encoder": "vit"},
    {"image_encoder": "vit", "image_stem": "conv"},
    {"image_encoder": "resnet18"},
    {"image_encoder": "vit", "cross_attn_every": 1},  # the layer that re-reads the patches
]


@pytest.mark.parametrize("overrides", ENCODERS, ids=lambda o: "-".join(map(str, o.values())))
def test_a_samples_outputs_depend_on_its_own_pictures_only(overrides):
    cfg = tiny_image_config(TOK).replace(**overrides)
    model = ApertisModel(cfg).eval()  # eval: batch norm must not mix the batch's pictures through its statistics
    ids, images, owned = multi_image_batch(cfg)
    logits = model(ids, images=images).logits
    for sample, mine in enumerate(owned):
        grads = torch.autograd.grad(logits[sample].square().sum(), images, retain_graph=True, allow_unused=True)
        for index, grad in enumerate(grads):
            moved = grad is not None and bool(grad.abs().sum() > 0)
            assert moved == (index in mine), f"sample {sample}'s outputs and picture {index}"


def test_patch_tokens_fill_the_image_positions_in_order():
    cfg = tiny_image_config(TOK)
    model = ApertisModel(cfg).eval()
    ids, images, _ = multi_image_batch(cfg)
    seen = {}
    model.vision.register_forward_hook(lambda module, args, out: seen.setdefault("patches", out))
    model.blocks[0].register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(ids, images=images)
    x, patches = seen["x"], seen["patches"]
    assert [p.shape[0] for p in patches] == [num_image_tokens(i, cfg.image_patch_size) for i in images]
    slots = ids == cfg.image_token_id
    # Row-major over (sample, position): sample 0's picture, then sample 1's two in order, then sample 2's.
    assert torch.equal(x[slots], torch.cat(patches))
    assert torch.equal(x[~slots], model.embed(ids)[~slots])


def answer_loss(model, dataset, cache, order) -> float:
    """Mean loss over the answers of `dataset` with picture k given to sample order[k]'s positions."""
    items = [dataset[k] for k in range(len(dataset))]
    pictures = cache.batch([items[k]["images"] for k in order], train=False)
    ids, labels = torch.stack([i["input_ids"] for i in items]), torch.stack([i["labels"] for i in items])
    with torch.no_grad():
        logits = model(ids, images=pictures).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX).item()


def test_shuffling_pictures_within_a_batch_raises_a_trained_models_loss(tmp_path):
    write_colour_questions(tmp_path / "train", 400, seed=0)
    write_colour_questions(tmp_path / "test", 48, seed=1)
    run = RunConfig.from_dict({
        "model": {"preset": "apertis-nano", "d_model": 64, "n_layers": 2, "n_heads": 2, "n_experts": 0,
                  "image_encoder": "vit", "image_patch_size": 8, "image_max_patches": 16, "image_encoder_layers": 1},
        "data": {"path": str(tmp_path / "train" / "data.jsonl"), "seq_len": 48, "vocab_size": 262, "val_fraction": 0.0,
                 "image_augment": False},
        "train": {"batch_size": 32, "lr": 3e-3, "warmup_steps": 10, "max_steps": 80, "eval_every": 0, "save_every": 0,
                  "log_every": 40, "precision": "fp32"},
        "out_dir": str(tmp_path / "run"),
    })  # fmt: skip
    model, tokenizer = load_bundle(train(run).bundle_dir)
    records, _ = load_dataset(tmp_path / "test" / "data.jsonl")
    cache = ImageCache(model.config.image_patch_size, model.config.image_max_patches)
    test, _ = build_datasets(records, tokenizer, DataConfig(seq_len=48, val_fraction=0.0), cache.file_tokens)
    own = list(range(len(test)))
    shifted = own[1:] + own[:1]  # every sample gets its neighbour's picture (another colour 5 times in 6)
    true_loss, shuffled_loss = answer_loss(model, test, cache, own), answer_loss(model, test, cache, shifted)
    assert shuffled_loss > true_loss + 0.5, f"loss {true_loss:.3f} with its own pictures, {shuffled_loss:.3f} shuffled"


# ---- patches are in the picture's order ---------------------------------------------------------------


def test_preprocessing_keeps_each_patch_in_its_place():
    """A 32 x 16 picture scaled up to a 4 x 8 grid of 8 px patches: the red block lands in patch (2, 5)."""
    picture = Image.new("RGB", (32, 16), WHITE)
    picture.paste(RED, (20, 8, 24, 12))  # x 20..23, y 8..11: at scale 2, rows 16..23 and columns 40..47
    tensor = preprocess_image(picture, patch_size=8, max_patches=32)
    assert tensor.shape == (3, 32, 64)
    patches = tensor.unfold(1, 8, 8).unfold(2, 8, 8)  # (3, rows, cols, 8, 8)
    red = patches[0].mean((-1, -2)) > patches[1].mean((-1, -2)) + 1  # red channel well above green
    assert red.nonzero().tolist() == [[2, 5]]


@pytest.mark.parametrize(("kind", "stem"), [("vit", "patch"), ("vit", "conv"), ("resnet18", "patch")])
def test_encoder_tokens_follow_the_patch_grid_row_by_row(kind, stem):
    cfg = ModelConfig(
        d_model=32, n_heads=4, image_encoder=kind, image_stem=stem, image_patch_size=8, image_max_patches=32,
        image_encoder_layers=1,
    )  # fmt: skip
    torch.manual_seed(0)
    encoder = UnifiedMultimodalEncoder(cfg).eval()
    base = torch.zeros(3, 32, 64)  # 4 rows x 8 columns: a transposed or column-major order reads another patch
    with torch.no_grad():
        reference = encoder([base])[0]
        for row in range(4):
            for col in range(8):
                poked = base.clone()
                # A dot near the patch's top-left corner: where a strided ResNet cell is centred (each stride-2
                # layer with padding 1 moves the centre up and left), and inside the patch for the ViT.
                poked[:, row * 8 : row * 8 + 2, col * 8 : col * 8 + 2] = 3.0
                change = (encoder([poked])[0] - reference).norm(dim=-1)  # per token
                assert int(change.argmax()) == row * 8 + col, (row, col, change)


# ---- the image cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_bytes", [0, 2 << 30], ids=["nothing-kept", "all-kept"])
def test_image_cache_never_serves_another_files_pixels(tmp_path, max_bytes):
    twins = [numbered_pictures(tmp_path / name, 6) for name in ("a", "b")]  # same names, other folders
    for path in twins[1]:
        Image.open(path).transpose(Image.Transpose.ROTATE_90).save(path)  # other pixels and grids under each name
    cache = ImageCache(patch_size=8, max_patches=16, max_bytes=max_bytes)
    asked = [p for pair in zip(*twins, strict=True) for p in pair] * 2
    random.Random(0).shuffle(asked)
    for path in asked:
        tensor = cache.image(path, train=False)
        assert torch.equal(tensor, preprocess_image(path, 8, 16)), path
        assert cache.file_tokens(path) == num_image_tokens(tensor, 8)


# ---- the loss is taken on the answers ------------------------------------------------------------------


@pytest.mark.parametrize("conversations", [True, False])
def test_loss_masks_cover_exactly_the_answers(tmp_path, conversations):
    generate_shapes(tmp_path, n=4, seed=0, heldout_fraction=0.0, conversations=conversations)
    records, _ = load_dataset(tmp_path / "train.jsonl")
    data, _ = build_datasets(records, TOK, DataConfig(seq_len=4096, val_fraction=0.0), lambda path: 16)
    assert len(data) == len(records)
    for k, record in enumerate(records):
        item = data[k]
        taught = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
        if record.kind == "chat":
            answers = [m["content"] for m in record.messages if m["role"] == "assistant"]
            assert taught == [t for a in answers for t in TOK.encode(a) + [TOK.eot_id]]
        else:  # a caption: its text and end, never the picture's positions
            assert taught == [t for t in TOK.encode(record.text) if t != TOK.image_id] + [TOK.eot_id]
        assert not (item["labels"] == TOK.image_id).any()


# ---- easy-first curriculum ------------------------------------------------------------------------------


def numbered_chats(n: int) -> list:
    return [
        Record("chat", None, [{"role": "user", "content": f"n{i}."}, {"role": "assistant", "content": "ok"}])
        for i in range(n)
    ]


def stream(loader, batches: int) -> list[int]:
    """The record numbers of the next `batches` batches, in order."""
    found = []
    for _ in range(batches):
        found += [int(TOK.decode(ids.tolist()).split("n", 1)[1].split(".")[0]) for ids in next(loader).input_ids]
    return found


def test_curriculum_draws_the_first_samples_first_then_all_of_them():
    records = numbered_chats(100)
    train_data, _ = build_datasets(records, TOK, DataConfig(seq_len=32, val_fraction=0.0, curriculum_epochs=2.0))
    plain_data, _ = build_datasets(records, TOK, DataConfig(seq_len=32, val_fraction=0.0))
    assert train_data.curriculum_samples == 200
    easy_first = stream(BatchLoader(train_data, batch_size=10, seed=0), 30)
    shuffled = stream(BatchLoader(plain_data, batch_size=10, seed=0), 30)
    for k, number in enumerate(easy_first[:200]):
        assert number < math.ceil((0.1 + 0.9 * k / 200) * 100), (k, number)  # inside the growing easy share
    assert max(easy_first[:20]) < 20 and max(shuffled[:20]) >= 50
    assert sorted(easy_first[200:]) == list(range(100))  # then whole shuffled epochs, as without one
    assert sorted(shuffled[:100]) == list(range(100))


def test_a_curriculum_resumes_exactly_and_refuses_a_changed_one():
    data, _ = build_datasets(numbered_chats(50), TOK, DataConfig(seq_len=32, val_fraction=0.0, curriculum_epochs=1.0))
    loader = BatchLoader(data, batch_size=4, seed=1)
    stream(loader, 3)
    state = json.loads(json.dumps(loader.state_dict()))
    again = BatchLoader(data, batch_size=4, seed=1)
    again.load_state_dict(state)
    assert stream(again, 20) == stream(loader, 20)  # across the end of the curriculum too
    plain, _ = build_datasets(numbered_chats(50), TOK, DataConfig(seq_len=32, val_fraction=0.0))
    with pytest.raises(ConfigError, match="curriculum_samples 50 -> 0"):
        BatchLoader(plain, batch_size=4, seed=1).load_state_dict(state)


def test_curriculum_is_a_run_setting_saved_in_run_yaml(tmp_path):
    run = RunConfig.from_dict({"data": {"path": "x.jsonl"}}).override(["data.curriculum_epochs=0.5"])
    run.save(tmp_path / "run.yaml")
    assert RunConfig.load(tmp_path / "run.yaml").data.curriculum_epochs == 0.5
    with pytest.raises(ConfigError, match="data.curriculum_epochs"):
        DataConfig(curriculum_epochs=-1)


def asked_questions(folder) -> list[tuple[str, str, str]]:
    """(image, question, answer) of every turn in folder/train.jsonl, sorted."""
    turns = []
    for line in (folder / "train.jsonl").read_text().splitlines():
        row = json.loads(line)
        messages = row.get("messages", [])
        for question, answer in zip(messages[::2], messages[1::2], strict=True):
            turns.append((row["image"], question["content"].removeprefix("<image>\n"), answer["content"]))
    return sorted(turns)


def test_shapes_curriculum_lists_easy_records_before_relational_ones(tmp_path):
    generate_shapes(tmp_path / "plain", n=12, seed=3, conversations=True)
    generate_shapes(tmp_path / "easy", n=12, seed=3, conversations=True, curriculum=True)
    rows = [json.loads(line) for line in (tmp_path / "easy" / "train.jsonl").read_text().splitlines()]
    kinds = [row["kind"] for row in rows]
    first_hard = kinds.index("rel")
    assert set(kinds[:first_hard]) == {"nonrel"} and set(kinds[first_hard:]) == {"rel"}
    assert all(  # the caption is asked for in the easy chat
        any(m["content"].endswith(CAPTION_PROMPT) for m in row["messages"]) == (row["kind"] == "nonrel") for row in rows
    )

    assert asked_questions(tmp_path / "easy") == asked_questions(
        tmp_path / "plain"
    )  # the same questions, only in another order
    assert (tmp_path / "easy" / "test.jsonl").read_text() == (tmp_path / "plain" / "test.jsonl").read_text()
