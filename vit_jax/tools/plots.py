"""Training curves of one or several runs, from their metrics.jsonl, as one PNG.

  vit-jax plots WORKDIR... --out FILE.png

Four panels against the training step: loss (train solid, eval dashed), eval
accuracy, learning rate and throughput. One colour per workdir, so runs of
an ablation can be compared in one picture. Works on a run still in progress.
"""

import io
import json
import sys
from typing import Sequence

from absl import flags
import numpy as np

from vit_jax import storage
from vit_jax.errors import UsageError

# (metric key, panel title); the loss panel also draws eval/loss.
PANELS = (('train/loss', 'loss (train solid, eval dashed)'), ('eval/accuracy', 'eval accuracy'),
          ('train/lr', 'learning rate'), ('train/images_per_sec', 'throughput (images/s)'))


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `workdir/metrics.jsonl`. A half-written last line (a live run) is skipped."""
  path = storage.join(workdir, 'metrics.jsonl')  # A local or gs:// workdir.
  try:
    text = storage.read_text(path)
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
    raise UsageError(f'No metrics.jsonl in {workdir!r}; pass workdirs of training runs '
                     '(python -m vit_jax.main --workdir DIR writes it).') from None
  lines = [line for line in text.split('\n') if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise UsageError(f'{path} line {i + 1} is not JSON: {line[:80]!r}.') from None
  return rows


def series(rows: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one metric, in step order; the last value wins for a repeated step (resume)."""
  values = {row['step']: row[key] for row in rows if key in row}
  steps = np.array(sorted(values), dtype=np.int64)
  return steps, np.array([values[s] for s in steps], dtype=np.float64)


def run_labels(workdirs: Sequence[str]) -> list[str]:
  """Short legend names: the folder names, or the full paths when folder names repeat."""
  names = [storage.basename(w) for w in workdirs]
  return names if len(set(names)) == len(names) else [str(w).rstrip('/') for w in workdirs]


def plot_curves(workdirs: Sequence[str], out: str) -> None:
  """Writes the four-panel training-curve PNG of `workdirs` to `out`."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  if not workdirs:
    raise UsageError('No workdirs given; name one or more training workdirs before --out.')
  runs = [read_metrics(w) for w in workdirs]
  fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, (rows, label) in enumerate(zip(runs, run_labels(workdirs))):
    color = colors[i % len(colors)]
    for ax, (key, title) in zip(axes.flat, PANELS):
      steps, values = series(rows, key)
      if key == 'eval/accuracy':
        ax.plot(steps, 100 * values, 'o-', color=color, label=label, markersize=3)
      else:
        ax.plot(steps, values, color=color, label=label)
      if key == 'train/loss':
        ax.plot(*series(rows, 'eval/loss'), 'o--', color=color, markersize=3)
      ax.set_title(title, fontsize=10)
  axes[0, 1].set_ylabel('%')
  for ax in axes[1]:
    ax.set_xlabel('step')
  for ax in axes.flat:
    ax.grid(alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=80)
  plt.close(fig)
  storage.write_bytes(out, buffer.getvalue())  # A local path or a gs:// URL.


def define_flags() -> None:
  """The command's flags; defined only when run as a program, so importing this module adds none."""
  flags.DEFINE_string('out', None, 'The PNG to write.')
  flags.mark_flag_as_required('out')


def main(argv):
  try:
    plot_curves(argv[1:], flags.FLAGS.out)
  except UsageError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {flags.FLAGS.out}', flush=True)
