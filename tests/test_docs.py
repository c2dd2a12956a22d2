"""Every command of the README and docs/install.md works as written, in reading order; the docs' tables.

The commands are read from the Markdown (tests/doc_commands.py) and run by a
`tests.doc_session.Session` in a fresh temporary directory holding copies of
`configs/` and `experiments/`, as a new user would copy them. The directory
they leave (the quickstart run, its export) is where the pages that read it
go on (tests/test_docs_quickstart.py); the other pages run in
tests/test_docs_pages.py. How to write a doc command: docs/testing.md.
"""

import json
import os
import re

from tests import doc_commands, doc_pages


def test_readme_commands_work_as_written(tmp_path, data_dir, run_command, monkeypatch):
  doc_pages.enter(tmp_path, monkeypatch, data_dir)
  readme = doc_pages.readme_directory(data_dir, run_command)
  with open(os.path.join(readme, doc_pages.RESULT)) as f:
    result = json.load(f)
  print(result['report'])
  assert not result['failures'], (f'{len(result["failures"])} doc command(s) fail:\n\n'
                                  + '\n\n'.join(result['failures']))


def test_doc_tables_have_no_gaps():
  """A blank line inside a Markdown table ends it: the rows after it show as text."""
  for path in doc_commands.doc_files():
    lines = open(os.path.join(doc_commands.REPO, path)).read().split('\n')
    for i, line in enumerate(lines):
      starts_table = line.startswith('|') and i + 1 < len(lines) and re.match(r'^\|\s*:?-', lines[i + 1])
      if line.startswith('|') and not starts_table and not lines[i - 1].startswith('|'):
        raise AssertionError(f'{path}:{i + 1}: a table row outside a table (a blank line above it?)')
