"""Draws the app icon (an aperture: six blades around an open centre) as icon.png, icon.ico and icon.icns.

Run `python assets/make_icon.py` after changing the drawing; build.spec picks the file for the OS.
Drawn at 4x and scaled down so the edges are smooth without an anti-aliasing renderer.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 512
SCALE = 4  # supersampling factor
BACKGROUND = (28, 37, 65)  # deep blue tile
BLADES = [(255, 184, 76), (255, 150, 70), (242, 110, 86), (214, 84, 118), (150, 92, 170), (86, 120, 200)]


def draw(size: int = SIZE) -> Image.Image:
    big = size * SCALE
    image = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    pen = ImageDraw.Draw(image)
    margin = big // 16
    pen.rounded_rectangle((margin, margin, big - margin, big - margin), radius=big // 5, fill=BACKGROUND)
    centre, outer, inner = big / 2, big * 0.36, big * 0.12
    for i, colour in enumerate(BLADES):
        # Each blade is a quadrilateral from the opening's edge out to the rim, twisted by half a blade
        # so that neighbours overlap like the leaves of a camera iris.
        a0 = math.radians(i * 60)
        a1 = a0 + math.radians(60)
        points = [
            (centre + inner * math.cos(a0), centre + inner * math.sin(a0)),
            (centre + outer * math.cos(a0 - 0.35), centre + outer * math.sin(a0 - 0.35)),
            (centre + outer * math.cos(a1 - 0.35), centre + outer * math.sin(a1 - 0.35)),
            (centre + inner * math.cos(a1), centre + inner * math.sin(a1)),
        ]
        pen.polygon(points, fill=colour, outline=BACKGROUND, width=big // 160)
    pen.ellipse((centre - inner, centre - inner, centre + inner, centre + inner), fill=BACKGROUND)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def main() -> None:
    image = draw()
    image.save(HERE / "icon.png")
    image.save(HERE / "icon.ico", sizes=[(16, 16), (24, 24), (32, 32), (48, 48), (64, 64), (128, 128), (256, 256)])
    image.save(HERE / "icon.icns")
    print(f"wrote icon.png, icon.ico and icon.icns in {HERE}")


if __name__ == "__main__":
    main()
