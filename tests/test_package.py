"""The package stands alone: cheap imports, layers that import one way, and commands that work outside the checkout."""

import ast
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests import trained_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'vit_jax')

# Lower layers never import upper ones (module prefixes under vit_jax).
UPPER = ('vit_jax.training', 'vit_jax.tools', 'vit_jax.bench', 'vit_jax.sweeps', 'vit_jax.cli', 'vit_jax.main',
         'vit_jax.checkpoint')
FORBIDDEN = {
    # The model is plain JAX: the CPU rules (vit_jax.cpu) and cuDNN's attention (vit_jax.gpu) are injected
    # by the training side.
    'vit_jax.models': UPPER + ('vit_jax.cpu', 'vit_jax.gpu'),
    'vit_jax.data': UPPER,
    'vit_jax.cpu': UPPER,
    'vit_jax.gpu': UPPER + ('vit_jax.models',),
    'vit_jax.training': ('vit_jax.tools', 'vit_jax.bench', 'vit_jax.sweeps', 'vit_jax.cli', 'vit_jax.main'),
}
# What TensorFlow's C++ start-up prints unless vit_jax.cli keeps it off the console.
TENSORFLOW_NOISE = ('absl::InitializeLog', 'oneDNN custom operations', 'cpu_feature_guard')


def module_name(path: str) -> str:
  relative = os.path.relpath(path, REPO)[:-len('.py')].replace(os.sep, '.')
  return relative[:-len('.__init__')] if relative.endswith('.__init__') else relative


def package_modules() -> dict[str, str]:
  """{module name: file} of every module under vit_jax/."""
  modules = {}
  for directory, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        modules[module_name(path)] = path
  return modules


def imported_names(path: str, module: str) -> set[str]:
  """Every name `path` imports, at any depth (function-level imports too), relative ones resolved.

  `from a.b import c` gives `a.b` and `a.b.c`, as c may be a module or a name defined in a.b.
  """
  return {name for names, _ in import_statements(path, module) for name in names}


def import_statements(path: str, module: str) -> list[tuple[list[str], str]]:
  """([names imported], the `from` module or '') of each import statement in `path`, at any depth."""
  tree = ast.parse(open(path).read(), path)
  package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
  statements = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      statements.extend(([alias.name], '') for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')
        base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      statements.append(([base] + [f'{base}.{alias.name}' for alias in node.names], base))
  return statements


def import_graph() -> dict[str, set[str]]:
  """{module: the vit_jax modules it imports}.

  `import a.b.c` also runs the packages a and a.b, which count too, except the
  module's own enclosing packages (Python runs those first anyway). A package
  from which a statement takes a name (not only submodules) always counts:
  `from vit_jax.checkpoint import save` inside vit_jax/checkpoint/ runs its
  __init__ for that name.
  """
  modules = package_modules()
  graph = {}
  for module, path in modules.items():
    edges = set()
    for names, base in import_statements(path, module):
      named = {name for name in names if name in modules}
      takes_a_name = base and any(name not in modules for name in names[1:])
      explicit = named - {base} | ({base} if takes_a_name or not base else set())
      for name in named | explicit:
        parts = name.split('.')
        for prefix in ('.'.join(parts[:i]) for i in range(1, len(parts) + 1)):
          enclosing = module.startswith(prefix + '.') and prefix not in explicit
          if prefix in modules and prefix != module and not enclosing:
            edges.add(prefix)
    graph[module] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle of `graph` as a list of modules, or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done.
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for child in sorted(graph[node]):
      if state.get(child) == 1:
        return path[path.index(child):] + [child]
      if child not in state and (cycle := visit(child)):
        return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def test_the_layout_has_no_import_cycles_and_imports_run_one_way():
  graph = import_graph()
  assert {'vit_jax.models', 'vit_jax.data.pipeline', 'vit_jax.training.steps', 'vit_jax.cli'} <= set(graph)
  assert find_cycle(graph) is None, f'import cycle: {" -> ".join(find_cycle(graph))}'
  upward = [f'{module} imports {target}' for module, targets in sorted(graph.items())
            for layer, forbidden in FORBIDDEN.items() if module == layer or module.startswith(layer + '.')
            for target in sorted(targets) if target.startswith(forbidden)]
  assert not upward, upward


def test_find_cycle_finds_function_level_cycles(tmp_path):
  # The checker itself: a cycle through an import inside a function is one.
  (tmp_path / 'a.py').write_text('def f():\n  from vit_jax import b\n')
  assert 'vit_jax.b' in imported_names(str(tmp_path / 'a.py'), 'vit_jax.a')
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_no_module_imports_the_repo_level_configs():
  offenders = [module for module, path in package_modules().items()
               if any(name == 'configs' or name.startswith('configs.') for name in imported_names(path, module))]
  assert not offenders, offenders


IMPORT_PROBE = """
import json, sys
from absl import flags, logging
import flax, jax, ml_collections, optax, orbax.checkpoint  # Their own flags are theirs.
before = set(flags.FLAGS)
import vit_jax, vit_jax.models, vit_jax.training.steps
vit_jax.create_model, vit_jax.load_npz, vit_jax.get_config, vit_jax.retain_freed_memory  # The lazy names resolve.
after = set(flags.FLAGS)
tensorflow = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets'))
print(json.dumps({'tensorflow': tensorflow, 'new_flags': sorted(after - before)}))
# Then, in the same fresh process, the benchmark and memory commands' modules (test_benchmark_and_memory_...).
from vit_jax.bench import benchmark
from vit_jax.tools import memory
from vit_jax.training import setup
setup.setup
print('tensorflow' in sys.modules)
"""


@pytest.fixture(scope='module')
def import_probe() -> list[str]:
  """The lines IMPORT_PROBE printed in a fresh process: this one has long imported TensorFlow and
  defined flags. One process for both tests that read it."""
  result = subprocess.run([sys.executable, '-c', IMPORT_PROBE], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


def test_importing_the_package_model_and_train_step_loads_no_tensorflow_and_defines_no_flags(import_probe):
  found = json.loads(import_probe[0])
  assert found == {'tensorflow': [], 'new_flags': []}


def outside_checkout(tmp_path) -> tuple[str, dict]:
  """(cwd, env) of a process that sees a copy of just vit_jax/, with the checkout off sys.path."""
  site = tmp_path / 'site'
  shutil.copytree(PACKAGE, site / 'vit_jax', ignore=shutil.ignore_patterns('__pycache__'))
  cwd = tmp_path / 'elsewhere'
  cwd.mkdir()
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env['PYTHONPATH'] = str(site)
  return str(cwd), env


# One process outside the checkout: where `vit_jax` and `configs` come from, then `python -m vit_jax ARGS`
# for each command given as JSON (runpy runs vit_jax/__main__.py as -m does), each one's output after a
# marker line on stdout and stderr, then its exit code and the compilation cache's files. One process
# instead of one per command saves seconds of imports each; JAX's in-memory caches are cleared between
# commands, so each compiles its programs, or reads them from the persistent cache, as a process of its own.
OUTSIDE_DRIVER = """
import importlib.util, json, os, runpy, sys
import vit_jax
print(vit_jax.__file__, importlib.util.find_spec('configs'), flush=True)
cache = os.environ['VIT_JAX_COMPILATION_CACHE_DIR']
for args in json.loads(sys.argv[1]):
  print('### command', flush=True)
  print('### command', file=sys.stderr, flush=True)
  sys.argv = ['vit_jax', *args]
  try:
    runpy.run_module('vit_jax', run_name='__main__', alter_sys=True)
    code = 0
  except SystemExit as e:
    code = e.code or 0
  sys.stderr.flush()
  print('### exit', json.dumps([code, sorted(os.listdir(cache)) if os.path.isdir(cache) else []]), flush=True)
  import jax
  jax.clear_caches()
"""


def test_commands_work_from_an_unrelated_directory_without_the_checkout(tiny_config, tmp_path):
  from vit_jax import load_workdir
  from vit_jax.tools import export

  workdir = trained_run.trained_workdir(tiny_config)
  npz = str(tmp_path / 'exported' / 'model.npz')
  os.makedirs(os.path.dirname(npz))
  export.export_run(load_workdir(workdir), npz)
  images = os.path.join(REPO, 'experiments', 'quickstart', 'samples')
  cwd, env = outside_checkout(tmp_path)
  cache = tmp_path / 'jax_cache'
  env.update(VIT_JAX_COMPILATION_CACHE='1', VIT_JAX_COMPILATION_CACHE_DIR=str(cache))
  commands = [['predict', '--workdir', workdir, '--top_k', '2', images],
              ['predict', '--checkpoint', npz, '--top_k', '2', images],
              ['evaluate', '--workdir', workdir, '--out_dir', str(tmp_path / 'eval'), '--nocompilation_cache']]
  result = subprocess.run([sys.executable, '-c', OUTSIDE_DRIVER, json.dumps(commands)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert not [line for line in result.stderr.splitlines() if any(n in line for n in TENSORFLOW_NOISE)], \
      result.stderr
  probe, *outputs = result.stdout.split('### command\n')
  assert probe.split() == [os.path.join(env['PYTHONPATH'], 'vit_jax', '__init__.py'), 'None'], probe
  errors = result.stderr.split('### command\n')[1:]
  assert len(outputs) == len(errors) == len(commands), result.stdout + result.stderr
  stdouts, cached = [], []
  for output, err in zip(outputs, errors):
    stdout, _, last = output.rpartition('### exit ')
    code, files = json.loads(last)
    assert code == 0, (stdout, err)
    stdouts.append(stdout)
    cached.append(files)

  from_workdir, from_export, _ = stdouts
  assert from_workdir.count('%') == 2 * len(os.listdir(images))
  assert cached[0], 'the first predict wrote nothing into the compilation cache'
  # The exported parameters have the same shapes: the same program, read from the cache, nothing new.
  assert from_export == from_workdir
  assert cached[1] == cached[0]

  report = json.load(open(tmp_path / 'eval' / 'report.json'))
  assert report['num_examples'] == 360


def test_preparing_the_bundled_dataset_prints_our_line_and_no_tfds_bars(tmp_path, capfd):
  import ml_collections
  from vit_jax.data import pipeline

  capfd.readouterr()  # What importing TensorFlow printed, if this test imported it.
  dataset = ml_collections.ConfigDict({'name': 'sklearn_digits', 'data_dir': str(tmp_path)})
  assert pipeline.get_builder(dataset).is_prepared()
  out, err = capfd.readouterr()
  assert out.splitlines() == [f"Preparing the bundled 'sklearn_digits' dataset in "
                              f"{tmp_path}/sklearn_digits/1.0.0 (once, seconds)."], out
  assert err == '', err


def test_benchmark_and_memory_need_no_tensorflow(import_probe):
  """The accelerator hosts we benchmark on have no TensorFlow: the benchmark and memory commands import none."""
  assert import_probe[1:] == ['False']
