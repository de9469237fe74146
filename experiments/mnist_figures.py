"""Figures of the MNIST quantization study, written as PNG files.

Three figures, each drawn with matplotlib's Agg backend (no display) and written atomically
(a temporary file in the destination directory, then os.replace):

  * `accuracy_and_size`: per model, test accuracy and serialized size of every variant
    (float32, float16, bfloat16, dynamic int8, static int8, QAT int8, ...);
  * `weight_histograms`: one layer's float weights against their dequantized int8 values,
    and the quantization error in units of the scale;
  * `layer_sqnr`: per-layer weight SQNR in dB, grouped by model.

Usage from a study script:

  import mnist_figures
  mnist_figures.accuracy_and_size(results, out / "accuracy_size.png")
"""

from __future__ import annotations

import math
import numbers
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # pylint: disable=wrong-import-position
import matplotlib.ticker  # pylint: disable=wrong-import-position
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

DPI = 120
ERROR_RANGE = 1.0  # the error panel's half width, in units of the scale
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
           "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


def save_png(fig: Any, path: str | os.PathLike) -> pathlib.Path:
  """Writes `fig` as a PNG to `path` atomically, closes it, and returns the path.

  Args:
    fig: The matplotlib figure; closed whatever happens.
    path: Destination; missing parent directories are created.

  Returns:
    `path` as a pathlib.Path.
  """
  path = pathlib.Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
      with os.fdopen(fd, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI)
      os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the figure from other users
      os.replace(tmp, path)
    except BaseException:
      pathlib.Path(tmp).unlink(missing_ok=True)
      raise
  finally:
    plt.close(fig)
  return path


def _is_real(x: Any) -> TypeGuard[float]:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_results(results: Any) -> dict[str, list[dict]]:
  """The {model: rows} of `results`, after checking its layout; raises ValueError."""
  if not isinstance(results, Mapping) or not isinstance(results.get("models"), Mapping):
    raise ValueError("results: expected a mapping with a 'models' mapping")
  models = results["models"]
  if not models:
    raise ValueError("results: 'models' is empty")
  checked = {}
  for name, model in models.items():
    rows = model.get("rows") if isinstance(model, Mapping) else None
    if not isinstance(rows, Sequence) or not rows:
      raise ValueError(f"results: model {name!r} has no rows")
    seen = set()
    for i, row in enumerate(rows):
      where = f"results: model {name!r} row {i}"
      if not isinstance(row, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(row).__name__}")
      variant = row.get("variant")
      if not isinstance(variant, str) or not variant:
        raise ValueError(f"{where}: 'variant' must be a non-empty string, got {variant!r}")
      if variant in seen:
        raise ValueError(f"{where}: duplicate variant {variant!r}")
      seen.add(variant)
      accuracy = row.get("accuracy")
      if not _is_real(accuracy) or not 0 <= accuracy <= 1:
        raise ValueError(f"{where} ({variant}): 'accuracy' must be in [0, 1], got {accuracy!r}")
      size = row.get("bytes")
      if size is not None and (not isinstance(size, numbers.Integral) or isinstance(size, bool)
                               or size < 0):
        raise ValueError(f"{where} ({variant}): 'bytes' must be a non-negative int or None, "
                         f"got {size!r}")
    checked[str(name)] = list(rows)
  return checked


def _variant_colors(models: Mapping[str, list[dict]]) -> dict[str, Any]:
  """One color per variant name, the same in every panel (order of first appearance)."""
  colors: dict[str, Any] = {}
  for rows in models.values():
    for row in rows:
      colors.setdefault(row["variant"], _COLORS[len(colors) % len(_COLORS)])
  return colors


def _variant_axis(ax: Any, labels: Sequence[str]) -> None:
  ax.set_xticks(range(len(labels)))
  ax.set_xticklabels(labels, rotation=35, ha="right", rotation_mode="anchor", fontsize=8)
  ax.set_xlabel("variant")
  ax.grid(axis="y", alpha=0.3)
  ax.set_axisbelow(True)


def accuracy_and_size(results: dict, path: str | os.PathLike) -> pathlib.Path:
  """Bar charts of test accuracy and serialized size per variant, one row of panels per model.

  Args:
    results: {"models": {model_name: {"rows": [{"variant": str, "accuracy": float in [0, 1],
      "bytes": int | None}, ...]}}}; other keys are ignored. Rows with "bytes" None (e.g. a
      fake-quant variant that is never serialized) are left out of the size panel.
    path: Where the PNG goes; parent directories are created.

  Returns:
    The path of the written PNG.

  Raises:
    ValueError: `results` has no models, a model has no rows, or a row's variant, accuracy
      or bytes is malformed.
  """
  models = _check_results(results)
  colors = _variant_colors(models)
  width = max(8.0, 1.0 + 0.75 * max(len(rows) for rows in models.values()) * 2)
  fig, axes = plt.subplots(len(models), 2, figsize=(width, 4.2 * len(models)), squeeze=False,
                           layout="constrained")
  for (name, rows), (acc_ax, size_ax) in zip(models.items(), axes, strict=True):
    labels = [row["variant"] for row in rows]
    accuracy = np.array([100.0 * row["accuracy"] for row in rows])
    bars = acc_ax.bar(range(len(rows)), accuracy, color=[colors[v] for v in labels],
                      edgecolor="black", linewidth=0.5)
    acc_ax.bar_label(bars, labels=[f"{a:.2f}" for a in accuracy], padding=2, fontsize=7,
                     rotation=90 if len(rows) > 12 else 0,
                     bbox={"boxstyle": "square,pad=0.1", "facecolor": "white",
                           "edgecolor": "none"})
    if "float32" in labels:
      acc_ax.axhline(accuracy[labels.index("float32")], color="black", linestyle=":",
                     linewidth=0.9, label="float32 accuracy")
      acc_ax.legend(fontsize=7, loc="upper right")
    low = max(0.0, math.floor(accuracy.min() - 1.0))
    # Head room above 100 % for the value labels.
    acc_ax.set_ylim(low, 100.0 + 0.12 * (100.0 - low))
    acc_ax.set_yticks([t for t in acc_ax.get_yticks() if low <= t <= 100.0])
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_title(f"{name}: test accuracy (y axis from {low:g} %)", fontsize=10)
    _variant_axis(acc_ax, labels)

    sized = [row for row in rows if row["bytes"] is not None]
    if sized:
      kib = np.array([row["bytes"] / 1024.0 for row in sized])
      bars = size_ax.bar(range(len(sized)), kib, color=[colors[r["variant"]] for r in sized],
                         edgecolor="black", linewidth=0.5)
      size_ax.bar_label(bars, labels=[f"{k:,.1f}" for k in kib], padding=2, fontsize=7)
      size_ax.set_ylim(0, 1.12 * max(kib.max(), 1e-9))
      skipped = len(rows) - len(sized)
      note = f" ({skipped} variant{'s' * (skipped > 1)} without a size left out)" if skipped else ""
      size_ax.set_title(f"{name}: serialized size{note}", fontsize=10)
    else:
      size_ax.text(0.5, 0.5, "no serialized sizes", ha="center", va="center",
                   transform=size_ax.transAxes)
      size_ax.set_title(f"{name}: serialized size", fontsize=10)
    size_ax.set_ylabel("serialized size (KiB)")
    _variant_axis(size_ax, [row["variant"] for row in sized])
  fig.suptitle("MNIST quantization study: accuracy and model size per variant", fontsize=12)
  return save_png(fig, path)


def _broadcast_scale(scale: np.ndarray, axis: int | None, shape: tuple[int, ...]) -> np.ndarray:
  """`scale` shaped to broadcast against an array of `shape`; raises ValueError."""
  if scale.size == 0:
    raise ValueError("scale: empty")
  if not np.all(np.isfinite(scale)) or not np.all(scale > 0):
    raise ValueError("scale: every scale must be finite and positive")
  if axis is None:
    if scale.size != 1:
      raise ValueError(f"scale: a per-tensor scale (axis=None) must hold one value, "
                       f"got shape {scale.shape}")
    return scale.reshape(())
  if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
    raise ValueError(f"axis: expected an int or None, got {axis!r}")
  ndim = len(shape)
  if not -ndim <= axis < ndim:
    raise ValueError(f"axis: {axis} is out of range for int8_values of shape {shape}")
  axis = int(axis) % ndim
  if scale.size != shape[axis]:
    raise ValueError(f"scale: per-channel scales along axis {axis} need {shape[axis]} values, "
                     f"got shape {scale.shape}")
  return scale.reshape([-1 if d == axis else 1 for d in range(ndim)])


def weight_histograms(float_kernel: np.ndarray, int8_values: np.ndarray, scale: np.ndarray,
                      axis: int | None, path: str | os.PathLike, *, layer: str,
                      log: bool = True, bins: int = 101) -> pathlib.Path:
  """Histograms of one layer's float weights, their dequantized int8 values, and the error.

  The int8 values are symmetric (zero point 0): dequantized = scale * q, with one scale
  (axis None) or one scale per channel along `axis` of `int8_values`.

  Args:
    float_kernel: The float weights.
    int8_values: The int8 weights, the same shape as `float_kernel`.
    scale: The scale: one value, or one per channel along `axis`.
    axis: The channel axis of the scales in `int8_values`, or None for a per-tensor scale.
    path: Where the PNG goes; parent directories are created.
    layer: The layer's name, for the title.
    log: Whether the weight histogram's counts use a log scale.
    bins: Number of bins of the weight histogram (the same bins for both overlays); with a
      per-tensor scale, at most this many, their edges halfway between int8 levels.

  Returns:
    The path of the written PNG.

  Raises:
    ValueError: Empty or non-finite weights, int8 values that are not integers in
      [-128, 127], a shape mismatch, or scales that do not fit `axis`.
  """
  w = np.asarray(float_kernel)
  float_name = f"float ({w.dtype})"
  q = np.asarray(int8_values)
  s = np.asarray(scale, dtype=np.float64)
  if not isinstance(layer, str) or not layer:
    raise ValueError(f"layer: expected a non-empty string, got {layer!r}")
  if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 1:
    raise ValueError(f"bins: expected a positive int, got {bins!r}")
  if w.size == 0:
    raise ValueError("float_kernel: empty")
  if not np.issubdtype(w.dtype, np.floating) and not np.issubdtype(w.dtype, np.integer):
    raise ValueError(f"float_kernel: expected real numbers, got dtype {w.dtype}")
  w = w.astype(np.float64)
  if not np.all(np.isfinite(w)):
    raise ValueError("float_kernel: holds non-finite values")
  if q.shape != w.shape:
    raise ValueError(f"int8_values: shape {q.shape} does not match float_kernel's {w.shape}")
  if not np.issubdtype(q.dtype, np.integer):
    raise ValueError(f"int8_values: expected an integer dtype, got {q.dtype}")
  if q.min() < -128 or q.max() > 127:
    raise ValueError(f"int8_values: values must lie in [-128, 127], got [{q.min()}, {q.max()}]")
  s = _broadcast_scale(s, axis, q.shape)

  dequantized = s * q.astype(np.float64)
  error = (dequantized - w) / s  # in units of each weight's own scale
  noise = float(np.sum((dequantized - w) ** 2))
  sqnr = math.inf if noise == 0 else 10 * math.log10(max(float(np.sum(w ** 2)), 1e-300) / noise)
  clipped = int(np.sum(np.abs(error) > 0.5 + 1e-6))
  scheme = "per-tensor" if axis is None else f"per-channel (axis {axis}, {s.size} scales)"

  fig, (hist_ax, err_ax) = plt.subplots(1, 2, figsize=(11.0, 4.2), layout="constrained",
                                        gridspec_kw={"width_ratios": [3, 2]})
  lo = min(w.min(), dequantized.min())
  hi = max(w.max(), dequantized.max())
  if hi <= lo:
    lo, hi = lo - 0.5, hi + 0.5
  if axis is None:
    # Bin edges halfway between grid points, so every bin holds the same number of int8
    # levels (no aliasing between the bins and the grid).
    step = float(s)
    lo_q, hi_q = math.floor(lo / step), math.ceil(hi / step)
    per_bin = max(1, math.ceil((hi_q - lo_q + 1) / int(bins)))
    edges = step * (np.arange(lo_q, hi_q + per_bin + 1, per_bin) - 0.5)
  else:
    edges = np.linspace(lo, hi, int(bins) + 1)
  hist_ax.hist(w.ravel(), bins=edges, color="tab:blue", alpha=0.55, label=float_name,
               log=log)
  hist_ax.hist(dequantized.ravel(), bins=edges, histtype="step", color="tab:red", linewidth=1.2,
               label="dequantized int8 (scale * q)", log=log)
  hist_ax.set_xlabel("weight value")
  hist_ax.set_ylabel("count (log scale)" if log else "count")
  hist_ax.set_title(f"{layer}: weights, {w.size:,} values, {scheme}", fontsize=10)
  hist_ax.legend(fontsize=8, loc="upper right")
  hist_ax.grid(alpha=0.3)
  hist_ax.set_axisbelow(True)

  # Rounding keeps the error within +-0.5; saturated (clipped) weights can be far off, so the
  # axis stops at +-ERROR_RANGE and those errors are counted in the outermost bins.
  half = ERROR_RANGE if clipped else 0.6
  shown = np.clip(error.ravel(), -half, half)
  err_ax.hist(shown, bins=np.linspace(-half, half, 61), color="tab:purple", alpha=0.75,
              edgecolor="white", linewidth=0.3, label="dequantized - float")
  err_ax.set_xlim(-half, half)
  err_ax.xaxis.set_major_locator(matplotlib.ticker.MultipleLocator(0.5 if clipped else 0.25))
  err_ax.xaxis.set_minor_locator(matplotlib.ticker.MultipleLocator(0.25 if clipped else 0.05))
  for x in (-0.5, 0.5):
    err_ax.axvline(x, color="black", linestyle="--", linewidth=0.8,
                   label="rounding bound ±0.5" if x < 0 else None)
  err_ax.set_xlabel("error (units of the scale)")
  err_ax.set_ylabel("count")
  sqnr_text = "inf" if math.isinf(sqnr) else f"{sqnr:.1f}"
  err_ax.set_title(f"{layer}: quantization error, SQNR {sqnr_text} dB", fontsize=10)
  err_ax.set_ylim(0, 1.3 * err_ax.get_ylim()[1])  # room for the legend and the stats box
  err_ax.legend(fontsize=7, loc="upper left")
  stats = f"max |error| {np.abs(error).max():.3f}\nbeyond ±0.5: {clipped:,}"
  if np.abs(error).max() > ERROR_RANGE:
    stats += f"\n(|error| > {ERROR_RANGE:g} counted\nin the edge bins)"
  err_ax.text(0.98, 0.97, stats, transform=err_ax.transAxes, ha="right", va="top",
              fontsize=7, bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
  err_ax.grid(alpha=0.3)
  err_ax.set_axisbelow(True)
  fig.suptitle(f"Layer {layer}: float vs int8 weights (symmetric, zero point 0)", fontsize=12)
  return save_png(fig, path)


def layer_sqnr(rows: list[dict], path: str | os.PathLike) -> pathlib.Path:
  """Grouped bar chart of per-layer weight SQNR (dB), one group (and color) per model.

  Args:
    rows: [{"model": str, "layer": str, "sqnr_db": float}, ...]; models and layers keep the
      order of their first appearance.
    path: Where the PNG goes; parent directories are created.

  Returns:
    The path of the written PNG.

  Raises:
    ValueError: `rows` is empty, a row is malformed or has a non-finite SQNR, or a
      (model, layer) pair repeats.
  """
  if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)) or not rows:
    raise ValueError("rows: expected a non-empty list of {'model', 'layer', 'sqnr_db'} rows")
  groups: dict[str, list[tuple[str, float]]] = {}
  for i, row in enumerate(rows):
    if not isinstance(row, Mapping):
      raise ValueError(f"rows[{i}]: expected a mapping, got {type(row).__name__}")
    model, name, sqnr = row.get("model"), row.get("layer"), row.get("sqnr_db")
    for key, value in (("model", model), ("layer", name)):
      if not isinstance(value, str) or not value:
        raise ValueError(f"rows[{i}]: {key!r} must be a non-empty string, got {value!r}")
    if not _is_real(sqnr):
      raise ValueError(f"rows[{i}] ({model}/{name}): 'sqnr_db' must be a finite number, "
                       f"got {sqnr!r}")
    layers = groups.setdefault(str(model), [])
    if any(name == existing for existing, _ in layers):
      raise ValueError(f"rows[{i}]: duplicate layer {name!r} of model {model!r}")
    layers.append((str(name), float(sqnr)))

  positions, labels, values, colors, centers = [], [], [], [], []
  x = 0.0
  for k, (model, layers) in enumerate(groups.items()):
    start = x
    for name, sqnr in layers:
      positions.append(x)
      labels.append(name)
      values.append(sqnr)
      colors.append(_COLORS[k % len(_COLORS)])
      x += 1.0
    centers.append((model, (start + x - 1.0) / 2))
    x += 0.8  # gap between models

  fig, ax = plt.subplots(figsize=(max(6.0, 1.2 + 0.8 * x), 4.6), layout="constrained")
  bars = ax.bar(positions, values, width=0.8, color=colors, edgecolor="black", linewidth=0.5)
  ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=2, fontsize=8)
  ax.set_xticks(positions)
  long_labels = max(map(len, labels)) > 6
  ax.set_xticklabels(labels, rotation=30 if long_labels else 0,
                     ha="right" if long_labels else "center", rotation_mode="anchor", fontsize=9)
  top, bottom = max(max(values), 0.0), min(min(values), 0.0)
  span = top - bottom or 1.0
  ax.set_ylim(bottom - (0.08 * span if bottom < 0 else 0), top + 0.12 * span)
  ax.axhline(0, color="black", linewidth=0.6)
  ax.set_ylabel("weight SQNR (dB)")
  ax.set_title("Per-layer weight SQNR of the int8 weights (higher is better)")
  handles = [matplotlib.patches.Patch(facecolor=_COLORS[k % len(_COLORS)], edgecolor="black",
                                     linewidth=0.5, label=model) for k, model in enumerate(groups)]
  ax.legend(handles=handles, title="model", fontsize=8, title_fontsize=8, loc="upper left",
            bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
  ax.grid(axis="y", alpha=0.3)
  ax.set_axisbelow(True)
  # Model names under their groups, just below the deepest (possibly rotated) tick label.
  fig.canvas.draw()
  depth = max(ax.bbox.y0 - t.get_window_extent().y0 for t in ax.get_xticklabels())
  for model, center in centers:
    ax.annotate(model, xy=(center, 0), xycoords=("data", "axes fraction"),
                xytext=(0, -(depth * 72.0 / fig.dpi + 4.0)), textcoords="offset points",
                ha="center", va="top", fontsize=9, fontweight="bold")
  return save_png(fig, path)
