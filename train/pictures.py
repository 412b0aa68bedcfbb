"""The PNGs the programs write: labelled image grids and the code-usage histogram.

Every PNG says what it shows: a title with the step, labelled rows, axes with units. Drawn with
PIL only (matplotlib is not a training dependency).
"""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vqvae_jax.codebook import usage_metrics

_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_GRID_INK = (200, 200, 200)
_USED_BAR = (40, 90, 200)
_DEAD_BAR = (220, 40, 40)
_TITLE_SIZE = 18
_TEXT_SIZE = 14
_MARGIN = 10
_MIN_WIDTH = 360  # wide enough for a readable title even above two small images


def write_image_grid(path: str, rows: Sequence[np.ndarray], row_labels: Sequence[str],
                     title: str, scale: int = 4) -> Tuple[int, int]:
  """Writes a PNG of labelled rows of images under a title.

  Each row is drawn below its label, its images side by side, upscaled `scale` times (nearest
  neighbour, so pixels stay visible); rows may hold different numbers of images. The title is
  wrapped to the grid's width (which is at least 360 pixels, for the title's sake).

  Args:
    path: where to write the PNG (replaced atomically).
    rows: uint8 arrays `[n_i, H, W, C]`, `n_i >= 1`, all with the same `H, W` and `C` (1 for
      grayscale, 3 for RGB).
    row_labels: one label per row, drawn above it; `''` for none. If every label is empty
      the rows get no label strip.
    title: drawn at the top, e.g. what the images are and the step; may contain newlines.
    scale: integer upscaling factor, >= 1.

  Returns:
    `(width, height)` of the written image, in pixels.

  Raises:
    ValueError: no rows, a row count different from the label count, a row that is not uint8
      `[n, H, W, C]` with C 1 or 3, rows of different image sizes, or `scale < 1`.
  """
  rows = [np.asarray(row) for row in rows]
  row_labels = [str(label) for label in row_labels]
  if not rows:
    raise ValueError('write_image_grid: got no rows; give at least one [n, H, W, C] array.')
  if len(rows) != len(row_labels):
    raise ValueError(f'write_image_grid: got {len(rows)} rows but {len(row_labels)} row_labels; '
                     f'give one label per row.')
  if not isinstance(scale, (int, np.integer)) or scale < 1:
    raise ValueError(f'write_image_grid: scale must be an integer >= 1, got {scale!r}.')
  for i, row in enumerate(rows):
    if row.dtype != np.uint8 or row.ndim != 4 or row.shape[0] < 1 or row.shape[-1] not in (1, 3):
      raise ValueError(f'write_image_grid: row {i} is {row.dtype} of shape {row.shape}; '
                       f'expected uint8 [n, H, W, C] with n >= 1 and C 1 or 3.')
    if row.shape[1:] != rows[0].shape[1:]:
      raise ValueError(f'write_image_grid: row {i} holds images of shape {row.shape[1:]}, row 0 '
                       f'of {rows[0].shape[1:]}; all images must have one size.')

  title_font, label_font = _font(_TITLE_SIZE), _font(_TEXT_SIZE)
  height, width = rows[0].shape[1] * scale, rows[0].shape[2] * scale
  gap = max(2, scale)  # between images, so that neighbours do not read as one picture
  grid_width = max(len(row) for row in rows) * (width + gap) - gap
  canvas_width = max(grid_width, _MIN_WIDTH) + 2 * _MARGIN
  title_lines = _wrap(title, title_font, canvas_width - 2 * _MARGIN)
  canvas_width = max(canvas_width, max(_text_size(line, title_font)[0] for line in title_lines)
                     + 2 * _MARGIN)  # a word wider than the grid
  title_height = _line_height(title_font) * len(title_lines)
  label_height = _line_height(label_font) + 2 if any(row_labels) else 0
  row_height = label_height + height + _MARGIN
  canvas = Image.new('RGB', (canvas_width, _MARGIN + title_height + _MARGIN +
                             len(rows) * row_height), _BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  y = _MARGIN
  for line in title_lines:
    draw.text((_MARGIN, y), line, fill=_INK, font=title_font)
    y += _line_height(title_font)
  y += _MARGIN
  for row, label in zip(rows, row_labels):
    if label_height:
      draw.text((_MARGIN, y), label, fill=_INK, font=label_font)
    y += label_height
    for j, image in enumerate(row):
      tile = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
      canvas.paste(tile.convert('RGB').resize((width, height), Image.NEAREST),
                   (_MARGIN + j * (width + gap), y))
    y += height + _MARGIN
  _save_atomically(canvas, path)
  return canvas.size


def write_reconstruction_grid(path: str, originals: np.ndarray, reconstructions: np.ndarray,
                              step: int, scale: int = 4) -> Tuple[int, int]:
  """A PNG of held-out images (top row) above their reconstructions, titled with the step.

  Args:
    path: where to write the PNG.
    originals: uint8 `[n, H, W, C]`.
    reconstructions: uint8 `[n, H, W, C]`, in the same order.
    step: the training step of the model that reconstructed them.
    scale: upscaling factor.

  Returns:
    `(width, height)` of the PNG (see `write_image_grid`).
  """
  return write_image_grid(
      path, [originals, reconstructions], ['held-out originals', 'reconstructions'],
      f'Reconstructions of held-out images, step {step}', scale=scale)


def write_usage_histogram(path: str, code_counts: np.ndarray, step: int,
                          plot_height: int = 200) -> Tuple[int, int]:
  """A PNG bar chart of how many held-out vectors chose each code, codes sorted by count.

  Titled with the step and the number of codes used, dead (count 0, drawn as red stubs at the
  right) and the perplexity; the y axis counts held-out vectors, the x axis is the code's rank.

  Args:
    path: where to write the PNG.
    code_counts: `[K]` counts over the held-out split (`Evaluator`'s `code_counts`), or
      `[S, K]` for `S` residual stages: their codes are ranked together.
    step: the training step of the model that was evaluated.
    plot_height: height of the plotting area in pixels.

  Returns:
    `(width, height)` of the PNG.
  """
  stage_counts = np.asarray(code_counts, np.float64).reshape(-1, np.shape(code_counts)[-1])
  counts = np.sort(stage_counts.reshape(-1))[::-1]
  num_codes = len(counts)
  usage = [usage_metrics(jnp.asarray(stage)) for stage in stage_counts]
  used = sum(int(stage['codes_used']) for stage in usage)
  dead = num_codes - used
  perplexity = np.mean([float(stage['perplexity']) for stage in usage])
  title_font, font = _font(_TITLE_SIZE), _font(_TEXT_SIZE)
  title = f'Code usage on the held-out split, step {step}'
  stages = '' if len(stage_counts) == 1 else f' over {len(stage_counts)} stages'
  subtitle = (f'{used} of {num_codes} codes used{stages}, {dead} dead (red: never chosen); '
              f'perplexity {perplexity:.1f}{" per stage" if stages else ""}')
  peak = max(float(counts.max()), 1.0)
  y_ticks = _nice_ticks(peak)
  y_top = max(y_ticks[-1], peak)
  tick_labels = [f'{tick:,.0f}' for tick in y_ticks]
  left = _MARGIN + max(_text_size(label, font)[0] for label in tick_labels) + 8
  bar = max(1, 768 // num_codes)
  plot_width = min(max(num_codes * bar, 384), 1024)
  x_label = 'code rank (codes sorted by their count, most used first)'
  y_label = 'count of held-out vectors'
  width = max(left + plot_width + _MARGIN + 10,
              2 * _MARGIN + max(_text_size(text, f)[0] for text, f in
                                ((title, title_font), (subtitle, font), (x_label, font))))
  line = _line_height(font)
  top = _MARGIN + _line_height(title_font) + line + 6 + line + 4  # title, subtitle, y label
  bottom = top + plot_height
  height = bottom + 6 + line + 4 + line + _MARGIN  # x ticks, x label
  image = Image.new('RGB', (width, height), _BACKGROUND)
  draw = ImageDraw.Draw(image)
  draw.text((_MARGIN, _MARGIN), title, fill=_INK, font=title_font)
  draw.text((_MARGIN, _MARGIN + _line_height(title_font)), subtitle, fill=_INK, font=font)
  draw.text((_MARGIN, top - line - 4), y_label, fill=_INK, font=font)
  to_y = lambda count: bottom - (plot_height - 1) * count / y_top
  for tick, label in zip(y_ticks, tick_labels):
    y = round(to_y(tick))
    draw.line([(left, y), (left + plot_width, y)], fill=_GRID_INK)
    draw.line([(left - 4, y), (left, y)], fill=_INK)
    label_width, label_height = _text_size(label, font)
    draw.text((left - 6 - label_width, y - label_height // 2 - 2), label, fill=_INK, font=font)
  for rank, count in enumerate(counts):
    x0 = left + 1 + rank * plot_width // num_codes  # + 1: right of the y axis
    x1 = max(x0, left + (rank + 1) * plot_width // num_codes - (1 if bar > 2 else 0))
    if count > 0:
      draw.rectangle([x0, min(round(to_y(count)), bottom - 1), x1, bottom], fill=_USED_BAR)
    else:
      draw.rectangle([x0, bottom - 3, x1, bottom], fill=_DEAD_BAR)
  draw.line([(left, top), (left, bottom), (left + plot_width, bottom)], fill=_INK)
  for rank in _rank_ticks(num_codes):
    x = left + round((rank - 0.5) * plot_width / num_codes)
    draw.line([(x, bottom), (x, bottom + 4)], fill=_INK)
    label = str(rank)
    label_width = _text_size(label, font)[0]
    draw.text((min(max(x - label_width // 2, 0), width - label_width), bottom + 6), label,
              fill=_INK, font=font)
  draw.text((left + (plot_width - _text_size(x_label, font)[0]) // 2, bottom + 6 + line + 4),
            x_label, fill=_INK, font=font)
  _save_atomically(image, path)
  return image.size


def _font(size: int) -> ImageFont.ImageFont:
  try:
    return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable
  except (TypeError, OSError, ImportError):
    return ImageFont.load_default()


def _text_size(text: str, font) -> Tuple[int, int]:
  left, top, right, bottom = ImageDraw.Draw(Image.new('RGB', (1, 1))).textbbox((0, 0), text,
                                                                               font=font)
  return right - min(left, 0), bottom - min(top, 0)


def _line_height(font) -> int:
  return _text_size('Ag', font)[1] + 4


def _wrap(text: str, font, max_width: int) -> List[str]:
  """`text` in lines no wider than `max_width` where its words allow (newlines kept)."""
  lines = []
  for paragraph in text.split('\n'):
    line = ''
    for word in paragraph.split(' '):
      candidate = f'{line} {word}' if line else word
      if line and _text_size(candidate, font)[0] > max_width:
        lines.append(line)
        line = word
      else:
        line = candidate
    lines.append(line)
  return lines


def _nice_ticks(peak: float) -> List[float]:
  """0 and round multiples (1, 2 or 5 times a power of 10) up to about `peak`, 3 to 6 ticks."""
  raw_step = peak / 4
  magnitude = 10 ** np.floor(np.log10(raw_step)) if raw_step > 0 else 1.0
  step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
  step = max(step, 1.0)  # counts are whole vectors
  return [i * step for i in range(int(np.ceil(peak / step - 1e-9)) + 1)]


def _rank_ticks(num_codes: int) -> List[int]:
  """Ranks 1 and `num_codes` and round ranks between them, about 5 in all."""
  if num_codes <= 8:
    return list(range(1, num_codes + 1))
  step = _nice_ticks(num_codes)[1]
  ticks = [1] + [int(rank) for rank in np.arange(step, num_codes, step)]
  return ticks + [num_codes] if num_codes - ticks[-1] >= step / 2 else ticks[:-1] + [num_codes]


def _save_atomically(image: Image.Image, path: str) -> None:
  tmp = path + '.tmp'
  image.save(tmp, format='PNG')
  os.replace(tmp, path)
