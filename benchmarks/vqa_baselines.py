"""The classic baselines of `apertis bench vqa` (CNN+MLP, Relation Network), trained on the same generated
shapes set and within the same time budget as the model, and scored on the same held-out questions.

The model reads train.jsonl as chats; here every (user, assistant) turn of it becomes one (picture,
question, answer) example, so both see exactly the same questions. Answers are classified among the ones
seen in training (all single words), which is what greedy exact match asks of the model.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from apertis_core.data.images import open_image
from apertis_core.data.shapes import CAPTION_PROMPT
from apertis_core.tokenizer import IMAGE_LINE
from apertis_core.vision.baselines import bag_of_words, build_baseline, question_words

# Santoro et al. trained with Adam at 2.5e-4 for many epochs; the bench's budget is minutes, so 1e-3 with a
# short warm-up. A step takes SCENES pictures with all their questions (about 20 each): the CNN then runs
# once per picture instead of once per question, several times more questions per second on a CPU.
LR, WARMUP, SCENES = 1e-3, 100, 16


@dataclass
class QASet:
    pictures: torch.Tensor  # (S, 3, H, W) uint8, one per scene
    picture: torch.Tensor  # (N,) int64: the scene each question is about
    questions: list[str]
    answers: list[str]
    groups: list[tuple[str, ...]]  # per question, the score groups it counts in: ("nonrel", "nonrel/shape")


def read_set(jsonl: Path) -> QASet:
    """Every question of a shapes jsonl file (single questions or multi-turn chats), captions left out."""
    files: dict[str, int] = {}
    picture, questions, answers, groups = [], [], [], []
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else {}
        turns = row.get("messages", [])
        for ask, reply in zip(turns[::2], turns[1::2], strict=True):
            if ask["content"].removeprefix(IMAGE_LINE) == CAPTION_PROMPT:
                continue  # a caption is not a classifier's answer
            picture.append(files.setdefault(row["image"], len(files)))
            questions.append(ask["content"])
            answers.append(reply["content"])
            groups.append((row["kind"], f"{row['kind']}/{row['qtype']}") if "qtype" in row else ())
    pixels = [torch.frombuffer(bytearray(_rgb(jsonl.parent / name)), dtype=torch.uint8) for name in files]
    size = open_image(jsonl.parent / next(iter(files))).size
    stacked = torch.stack(pixels).view(len(files), size[1], size[0], 3).permute(0, 3, 1, 2).contiguous()
    return QASet(stacked, torch.tensor(picture), questions, answers, groups)


def _rgb(path: Path) -> bytes:
    return open_image(path).tobytes()


def normalise(pictures: torch.Tensor) -> torch.Tensor:
    return (pictures.float() / 255 - 0.5) / 0.25  # the scenes are mostly white: roughly zero mean, unit range


def train_baseline(
    name: str, data: Path, minutes: float, max_steps: int = 0, seed: int = 0, device: str = "cpu"
) -> dict:
    """Train baseline `name` on data/train.jsonl for `minutes` (or `max_steps`), score data/test.jsonl.

    Returns {"steps", "minutes", "accuracy": {group: (fraction, count)}} like the model's result.
    """
    if minutes <= 0 and max_steps <= 0:
        raise ValueError("give the baseline a time budget (minutes) or a step count (max_steps)")
    torch.manual_seed(seed)
    started = time.perf_counter()
    train, test = read_set(data / "train.jsonl"), read_set(data / "test.jsonl")
    words = sorted({w for q in train.questions for w in question_words(q)})
    vocabulary = {w: i for i, w in enumerate(words)}
    answer_names = sorted(set(train.answers))
    answer_index = {a: i for i, a in enumerate(answer_names)}
    model = build_baseline(name, len(words), len(answer_names), train.pictures.shape[-1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / WARMUP))
    bags = bag_of_words(train.questions, vocabulary)
    targets = torch.tensor([answer_index[a] for a in train.answers])
    by_scene = _questions_by_scene(train.picture)
    generator = torch.Generator().manual_seed(seed)
    deadline = time.perf_counter() + minutes * 60 if minutes > 0 else float("inf")  # training time, as the model's
    steps = 0
    model.train()
    while (max_steps <= 0 or steps < max_steps) and time.perf_counter() < deadline:
        scenes = torch.randint(len(by_scene), (SCENES,), generator=generator).tolist()
        asked = [by_scene[s] for s in scenes]
        image_of = torch.repeat_interleave(torch.arange(SCENES), torch.tensor([len(q) for q in asked]))
        rows = torch.cat(asked)
        pictures = normalise(train.pictures[scenes]).to(device)
        logits = model(pictures, bags[rows].to(device), image_of.to(device))
        loss = F.cross_entropy(logits, targets[rows].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        steps += 1
    minutes = (time.perf_counter() - started) / 60  # reading the set and training, as the model's figure
    return {
        "steps": steps,
        "minutes": minutes,
        "accuracy": score_baseline(model, test, vocabulary, answer_names, device),
    }


def _questions_by_scene(picture: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Question indices per scene (read_set keeps only pictures that are asked about, so none is empty)."""
    return torch.argsort(picture, stable=True).split(torch.bincount(picture).tolist())


@torch.no_grad()
def score_baseline(model, test: QASet, vocabulary: dict[str, int], answer_names: list[str], device: str) -> dict:
    """Accuracy per score group; an answer never seen in training counts as wrong."""
    model.eval()
    bags = bag_of_words(test.questions, vocabulary)
    predicted: list[int] = []
    for start in range(0, len(test.questions), 512):
        rows = slice(start, start + 512)
        scenes, image_of = test.picture[rows].unique(return_inverse=True)  # each picture through the CNN once
        logits = model(normalise(test.pictures[scenes]).to(device), bags[rows].to(device), image_of.to(device))
        predicted += logits.argmax(-1).tolist()
    groups: dict[str, list[bool]] = defaultdict(list)
    for index, answer, names in zip(predicted, test.answers, test.groups, strict=True):
        for name in names:
            groups[name].append(answer_names[index] == answer)
    return {name: (sum(oks) / len(oks), len(oks)) for name, oks in sorted(groups.items())}
