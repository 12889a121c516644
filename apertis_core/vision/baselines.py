"""The classic Sort-of-CLEVR baselines (Santoro et al. 2017) that `apertis bench vqa` trains beside the model.

Both read the raw picture with a small CNN and the question as a bag of words, and classify the answer
among the answers seen in training: the CNN+MLP flattens the whole feature map into an MLP; the Relation
Network treats every feature-map cell (with its coordinates) as an object and sums a shared MLP g over all
pairs of objects, conditioned on the question, before an MLP f answers. They bound what a model can reach
on the generated data in a given time, and show that it is learnable at all. Pure tensors, no I/O.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

BASELINES = ("cnn_mlp", "rn")
_WORD = re.compile(r"[a-z0-9]+")


def question_words(question: str) -> list[str]:
    """Lower-case words of a question, placeholders and punctuation dropped ("<image>" is not a word)."""
    return _WORD.findall(question.replace("<image>", " ").lower())


def bag_of_words(questions: list[str], vocabulary: dict[str, int]) -> torch.Tensor:
    """(N, len(vocabulary)) multi-hot rows. Word order carries nothing in these templated questions: the set
    of words names the question type and the object, which is all Santoro et al.'s one-hot encoding holds."""
    rows = torch.zeros(len(questions), len(vocabulary))
    for i, question in enumerate(questions):
        for word in question_words(question):
            if word in vocabulary:  # a word never seen in training carries no learned meaning
                rows[i, vocabulary[word]] = 1.0
    return rows


class ConvTrunk(nn.Module):
    """Four 3x3 stride-2 convolutions with batch norm and ReLU, 24 channels, as in Santoro et al.: a 64 px
    scene becomes a 4 x 4 grid of cells, each seeing about one object."""

    def __init__(self, channels: int = 24, layers: int = 4):
        super().__init__()
        blocks: list[nn.Module] = []
        for index in range(layers):
            blocks += [
                nn.Conv2d(3 if index == 0 else channels, channels, 3, stride=2, padding=1),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            ]
        self.net = nn.Sequential(*blocks)
        self.channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, C, H / 16, W / 16)


def answer_mlp(in_width: int, width: int, n_answers: int) -> nn.Sequential:
    """Santoro et al.'s answer classifier: two ReLU layers, dropout 0.5, then the answer logits."""
    return nn.Sequential(
        nn.Linear(in_width, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(width, n_answers),
    )


class CNNMLP(nn.Module):
    """CNN feature map, flattened, beside the question -> MLP -> answer logits."""

    def __init__(self, n_words: int, n_answers: int, image_size: int, channels: int = 24, width: int = 256):
        super().__init__()
        self.trunk = ConvTrunk(channels)
        cells = (-(-image_size // 16)) ** 2  # each stride-2 layer halves a side, rounding up
        self.mlp = answer_mlp(channels * cells + n_words, width, n_answers)

    def forward(
        self, images: torch.Tensor, questions: torch.Tensor, image_of: torch.Tensor | None = None
    ) -> torch.Tensor:
        features = self.trunk(images).flatten(1)  # (S, C * cells)
        features = features if image_of is None else features[image_of]  # (B, C * cells)
        return self.mlp(torch.cat([features, questions], dim=1))  # (B, answers)


class RelationNetwork(nn.Module):
    """RN(O, q) = f(sum over object pairs (i, j) of g(o_i, o_j, q)); objects are the CNN's cells plus their
    (x, y) coordinates, so "closest" and "farthest" can be computed from the pair."""

    def __init__(self, n_words: int, n_answers: int, channels: int = 24, g_width: int = 128, f_width: int = 256):
        super().__init__()
        self.trunk = ConvTrunk(channels)
        objects = channels + 2
        # g's first layer on the concatenation [o_i, o_j, q] is A o_i + B o_j + C q: computed once per object
        # and question and broadcast over the pairs, instead of once per pair (N times fewer multiplications).
        self.g_left = nn.Linear(objects, g_width)
        self.g_right = nn.Linear(objects, g_width, bias=False)
        self.g_question = nn.Linear(n_words, g_width, bias=False)
        self.g = nn.Sequential(
            nn.ReLU(), nn.Linear(g_width, g_width), nn.ReLU(), nn.Linear(g_width, g_width), nn.ReLU()
        )
        self.f = answer_mlp(g_width, f_width, n_answers)

    def forward(
        self, images: torch.Tensor, questions: torch.Tensor, image_of: torch.Tensor | None = None
    ) -> torch.Tensor:
        cells = self.trunk(images)  # (S, C, H, W)
        cells = cells if image_of is None else cells[image_of]  # (B, C, H, W): one picture, many questions
        batch, _, height, width = cells.shape
        ys, xs = torch.meshgrid(
            torch.linspace(-1, 1, height, device=cells.device),
            torch.linspace(-1, 1, width, device=cells.device),
            indexing="ij",
        )
        coords = torch.stack([xs, ys], dim=-1).reshape(1, height * width, 2).expand(batch, -1, -1)
        objects = torch.cat([cells.flatten(2).transpose(1, 2), coords.to(cells.dtype)], dim=-1)  # (B, N, C + 2)
        pairs = (
            self.g_left(objects)[:, :, None]  # (B, N, 1, G)
            + self.g_right(objects)[:, None, :]  # (B, 1, N, G)
            + self.g_question(questions)[:, None, None]  # (B, 1, 1, G)
        )  # (B, N, N, G)
        relations = self.g(pairs).mean(dim=(1, 2))  # (B, G); the mean, not the sum: same model, inputs to f stay O(1)
        return self.f(relations)  # (B, answers)


def build_baseline(name: str, n_words: int, n_answers: int, image_size: int) -> nn.Module:
    if name == "cnn_mlp":
        return CNNMLP(n_words, n_answers, image_size)
    if name == "rn":
        return RelationNetwork(n_words, n_answers)
    raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINES)}")
