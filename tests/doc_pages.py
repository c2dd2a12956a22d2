"""The three doc tests' pages and directories: the README's commands run once per test run, and where
the other pages go on from (tests/doc_session.py runs the commands)."""

import contextlib
import os
import shutil
import sys

from tests import doc_commands
from tests.doc_commands import Command, program, quote
from tests.doc_session import REPO, Session


# The pages of each doc test, in reading order (tests/doc_commands.doc_files). A reader meets the README
# first: its commands (and install.md's) run once per test run (`readme_directory`), and the pages that
# read what they leave (the quickstart run in `workdirs/quickstart`, its `quickstart.npz`) go on in a copy
# of that directory (tests/test_docs_quickstart.py). Every other page starts from a fresh clone
# (tests/test_docs_pages.py). The three tests run on separate xdist workers.
README_PAGES = ('README.md', 'docs/install.md')
QUICKSTART_PAGES = ('docs/checkpoints.md', 'docs/transfer.md', 'docs/fault_tolerance.md', 'docs/inspect.md',
                    'docs/figure7.md')


def other_pages() -> list[str]:
  """The pages of neither group, in reading order."""
  return [p for p in doc_commands.doc_files() if p not in README_PAGES + QUICKSTART_PAGES]


def commands_of(pages) -> list[Command]:
  return [c for path in pages for c in doc_commands.commands(path)]


def readme_seen() -> dict:
  """The README group's `vit-jax` commands as written, for `Session(seen=...)` of a later page: a page that
  shows one again is not run twice."""
  seen = {}
  for command in commands_of(README_PAGES):
    name, written = program(command.argv) if command.argv else ('', [])
    if name == 'vit-jax':
      seen.setdefault(quote(written), command.where())
  return seen


def copy_clone(root) -> None:
  """What a fresh `git clone` gives the commands: copies of configs/ and experiments/ (they read them and
  some write beside them)."""
  for folder in ('configs', 'experiments'):
    shutil.copytree(os.path.join(REPO, folder), os.path.join(root, folder),
                    ignore=shutil.ignore_patterns('__pycache__'), dirs_exist_ok=True)


RESULT = '.doc_session.json'  # What the README's session reported, in its directory.


def readme_directory(data_dir: str, run_command) -> str:
  """A directory in which the README's and install.md's commands ran in order, built once per test run
  (`conftest.built_once`) by the first doc test that asks; `RESULT` in it holds their failures and report.
  The caller is a test with the `doc_dir` fixture's settings (sys.argv, tfds' data dir)."""
  import json
  from tests.conftest import built_once

  def build(path):
    copy_clone(path)
    with contextlib.chdir(path):
      session = Session(path, data_dir, run_command)
      failures = session.run_all(commands_of(README_PAGES))
    with open(os.path.join(path, RESULT), 'w') as f:
      json.dump({'failures': failures, 'report': session.report()}, f)
  return built_once('doc_readme', build)


def enter(root, monkeypatch, data_dir: str) -> None:
  """Makes `root` a fresh clone (`copy_clone`) and the current directory for the rest of the test, with
  the process set up as a user's: `vit-jax` as the program name, and tfds' default data folder this
  run's (Python examples with a default config prepare the digits there)."""
  import tensorflow_datasets as tfds
  copy_clone(root)
  monkeypatch.chdir(root)
  monkeypatch.setattr(sys, 'argv', ['vit-jax'])
  monkeypatch.setattr(tfds.core.constants, 'DATA_DIR', data_dir)
