"""Drawing a scene: each shape in its grid cell with Pillow, hidden cells under a gray occluder."""

from __future__ import annotations

from PIL import Image, ImageDraw

from training.scene_world import COLORS, GRID, Scene

CELL = 16  # px; cell (row, col) spans [16*col, 16*col + 15] x [16*row, 16*row + 15]
IMAGE_SIZE = GRID * CELL  # 64
BACKGROUND = (255, 255, 255)
OCCLUDER = (128, 128, 128)


def render_scene(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image; hidden cells are painted over with the gray occluder."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        # Centre of the cell plus jitter; |jitter| + half <= 7 keeps each shape inside its cell.
        cx, cy, h = CELL // 2 + CELL * s.col + s.dx, CELL // 2 + CELL * s.row + s.dy, s.half
        fill = COLORS[s.color]
        if s.shape == "circle":
            draw.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif s.shape == "square":
            draw.rectangle((cx - h + 1, cy - h + 1, cx + h - 1, cy + h - 1), fill=fill)
        else:
            draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    for row, col in scene.hidden:
        draw.rectangle((CELL * col, CELL * row, CELL * (col + 1) - 1, CELL * (row + 1) - 1), fill=OCCLUDER)
    return img
