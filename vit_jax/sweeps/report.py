"""The report of a sweep: results.csv, results.md and PNGs in the sweep's workdir.

One row per point (its seeds pooled): the varied config values, the number of
finished seeds, mean ± standard deviation (over seeds) of the metric at the
last step, the best value over all logged steps and seeds with its step, the
wall time per trial (summed over the launcher runs of a resumed trial),
parameters (from `jax.eval_shape`, nothing allocated) and forward GFLOPs per
image (vit_jax.tools.summary's XLA cost analysis). Plots: the metric against each
varied config key, the metric of every point, and the training curves (train
loss and the metric against step) of every trial.
"""

import csv
import io
import json
import math
import os
import textwrap
from typing import Any, Optional, Sequence

import numpy as np

from vit_jax import storage
from vit_jax.tools import plots
from vit_jax.sweeps import sweep as sweep_lib
from vit_jax.errors import UsageError


def trial_result(sweep: sweep_lib.Sweep, trial: sweep_lib.Trial, workdir: str) -> dict[str, Any]:
  """What one trial's workdir says: status, final and best metric, curves, wall time."""
  trial_dir = storage.join(workdir, trial.name)
  finished = sweep_lib.is_finished(sweep, trial, workdir)
  result = {'trial': trial, 'finished': finished, 'rows': []}
  try:
    result['rows'] = plots.read_metrics(trial_dir)
  except UsageError:
    pass  # Not started, or failed before its first log.
  steps, values = plots.series(result['rows'], sweep.metric)
  if finished and len(steps):
    best = int(np.argmax(values) if sweep.mode == 'max' else np.argmin(values))
    result.update(final=float(values[-1]), final_step=int(steps[-1]), best=float(values[best]),
                  best_step=int(steps[best]))
  try:
    attempts = storage.read_text(storage.join(trial_dir, sweep_lib.ATTEMPTS_FILE))
  except FileNotFoundError:
    return result
  result['wall_s'] = sum(json.loads(line)['wall_s'] for line in attempts.splitlines() if line.strip())
  return result


def model_size(config) -> tuple[Optional[int], Optional[float]]:
  """(parameters, forward GFLOPs per image) of the model `config` describes; Nones if it is invalid."""
  import jax
  import jax.numpy as jnp
  from vit_jax.tools import summary
  from vit_jax.models import model_from_config
  try:
    model = model_from_config(config)
  except UsageError:
    return None, None
  size = config.input.image_size
  from vit_jax.config.sizes import image_hw
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_hw(size), 3))))['params']
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  return count, summary.flops_per_image(model, size) / 1e9


def varied_keys(sweep: sweep_lib.Sweep) -> list[str]:
  """Config keys whose value differs between points, in the order the sweep file names them."""
  keys = list(dict.fromkeys(k for point in sweep.points for k in point))
  return [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in sweep.points}) > 1] or keys


def _lookup(config, key: str) -> Any:
  for part in key.split('.'):
    config = config[part]
  return config


def summarize_points(sweep: sweep_lib.Sweep, workdir: str) -> list[dict[str, Any]]:
  """One dict per point: its config values, per-seed results, mean/std/best, wall time, size."""
  results = [trial_result(sweep, t, workdir) for t in sweep.trials]
  keys = varied_keys(sweep)
  points = []
  for point in sweep.points:
    mine = [r for r in results if r['trial'].point == point]
    done = [r for r in mine if 'final' in r]
    config = sweep_lib.trial_config(sweep, mine[0]['trial'])
    params, gflops = model_size(config)
    finals = np.array([r['final'] for r in done])
    best = (max if sweep.mode == 'max' else min)(done, key=lambda r: r['best']) if done else None
    walls = [r['wall_s'] for r in done if 'wall_s' in r]
    points.append({
        'values': {k: _lookup(config, k) for k in keys}, 'label': _label(point), 'trials': mine,
        'seeds': len(done), 'of_seeds': len(mine), 'finals': finals.tolist(),
        'mean': float(finals.mean()) if len(done) else None,
        'std': float(finals.std(ddof=1)) if len(done) > 1 else (0.0 if done else None),
        'best': best['best'] if best else None, 'best_step': best['best_step'] if best else None,
        'wall_s': float(np.mean(walls)) if walls else None, 'params': params, 'gflops': gflops})
  return points


def _label(point: dict[str, Any]) -> str:
  return ', '.join(f'{k.split(".")[-1]}={sweep_lib.format_value(v)}' for k, v in point.items()) or 'base'


def _percent(metric: str) -> bool:
  return metric.endswith('accuracy')


def _fmt(metric: str, value: Optional[float]) -> str:
  if value is None:
    return '–'
  return f'{100 * value:.2f}%' if _percent(metric) else f'{value:.4g}'


def write_tables(sweep: sweep_lib.Sweep, points: Sequence[dict], workdir: str) -> str:
  """Writes results.csv and results.md into `workdir` (a folder or a gs:// URL); returns the Markdown."""
  keys = list(points[0]['values'])
  metric = sweep.metric
  table = io.StringIO(newline='')
  writer = csv.writer(table)
  writer.writerow(keys + ['seeds', f'{metric} mean', f'{metric} std', f'{metric} per seed',
                          f'best {metric}', 'best step', 'wall s per trial', 'params', 'GFLOPs'])
  for p in points:
    writer.writerow([sweep_lib.format_value(p['values'][k]) for k in keys] + [
        p['seeds'], p['mean'], p['std'], ';'.join(f'{v:.6g}' for v in p['finals']), p['best'],
        p['best_step'], None if p['wall_s'] is None else round(p['wall_s'], 1), p['params'],
        None if p['gflops'] is None else f'{p["gflops"]:.4g}'])
  storage.write_text(storage.join(workdir, 'results.csv'), table.getvalue())

  means = [p['mean'] for p in points if p['mean'] is not None]
  winner = (max if sweep.mode == 'max' else min)(means) if means else None
  lines = ['| ' + ' | '.join(keys + ['seeds', f'final {metric} (mean ± std)', f'best {metric} (step)',
                                     'wall / trial', 'params', 'GFLOPs']) + ' |',
           '|' + ' --- |' * (len(keys) + 6)]
  for p in points:
    final = _fmt(metric, p['mean'])
    if p['seeds'] > 1:
      final += ' ± ' + _fmt(metric, p['std'])
    if p['mean'] is not None and p['mean'] == winner and len(points) > 1:
      final = f'**{final}**'
    best = f'{_fmt(metric, p["best"])} ({p["best_step"]})' if p['best'] is not None else '–'
    wall = '–' if p['wall_s'] is None else f'{p["wall_s"]:.0f} s'
    lines.append('| ' + ' | '.join(
        [f'`{sweep_lib.format_value(p["values"][k])}`' for k in keys]
        + [f'{p["seeds"]}/{p["of_seeds"]}', final, best, wall,
           '–' if p['params'] is None else f'{p["params"]:,}',
           '–' if p['gflops'] is None else f'{p["gflops"]:.4g}']) + ' |')
  missing = [r['trial'].name for p in points for r in p['trials'] if 'final' not in r]
  if missing:
    lines += ['', f'Not finished ({len(missing)}): ' + ', '.join(f'`{m}`' for m in missing)]
  text = '\n'.join(lines) + '\n'
  storage.write_text(storage.join(workdir, 'results.md'), text)
  return text


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def _scale(metric: str) -> float:
  return 100.0 if _percent(metric) else 1.0


def independent_keys(points: Sequence[dict]) -> list[str]:
  """Varied keys that change somewhere while all the other varied keys stay put.

  Those of a grid; not those of explicit points that change several keys at
  once, where a plot against one key would mix the effects of the others.
  """
  keys = list(points[0]['values'])

  def rest(p, key):
    return json.dumps({k: v for k, v in p['values'].items() if k != key}, sort_keys=True, default=str)
  return [key for key in keys
          if any(rest(p, key) == rest(q, key) and p['values'][key] != q['values'][key]
                 for p in points for q in points)]


def plot_by_key(sweep: sweep_lib.Sweep, points: Sequence[dict], out: str) -> None:
  """One panel per independent key: the final metric (mean ± std over seeds, and each seed) against it.

  Points equal in the other varied keys share a colour (joined by a line
  when the key is numeric: a numeric axis, logarithmic if it spans 10x or more).
  """
  plt = _pyplot()
  keys = independent_keys(points)
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  scale = _scale(sweep.metric)
  for ax, key in zip(axes[0], keys):
    values = list(dict.fromkeys(sweep_lib.format_value(p['values'][key]) for p in points))
    numeric = all(isinstance(p['values'][key], (int, float)) and not isinstance(p['values'][key], bool)
                  for p in points)

    def x_of(p, key=key, values=values, numeric=numeric):
      return p['values'][key] if numeric else values.index(sweep_lib.format_value(p['values'][key]))
    groups: dict[str, list] = {}
    for p in points:
      if p['mean'] is not None:
        rest = ', '.join(f'{k.split(".")[-1]}={sweep_lib.format_value(v)}'
                         for k, v in p['values'].items() if k != key)
        groups.setdefault(rest, []).append(p)
    for i, (rest, members) in enumerate(groups.items()):
      members.sort(key=x_of)
      color = colors[i % len(colors)]
      xs = [x_of(p) for p in members]
      ax.errorbar(xs, [scale * p['mean'] for p in members], [scale * p['std'] for p in members],
                  fmt='o-' if numeric else 'o', color=color, capsize=3, label=rest or None)
      for p in members:
        ax.plot([x_of(p)] * len(p['finals']), scale * np.array(p['finals']), '.', color=color, alpha=0.5)
    if numeric:
      positive = [p['values'][key] for p in points if p['values'][key] > 0]
      if len(positive) == len(points) and max(positive) >= 10 * min(positive):
        ax.set_xscale('log')
      ax.set_xticks(sorted({p['values'][key] for p in points}))
      ax.set_xticklabels([sweep_lib.format_value(v) for v in sorted({p['values'][key] for p in points})])
      ax.minorticks_off()
    else:
      ax.set_xticks(range(len(values)))
      ax.set_xticklabels(values, rotation=20 if max(map(len, values)) > 8 else 0)
      ax.set_xlim(-0.5, len(values) - 0.5)
    ax.set_xlabel(key)
    ax.set_ylabel(f'final {sweep.metric}' + (' (%)' if scale == 100 else ''))
    ax.grid(alpha=0.3)
    if len(groups) > 1:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=80)
  plt.close(fig)


def plot_points(sweep: sweep_lib.Sweep, points: Sequence[dict], out: str) -> None:
  """The final metric of every point (mean ± std and each seed), one row per point."""
  plt = _pyplot()
  scale = _scale(sweep.metric)
  labels = [textwrap.fill(p['label'], 44) for p in points]
  lines = sum(label.count('\n') + 1 for label in labels)
  fig, ax = plt.subplots(figsize=(9, 0.3 * lines + 0.25 * len(points) + 1.2))
  for y, p in enumerate(points):
    if p['mean'] is not None:
      ax.errorbar(scale * p['mean'], y, xerr=scale * p['std'], fmt='o', color='C0', capsize=3)
      ax.plot(scale * np.array(p['finals']), [y] * len(p['finals']), '.', color='C1', alpha=0.6)
  ax.set_yticks(range(len(points)))
  ax.set_yticklabels(labels, fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel(f'final {sweep.metric}' + (' (%)' if scale == 100 else '') + ' (mean ± std; dots: seeds)')
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out, dpi=80, bbox_inches='tight')  # Long labels.
  plt.close(fig)


def plot_training_curves(sweep: sweep_lib.Sweep, points: Sequence[dict], out: str) -> None:
  """Train loss and the metric against step for every trial; one colour per point."""
  plt = _pyplot()
  scale = _scale(sweep.metric)
  fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for i, p in enumerate(points):
    color, style = colors[i % len(colors)], ['-', '--', ':', '-.'][i // len(colors) % 4]
    for j, r in enumerate(p['trials']):
      label = p['label'] if j == 0 else None
      loss_ax.plot(*plots.series(r['rows'], 'train/loss'), style, color=color, alpha=0.8, label=label)
      steps, values = plots.series(r['rows'], sweep.metric)
      metric_ax.plot(steps, scale * values, style, marker='o', markersize=3, color=color, alpha=0.8)
  loss_ax.set_title('train loss', fontsize=10)
  metric_ax.set_title(sweep.metric + (' (%)' if scale == 100 else ''), fontsize=10)
  for ax in (loss_ax, metric_ax):
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  loss_ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=80)
  plt.close(fig)


def build_report(sweep: sweep_lib.Sweep, workdir: str) -> str:
  """Writes the tables and plots into `workdir`; returns the text to print (Markdown and paths)."""
  storage.makedirs(workdir)
  points = summarize_points(sweep, workdir)
  table = write_tables(sweep, points, workdir)
  stem = sweep.metric.replace('/', '_')
  outputs = ['results.csv', 'results.md']
  if any(p['mean'] is not None for p in points):
    figures = {f'{stem}_by_key.png': plot_by_key, f'{stem}_by_point.png': plot_points,
               'curves.png': plot_training_curves}
    if not independent_keys(points):  # Explicit points only: the by-point plot says it all.
      del figures[f'{stem}_by_key.png']
    with storage.staged_folder(workdir) as folder:  # matplotlib writes local files; uploaded at the end.
      for name, plot in figures.items():
        plot(sweep, points, os.path.join(folder, name))
    outputs += list(figures)
  return table + '\nwrote ' + ', '.join(storage.join(workdir, o) for o in outputs)
