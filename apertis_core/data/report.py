"""ValidationReport: what a dataset holds (counts, lengths, a histogram) and every problem found in it."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .dataset import encode_records
from .records import Problem, Record, printable

_BAR_WIDTH = 30  # characters for the longest histogram bar in to_text()


@dataclass
class ValidationReport:
    path: str  # the dataset path as the user gave it
    problems: list[Problem]  # one per dropped record (or file, or undecodable line), in reading order
    stats: dict  # see dataset_stats; plain JSON-able values so the studio can store and chart them

    @classmethod
    def build(cls, path: str, records: Sequence[Record], problems: list[Problem], tokenizer=None) -> ValidationReport:
        return cls(printable(path), problems, dataset_stats(records, tokenizer))

    @property
    def records(self) -> int:
        """Usable records."""
        return self.stats["records"]

    @property
    def skipped(self) -> int:
        """Records, files or lines left out: each problem dropped exactly one of them."""
        return len(self.problems)

    @property
    def ok(self) -> bool:
        return self.records > 0 and not self.problems

    def to_text(self, max_problems: int = 0) -> str:
        """The summary and the problems, the first `max_problems` of them when > 0 (0 lists all)."""
        s = self.stats
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(s["kinds"].items())) or "none"
        tokens = f", tokens: {s['tokens']:,}" if "tokens" in s else ""
        lines = [
            f"Dataset {self.path}",
            f"  records: {self.records:,} ({kinds}), skipped: {self.skipped:,}",
            f"  characters: {s['characters']:,}{tokens}, images: {s['images']:,}",
        ]
        lines += _length_lines(s["length"])
        if self.problems:
            lines.append(f"Problems ({len(self.problems)}):")
            shown = self.problems[:max_problems] if max_problems > 0 else self.problems
            lines += [f"  {p}" for p in shown]
            if len(shown) < len(self.problems):
                lines.append(f"  ... and {len(self.problems) - len(shown)} more (--max-problems 0 lists them all)")
        if self.records == 0:
            lines.append("No usable records: nothing to train on. Fix the problems above.")
        elif self.problems:
            lines.append(
                f"{len(self.problems)} problem(s): those parts were skipped. Fix them, or train on the {self.records:,} good records."
            )
        else:
            lines.append("OK: no problems found.")
        return "\n".join(lines)


def dataset_stats(records: Sequence[Record], tokenizer=None) -> dict:
    """records, kinds (counted by Record.kind_label), characters, images; with a tokenizer also tokens
    (template and <|eot|> included, as trained; an image counts as its one <image> placeholder, since its
    patch count depends on the model); `length` describes per-record lengths in tokens when known, else
    in characters."""
    chars = [r.characters for r in records]
    stats = {
        "records": len(records),
        "kinds": dict(Counter(r.kind_label for r in records)),
        "characters": sum(chars),
        "images": sum(len(r.images) for r in records),
    }
    lengths, unit = chars, "characters"
    if tokenizer is not None:
        lengths, unit = [len(e.ids) for e in encode_records(records, tokenizer, lambda _: 1)], "tokens"
        stats["tokens"] = sum(lengths)
    stats["length"] = length_stats(lengths, unit)
    return stats


def length_stats(values: Sequence[int], unit: str, bins: int = 10) -> dict:
    """min/max/mean/median and an equal-width histogram [{"from", "to" (exclusive), "count"}]."""
    if not values:
        return {"unit": unit, "min": 0, "max": 0, "mean": 0.0, "median": 0.0, "histogram": []}
    lo, hi = min(values), max(values)
    width = max(1, -(-(hi - lo + 1) // bins))  # ceil: integer bins that cover [lo, hi]
    counts = Counter((v - lo) // width for v in values)
    n_bins = (hi - lo) // width + 1
    histogram = [{"from": lo + b * width, "to": lo + (b + 1) * width, "count": counts.get(b, 0)} for b in range(n_bins)]
    return {
        "unit": unit,
        "min": lo,
        "max": hi,
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "histogram": histogram,
    }


def _length_lines(length: dict) -> list[str]:
    if not length["histogram"]:
        return []
    lines = [
        f"  {length['unit']} per record: min {length['min']:,}, median {length['median']:,.0f}, "
        f"mean {length['mean']:,.1f}, max {length['max']:,}"
    ]
    top = max(b["count"] for b in length["histogram"])
    for b in length["histogram"]:
        bar = "█" * round(_BAR_WIDTH * b["count"] / top)
        lines.append(f"    {b['from']:>9,} – {b['to'] - 1:<9,} {bar} {b['count']:,}")
    return lines
