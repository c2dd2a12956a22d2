"""Few-shot linear evaluation: the paper's quick measure of a representation.

A frozen model's pre-logits (`intermediates['pre_logits']`) are computed for a
dataset's train and test splits. For k shots, k training examples of each
class are drawn; a ridge-regression classifier is fit on them in closed form
and its accuracy on the whole test split is reported, averaged over several
draws (seeds). The classifier follows big_vision's `fewshot_lsr` evaluator:
features standardised with the shots' mean and deviation, a constant bias
feature of 100 (so the bias is almost unpenalised), targets +1 for the class
and -1 for the others, and an L2 penalty `l2_reg` (default 2**10).

`vit-jax fewshot` (vit_jax/tools/fewshot.py) runs it on any checkpoint;
`Evaluator` runs it during training every `config.fewshot.every_steps`.
"""

import functools
import os
import time
from typing import Any, Callable, Iterable, NamedTuple, Optional

import jax
import ml_collections
import numpy as np

from vit_jax.data import pipeline
from vit_jax.errors import UsageError
from vit_jax.training import sharding

BIAS_FEATURE = 100.0  # Large, so that the L2 penalty barely touches the bias.


class Classifier(NamedTuple):
  """A linear classifier on standardised features plus a bias feature."""
  mean: np.ndarray  # (dim,)
  std: np.ndarray  # (dim,)
  weights: np.ndarray  # (dim + 1, classes); the last row multiplies the bias feature.


def design_matrix(features: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """(n, dim + 1): standardised features and the constant bias feature."""
  x = (features - mean) / std
  return np.concatenate([x, np.full((len(x), 1), BIAS_FEATURE, x.dtype)], axis=1)


def fit(features: np.ndarray, labels: np.ndarray, num_classes: int, l2_reg: float) -> Classifier:
  """The ridge solution argmin_w |X w - Y|^2 + l2_reg |w|^2, in closed form (float64).

  X is `design_matrix` of the features standardised by their own mean and
  deviation; Y is 2 * one_hot(labels) - 1. With fewer examples n than
  features d, the (n, n) system X X^T is solved instead of the (d, d) one:
  w = X^T (X X^T + l2 I)^-1 Y, the same solution.
  """
  features = np.asarray(features, np.float64)
  mean = features.mean(0)
  std = features.std(0) + 1e-5
  x = design_matrix(features, mean, std)
  y = 2.0 * np.eye(num_classes)[labels] - 1.0  # (n, classes)
  n, d = x.shape
  if n >= d:
    weights = np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)
  else:
    weights = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)
  return Classifier(mean, std, weights)


def predict(classifier: Classifier, features: np.ndarray) -> np.ndarray:
  """Predicted classes (n,) of `features` (float32 arithmetic: test sets can be large)."""
  c = classifier
  x = design_matrix(np.asarray(features, np.float32), c.mean.astype(np.float32), c.std.astype(np.float32))
  return np.argmax(x @ c.weights.astype(np.float32), axis=1)


def sample_shots(labels: np.ndarray, num_classes: int, shots: Iterable[int], seed: int) -> dict[int, np.ndarray]:
  """Indices of k training examples per class for each k in `shots`, drawn with `seed`.

  One random order per class and seed, so the 5 shots of a seed contain its
  1 shot. A class with fewer than k examples contributes all it has.
  """
  rng = np.random.default_rng(seed)
  per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
  return {k: np.concatenate([indices[:k] for indices in per_class]) for k in shots}


def fewshot_accuracies(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                       test_labels: np.ndarray, num_classes: int, shots: Iterable[int], seeds: int,
                       l2_reg: float) -> dict[int, float]:
  """{k: test accuracy of the k-shot classifier, averaged over `seeds` draws of the shots}."""
  shots = list(shots)
  totals = {k: 0.0 for k in shots}
  for seed in range(seeds):
    for k, indices in sample_shots(train_labels, num_classes, shots, seed).items():
      classifier = fit(train_features[indices], train_labels[indices], num_classes, l2_reg)
      totals[k] += float(np.mean(predict(classifier, test_features) == test_labels))
  return {k: total / seeds for k, total in totals.items()}


def _features(params: Any, batch: dict[str, jax.Array], *, model) -> tuple[jax.Array, ...]:
  _, intermediates = model.apply({'params': params}, batch['image'], train=False)
  return intermediates['pre_logits'].astype(np.float32), batch['label'], batch['mask']


def feature_fn(model, param_sharding: Any, batch_sharding: jax.sharding.NamedSharding) -> Callable:
  """jit of (params, global batch) -> (pre-logits (batch, dim), labels, mask), batch split over the mesh.

  The outputs are replicated, so every process holds the features of the
  whole global batch.
  """
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(_features, model=model), in_shardings=(param_sharding, batch_sharding),
                 out_shardings=replicated)


def compute_features(fn: Callable, params: Any, config: ml_collections.ConfigDict, split: pipeline.Split,
                     batch_sharding: jax.sharding.NamedSharding) -> tuple[np.ndarray, np.ndarray]:
  """(features (examples, dim), labels (examples,)) of every example of `split`, in order.

  Images get the eval preprocessing of `config` (resize, central crop), in
  batches of `config.eval_batch_size`; the padding of the last batch is dropped.
  """
  features, labels = [], []
  for local in pipeline.eval_iterator(config, split, jax.process_index(), jax.process_count()):
    outputs = fn(params, sharding.global_batch(local, batch_sharding))
    batch_features, batch_labels, mask = (np.asarray(x.addressable_data(0)) for x in outputs)
    real = mask > 0
    features.append(batch_features[real])
    labels.append(batch_labels[real])
  return np.concatenate(features), np.concatenate(labels)


def dataset_config(config: ml_collections.ConfigDict, source: str, train_split: str, test_split: str,
                   data_dir: Optional[str] = None, data_dir_option: str = 'config.dataset.data_dir'
                   ) -> ml_collections.ConfigDict:
  """`config` with its dataset replaced by `source` (a tfds name or an image folder) and its splits.

  config.dataset.eval_split is `test_split`, train_split is `train_split`, and
  num_classes is read from the dataset (tfds metadata or the class folders).
  Image and label keys, data_dir (unless given) and preprocessing stay those
  of `config`. `data_dir_option` names the user's way to set data_dir, for the not-prepared error.
  """
  from vit_jax.data.builders import image_folder

  config = config.copy_and_resolve_references()
  config.unlock()
  dataset = config.dataset
  dataset.train_split, dataset.eval_split = train_split, test_split
  if data_dir is not None:
    dataset.data_dir = data_dir
  if os.path.isdir(source):
    dataset.name, dataset.folder = pipeline.IMAGE_FOLDER, source
    dataset.num_classes = len(image_folder.index_folder(source, dataset.test_fraction).class_names)
  else:
    dataset.name = source
    label = pipeline.get_builder(dataset, data_dir_option=data_dir_option).info.features[dataset.label_key]
    if getattr(label, 'num_classes', None) is None:
      raise UsageError(f'Dataset {source!r} has no class label feature {dataset.label_key!r}; few-shot '
                       'evaluation needs a classification dataset.')
    dataset.num_classes = label.num_classes
  config.lock()
  return config


def check_shots(shots: Iterable[int], seeds: int, l2_reg: float, what: str = 'config.fewshot') -> None:
  """UsageError unless shots are positive integers, seeds >= 1 and l2_reg > 0."""
  shots = list(shots)
  if not shots or any(not isinstance(k, int) or k < 1 for k in shots):
    raise UsageError(f'{what} shots={shots}: give positive integers, e.g. 1,5,10,25.')
  if seeds < 1 or l2_reg <= 0:
    raise UsageError(f'{what} seeds={seeds}, l2_reg={l2_reg}: use seeds >= 1 and l2_reg > 0.')


class Evaluator:
  """The periodic few-shot evaluator of the training loop (config.fewshot).

  Opens its datasets once; `run(params)` computes the features with the
  current params on the training mesh and returns
  {'fewshot/<name>/<k>shot': accuracy}.
  """

  def __init__(self, config: ml_collections.ConfigDict, model, param_sharding: Any,
               batch_sharding: jax.sharding.NamedSharding):
    cfg = config.fewshot
    check_shots(cfg.shots, cfg.seeds, cfg.l2_reg)
    if not cfg.datasets:
      raise UsageError(f'config.fewshot.every_steps={cfg.every_steps} but config.fewshot.datasets is empty; '
                       "set e.g. {'digits': ('sklearn_digits', 'train', 'test')}, or every_steps=0.")
    self.shots, self.seeds, self.l2_reg = list(cfg.shots), cfg.seeds, cfg.l2_reg
    self.batch_sharding = batch_sharding
    self.fn = feature_fn(model, param_sharding, batch_sharding)
    self.datasets = {}
    for name, entry in cfg.datasets.items():
      if len(entry) != 3:
        raise UsageError(f'config.fewshot.datasets[{name!r}]={entry!r}: give (tfds name or image folder, '
                         'train split, test split).')
      source, train_split, test_split = entry
      dataset = dataset_config(config, source, train_split, test_split)
      self.datasets[name] = (dataset, pipeline.open_split(dataset.dataset, train_split),
                             pipeline.open_split(dataset.dataset, test_split))

  def run(self, params: Any) -> dict[str, float]:
    """{'fewshot/<name>/<k>shot': mean test accuracy}, and 'fewshot/seconds' (time taken)."""
    start = time.perf_counter()
    results = {}
    for name, (dataset, train, test) in self.datasets.items():
      train_features, train_labels = compute_features(self.fn, params, dataset, train, self.batch_sharding)
      test_features, test_labels = compute_features(self.fn, params, dataset, test, self.batch_sharding)
      accuracies = fewshot_accuracies(train_features, train_labels, test_features, test_labels,
                                      dataset.dataset.num_classes, self.shots, self.seeds, self.l2_reg)
      results.update({f'fewshot/{name}/{k}shot': v for k, v in accuracies.items()})
    results['fewshot/seconds'] = time.perf_counter() - start
    return results
