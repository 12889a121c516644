"""`python -m benchmarks.vqa_probe BUNDLE`: where a VQA model looks, what reaches the answer, what the encoder keeps.

Three measurements on held-out shapes scenes (`apertis data demo shapes --n N --seed S --out DIR`, single
questions per scene), for questions that name an object by colour ("... the red object ..."):

- **Look**: at the position that predicts the answer, the share of each cross-attention head's attention on
  the patches that hold the named object, per question type and layer (the best head; the share a head
  spreading evenly over the picture would give is printed beside it). A model that finds the object puts
  most of a head's attention there. For "the object closest to / farthest from" colour questions, also the
  share on the object the answer names: whether the second look, from the named object to that one, is made.
  With `--before N`, also the share on the named object at each of the N tokens before that position (the
  colour word is 4 before it): a look made at the colour word in the last layer cannot reach the answer.
- **Carry**: a linear probe for the named colour from each cross-attention layer's input at that position,
  per question type: whether the question has brought the name there for a lookup to use.
- **Keep**: a linear probe (fit on 70% of the objects, scored on 30%) for the named object's shape from the
  mean encoder token over its patches, and from each cross-attention layer's values there; beside it the same
  probe on a freshly initialised model of the same config. Near 33% means the features do not say the shape.
  The same for the colour of the object closest to and farthest from it: near 17-20% means the patches say
  nothing about the object's neighbours, so no single look at it can answer a relational colour question.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

import torch

NAMED = re.compile(r"the (\w+) object")
# What `keep` probes the named object's patches for, by the question type whose answer is the label.
KEPT = {"shape": "shape", "closest_colour": "closest object's colour", "farthest_colour": "farthest object's colour"}


def named_patches(picture: Path, colour_rgb: tuple[int, int, int], patch: int) -> torch.Tensor:
    """(patches,) bool, row-major: the patches holding any pixel of exactly this colour."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(picture).convert("RGB")).astype(int)
    rows, cols = pixels.shape[0] // patch, pixels.shape[1] // patch
    hit = (np.abs(pixels - np.array(colour_rgb)).sum(-1) == 0)[: rows * patch, : cols * patch]
    return torch.from_numpy(hit.reshape(rows, patch, cols, patch).any(axis=(1, 3)).reshape(-1))


def object_patches(picture: Path, colour: str, patch: int, patches: int) -> torch.Tensor:
    """`named_patches` of a picture the model sees as `patches` tokens, refused when the two grids differ."""
    from apertis_core.data.shapes import COLOURS

    on = named_patches(picture, COLOURS[colour], patch)
    if on.numel() != patches:
        raise ValueError(
            f"{picture}: the model sees {patches} patches but the picture holds {on.numel()} of {patch} px; the "
            "probe needs pictures the model takes unscaled (shapes scenes from `apertis data demo shapes` are)"
        )
    return on


def questions(data: Path, limit: int) -> list[dict]:
    """Held-out rows that name an object by one of the scene colours (with the colour and the row's index)."""
    from apertis_core.data.shapes import COLOURS

    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines() if line.strip()]
    picked = []
    for index, row in enumerate(rows):
        named = NAMED.search(row["messages"][0]["content"])
        if named and named.group(1) in COLOURS:
            picked.append({**row, "colour": named.group(1), "index": index})
        if len(picked) == limit:
            break
    return picked


def look(
    model, tokenizer, data: Path, rows: list[dict], batch: int = 50, before: int = 0
) -> tuple[dict, dict, dict, dict]:
    """{(qtype, layer): (best head's mean share on the object, even share)} at the answer-predicting position;
    the same for the object the answer names, for relational colour questions; {(qtype, layer): [(that
    layer's input there, the named colour's index)]} for `carry`; and {(qtype, layer, tokens before, that
    token in the type's first question): (best share on the named object, even share)} for 1..`before`."""
    from apertis_core.data import load_dataset
    from apertis_core.data.shapes import COLOURS
    from apertis_core.evaluation import IGNORE_INDEX, TokenDataset, encode_records, make_windows
    from apertis_core.model.cross_attention import NEVER, GatedCrossAttention
    from apertis_core.vision import ImageCache

    every, report = load_dataset(data / "test.jsonl")  # read as the trainer reads any chat file
    if len(every) != sum(1 for line in (data / "test.jsonl").read_text().splitlines() if line.strip()):
        raise RuntimeError(f"{data / 'test.jsonl'}: some records were skipped:\n{report.to_text()}")
    records = [every[row["index"]] for row in rows]
    cfg = model.config
    images = ImageCache(cfg.image_patch_size, cfg.image_max_patches)
    encoded = encode_records(records, tokenizer, images.file_tokens)
    length = max(len(e.ids) for e in encoded) - 1
    samples = TokenDataset(make_windows(encoded, length), length, tokenizer.pad_id)
    layers = [m for m in model.modules() if isinstance(m, GatedCrossAttention)]
    inputs: list = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[0], args[1]))) for m in layers]
    shares: dict = defaultdict(list)
    answered: dict = defaultdict(list)
    carried: dict = defaultdict(list)
    earlier: dict = defaultdict(list)
    words: dict = {}
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch):
                items = [samples[i] for i in range(start, min(start + batch, len(rows)))]
                labels = torch.stack([it["labels"] for it in items])
                inputs.clear()
                ids = torch.stack([it["input_ids"] for it in items])
                model(
                    ids,
                    images=images.batch([it["images"] for it in items], train=False, device="cpu"),
                )
                answer_at = (labels != IGNORE_INDEX).float().argmax(1)
                for index, (layer, x, memory) in enumerate(inputs):
                    weights = layer.attention_weights(x, memory)  # (B, H, T, 1 + M)
                    seen = (memory.positions != NEVER).sum(1)  # (B,) patches of each sample's one picture
                    for j, row in enumerate(rows[start : start + len(items)]):
                        named = object_patches(data / row["image"], row["colour"], cfg.image_patch_size, int(seen[j]))
                        read = weights[j, :, answer_at[j], 1 : 1 + named.numel()]
                        shares[(row["qtype"], index)].append((read[:, named].sum(-1), named.float().mean()))
                        if row["kind"] == "rel" and row["qtype"].endswith("_colour"):
                            target = row["messages"][-1]["content"]
                            on = object_patches(data / row["image"], target, cfg.image_patch_size, int(seen[j]))
                            answered[(row["qtype"], index)].append((read[:, on].sum(-1), on.float().mean()))
                        carried[(row["qtype"], index)].append((x[j, answer_at[j]], list(COLOURS).index(row["colour"])))
                        for back in range(1, min(before, int(answer_at[j])) + 1):
                            at = int(answer_at[j]) - back
                            word = words.setdefault((row["qtype"], back), tokenizer.decode([int(ids[j, at])]))
                            read = weights[j, :, at, 1 : 1 + named.numel()]
                            earlier[(row["qtype"], index, back, word)].append(
                                (read[:, named].sum(-1), named.float().mean())
                            )
    finally:
        for hook in hooks:
            hook.remove()

    def best(found: dict) -> dict:
        return {
            key: (float(torch.stack([s for s, _ in got]).mean(0).max()), float(sum(e for _, e in got) / len(got)))
            for key, got in sorted(found.items())
        }

    return best(shares), best(answered), dict(sorted(carried.items())), best(earlier)


def carry(carried: dict) -> dict:
    """{(qtype, layer): held-out accuracy of a linear probe for the named colour}, from `look`'s second dict."""
    from apertis_core.data.shapes import COLOURS

    return {
        key: linear_probe(torch.stack([x for x, _ in got]), torch.tensor([c for _, c in got]), len(COLOURS))
        for key, got in carried.items()
    }


def keep(model, data: Path, rows: list[dict], qtype: str = "shape", limit: int = 900) -> list[float]:
    """Accuracy of a probe for the answer to `qtype` questions about the named object (its shape, or the colour
    of the object closest to or farthest from it) from the encoder tokens, then each cross-attention layer's
    values, averaged over the named object's patches."""
    from PIL import Image

    from apertis_core.model.cross_attention import GatedCrossAttention
    from apertis_core.vision import preprocess_image

    cfg = model.config
    objects = list({(r["image"], r["colour"]): r for r in rows if r["qtype"] == qtype}.values())[:limit]
    pictures = sorted({r["image"] for r in objects})
    where = {name: i for i, name in enumerate(pictures)}
    tensors = [
        preprocess_image(Image.open(data / p).convert("RGB"), cfg.image_patch_size, cfg.image_max_patches)
        for p in pictures
    ]
    layers = [m for m in model.modules() if isinstance(m, GatedCrossAttention)]
    with torch.no_grad():
        tokens = torch.stack(model.vision(tensors))  # (pictures, patches, D)
        views = [tokens] + [layer.kv(layer.memory_norm(tokens)).chunk(2, -1)[1] for layer in layers]
    patches = tokens.shape[1]
    masks = [object_patches(data / r["image"], r["colour"], cfg.image_patch_size, patches).float() for r in objects]
    objects, masks = [r for r, m in zip(objects, masks, strict=True) if m.any()], [m for m in masks if m.any()]
    names = sorted({r["messages"][-1]["content"] for r in objects})
    labels = torch.tensor([names.index(r["messages"][-1]["content"]) for r in objects])
    scores = []
    for view in views:
        feats = torch.stack(
            [(view[where[r["image"]]] * m[:, None]).sum(0) / m.sum() for r, m in zip(objects, masks, strict=True)]
        )
        scores.append(linear_probe(feats, labels, len(names)))
    return scores


def linear_probe(feats: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    """Held-out accuracy of a logistic regression fit on the first 70%."""
    feats = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    fit = int(0.7 * len(labels))
    weight = torch.zeros(feats.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(400):
        loss = (
            torch.nn.functional.cross_entropy(feats[:fit] @ weight + bias, labels[:fit]) + 1e-3 * weight.square().sum()
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return float(((feats[fit:] @ weight + bias).argmax(1) == labels[fit:]).float().mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="a generated shapes set (its test.jsonl and images)")
    parser.add_argument("--rows", type=int, default=600, help="questions to look through (default 600)")
    parser.add_argument("--before", type=int, default=0, help="also look at this many tokens before the answer")
    args = parser.parse_args(argv)
    from apertis_core import ApertisModel, load_bundle
    from apertis_core.data.shapes import COLOURS

    if not (args.data / "test.jsonl").is_file():
        parser.error(f"{args.data} has no test.jsonl: make one with `apertis data demo shapes --out {args.data}`")
    torch.manual_seed(0)
    model, tokenizer = load_bundle(args.bundle, device="cpu")
    if model.vision is None or not model.config.cross_attn_every:
        parser.error(f"{args.bundle} has no image encoder with cross-attention to probe (model.cross_attn_every)")
    model.eval()
    rows = questions(args.data, args.rows)
    print(f"{args.bundle}: {len(rows)} questions from {args.data}")
    print("look: best head's share of attention on the named object at the answer (even spread beside it)")
    shares, answered, carried, earlier = look(model, tokenizer, args.data, rows, before=args.before)
    for (qtype, layer), (share, even) in shares.items():
        print(f"  {qtype:<18} layer {layer}: {share:6.1%}  (even {even:.1%})")
    print("look (answer): best head's share on the object the answer names, closest/farthest colour questions")
    for (qtype, layer), (share, even) in answered.items():
        print(f"  {qtype:<18} layer {layer}: {share:6.1%}  (even {even:.1%})")
    if earlier:
        print("look (before): best head's share on the named object at each token before the answer's position")
    for (qtype, layer, back, word), (share, even) in earlier.items():
        print(f"  {qtype:<18} layer {layer}, {back} before ({word.strip()!r}): {share:6.1%}  (even {even:.1%})")
    print("carry: the named colour read by a linear probe from each cross-attention layer's input at the answer")
    for (qtype, layer), accuracy in carry(carried).items():
        print(f"  {qtype:<18} layer {layer}: {accuracy:6.1%}  (chance {1 / len(COLOURS):.1%})")
    fresh = ApertisModel(model.config).eval()
    kept = questions(args.data, 10 * args.rows)
    for qtype, what in KEPT.items():
        if not any(row["qtype"] == qtype for row in kept):  # scenes of two objects have no closest or farthest
            print(f"keep: no {qtype} questions among the first {len(kept)} of {args.data / 'test.jsonl'}")
            continue
        for name, probed in (("trained", model), ("fresh init", fresh)):
            encoder, *values = keep(probed, args.data, kept, qtype)
            print(
                f"keep ({name}): {what} from encoder tokens {encoder:.1%}; from values",
                " ".join(f"{v:.1%}" for v in values),
            )


if __name__ == "__main__":
    main()
