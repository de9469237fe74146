"""The one training loop of the experiments: jitted train / calibrate / predict steps and an
epoch loop with a tqdm bar, for qjax.nn models (`Trainer.for_model`) and for any forward
function (`Trainer`).

A train step is `(params, stats, opt_state, x, y) -> (params, stats, opt_state, loss)`:
`stats` is the `quant_stats` collection, carried from step to step like batch_stats (an empty
dict for a float model). The loss is the mean softmax cross-entropy of integer labels.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import numpy as np
import optax

import qjax.nn as qnn

Forward = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]
"""(params, stats, x) -> (logits, new stats)."""


def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
  """Index arrays of one shuffled epoch; the ragged tail is dropped (one shape, one compile)."""
  if batch_size < 1 or batch_size > n:
    raise ValueError(f"batches: batch_size must be in [1, {n}] (the number of examples); got "
                     f"{batch_size}.")
  order = rng.permutation(n)
  for i in range(n // batch_size):
    yield order[i * batch_size:(i + 1) * batch_size]


def evaluate(logits: Any, labels: np.ndarray) -> tuple[float, int]:
  """(accuracy, number of rows whose largest logit is tied: quantized logits can tie)."""
  logits = np.asarray(logits, np.float32)
  ties = int(np.sum(np.sum(logits == logits.max(-1, keepdims=True), -1) > 1))
  return float(np.mean(np.argmax(logits, -1) == labels)), ties


def accuracy(logits: Any, labels: np.ndarray) -> float:
  """Share of rows whose argmax is the label."""
  return evaluate(logits, labels)[0]


def in_chunks(fn: Callable[[jax.Array], jax.Array], x: np.ndarray, chunk: int = 2000
              ) -> np.ndarray:
  """fn over `x` in chunks of `chunk` rows (the last one zero-padded: fn sees one shape)."""
  out = []
  for start in range(0, len(x), chunk):
    part = x[start:start + chunk]
    pad = chunk - len(part)
    if pad:
      part = np.concatenate([part, np.zeros((pad,) + part.shape[1:], part.dtype)])
    out.append(np.asarray(fn(part))[:len(part) - pad])
  return np.concatenate(out)


@dataclasses.dataclass
class Trainer:
  """Jitted steps of one forward function and optimizer.

  Attributes:
    forward: (params, stats, x) -> (logits, new stats).
    optimizer: the optax transformation of the train step.
    calibrate_forward: the same in calibration (observers update, no fake quantization), or
      None if the model has no observers.
    predict_forward: the evaluation forward, (params, stats, x) -> logits, observers frozen.
  """

  forward: Forward
  optimizer: optax.GradientTransformation
  predict_forward: Callable[[Any, Any, jax.Array], jax.Array]
  calibrate_forward: Forward | None = None

  def __post_init__(self):
    self.step = jax.jit(self._step)
    self.predict = jax.jit(self.predict_forward)
    if self.calibrate_forward is not None:
      self.calibrate = jax.jit(lambda p, s, x: self.calibrate_forward(p, s, x)[1])

  @classmethod
  def for_model(cls, model: nn.Module, mode: str, optimizer: optax.GradientTransformation
                ) -> Trainer:
    """A Trainer of a qjax.nn model whose train step and evaluation run in `mode` ("float" or
    "qat"); evaluation keeps `quant_stats` immutable, i.e. the observers frozen."""

    def run(which: str) -> Forward:
      def forward(params, stats, x):
        logits, updates = model.apply({"params": params, qnn.STATS: stats}, x, mode=which,
                                      mutable=[qnn.STATS])
        return logits, updates.get(qnn.STATS, {})  # a float model has no quant_stats
      return forward

    return cls(forward=run(mode), optimizer=optimizer, calibrate_forward=run("calibrate"),
               predict_forward=lambda p, s, x: model.apply({"params": p, qnn.STATS: s}, x,
                                                           mode=mode))

  def _step(self, params, stats, opt_state, x, y):
    def loss_fn(p):
      logits, new_stats = self.forward(p, stats, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = self.optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  def logits(self, params: Any, stats: Any, x: np.ndarray, chunk: int = 2000) -> np.ndarray:
    """Evaluation logits over `x`, in chunks."""
    return in_chunks(lambda part: self.predict(params, stats, part), x, chunk)

  def accuracy(self, params: Any, stats: Any, x: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy (observers frozen)."""
    return accuracy(self.logits(params, stats, x), y)

  def run_calibration(self, params: Any, stats: Any, x: np.ndarray, *, batches_: int,
                      batch_size: int, seed: int) -> Any:
    """`batches_` shuffled training batches through the calibration forward; checks that every
    observer saw data."""
    if self.calibrate_forward is None:
      raise ValueError("Trainer.run_calibration: this trainer has no calibrate_forward.")
    rng = np.random.default_rng(seed)
    for _, idx in zip(range(batches_), batches(len(x), batch_size, rng), strict=False):
      stats = self.calibrate(params, stats, x[idx])
    qnn.check_calibrated(stats)
    return stats


def fit(trainer: Trainer, params: Any, stats: Any, data: tuple, *, epochs: int,
        batch_size: int, seed: int, desc: str, progress: bool = True,
        eval_each_epoch: bool = True, log: Callable[[str], None] | None = None
        ) -> tuple[Any, Any, list[dict]]:
  """`epochs` of the trainer's step over shuffled batches of data = (x_train, y_train, x_test,
  y_test), one tqdm bar for all steps.

  Returns:
    (params, stats, history): history holds per epoch {epoch, train_loss, seconds} and, with
    `eval_each_epoch`, the test accuracy (always after the last epoch).
  """
  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  x_train, y_train, x_test, y_test = data
  opt_state = trainer.optimizer.init(params)
  rng = np.random.default_rng(seed)
  history = []
  write = log if log is not None else tqdm.write
  with tqdm(total=epochs * (len(x_train) // batch_size), desc=desc, leave=False,
            disable=not progress) as bar:
    for epoch in range(1, epochs + 1):
      t0, losses = time.perf_counter(), []
      for idx in batches(len(x_train), batch_size, rng):
        params, stats, opt_state, loss = trainer.step(params, stats, opt_state, x_train[idx],
                                                      y_train[idx])
        losses.append(loss)  # no float() here: it would wait for every step
        bar.update()
      row = {"epoch": epoch, "train_loss": float(np.mean(jax.device_get(losses))),
             "seconds": time.perf_counter() - t0}
      if eval_each_epoch or epoch == epochs:
        row["test_accuracy"] = trainer.accuracy(params, stats, x_test, y_test)
        write(f"{desc} epoch {epoch}/{epochs}: train loss {row['train_loss']:.4f}, test "
              f"accuracy {100 * row['test_accuracy']:.2f} %")
      history.append(row)
  return params, stats, history


def init_variables(model: nn.Module, x: Any, seed: int, **kwargs: Any) -> Any:
  """`model.init(PRNGKey(seed), x[:1], **kwargs)`."""
  return model.init(jax.random.PRNGKey(seed), jax.numpy.asarray(x[:1]), **kwargs)


def adam_cosine(lr: float, steps: int) -> optax.GradientTransformation:
  """Adam whose learning rate decays from `lr` to 0 over `steps` (cosine)."""
  return optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))
