"""Images between PIL and tensors, the ``IMAGE`` prompt marker, and a labelled grid for people to look at.

The bottom of the package: every layer (data, generation, evaluation, Lightning, CLI) may import it.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

IMAGE = object()  # end a prompt with IMAGE to force BOI: the prompt's image is generated next


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor (3, H, W) in [-1, 1] (converted to RGB)."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def to_pil(image: torch.Tensor) -> Image.Image:
    """Float tensor (3, H, W) in [-1, 1] -> PIL RGB image."""
    array = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, "RGB")


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line]


def image_grid(tiles: list[tuple[Image.Image | torch.Tensor, str]], scale: int = 4, columns: int = 4) -> Image.Image:
    """Images enlarged ``scale`` times (at most 256 px), each above its text (up to 3 lines), ``columns`` a row."""
    if not tiles:
        return Image.new("RGB", (1, 1), "white")
    tiles = [(to_pil(image) if isinstance(image, torch.Tensor) else image, text) for image, text in tiles]
    side = min(256, tiles[0][0].width * scale)
    cell_w, text_h = max(side, 200), 40
    rows = (len(tiles) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell_w, rows * (side + text_h)), "white")
    pen = ImageDraw.Draw(grid)
    for i, (image, text) in enumerate(tiles):
        x, y = (i % columns) * cell_w, (i // columns) * (side + text_h)
        grid.paste(image.convert("RGB").resize((side, side), Image.NEAREST), (x + (cell_w - side) // 2, y))
        for j, line in enumerate(_wrap(text, cell_w // 6)[:3]):
            pen.text((x + 4, y + side + 1 + 12 * j), line, fill="black")
    return grid
