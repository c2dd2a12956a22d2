"""The pages that read the README's quickstart run work as written, after the README.

checkpoints.md, transfer.md, fault_tolerance.md, inspect.md and figure7.md
start from what the README's commands left (`workdirs/quickstart`, shrunk
as the doc test shrinks training, and `quickstart.npz`): a copy of the
directory tests/test_docs.py's README session ran in, so a page that names
another workdir or a file the README does not make fails here.
"""

import shutil

from tests import doc_pages
from tests.doc_session import Session


def test_pages_after_the_quickstart_work_as_written(tmp_path, data_dir, run_command, monkeypatch):
  doc_pages.enter(tmp_path, monkeypatch, data_dir)
  readme = doc_pages.readme_directory(data_dir, run_command)
  shutil.copytree(readme, tmp_path, dirs_exist_ok=True, ignore=shutil.ignore_patterns(doc_pages.RESULT))
  session = Session(tmp_path, data_dir, run_command, seen=doc_pages.readme_seen())
  failures = session.run_all(doc_pages.commands_of(doc_pages.QUICKSTART_PAGES))
  print(session.report())
  assert not failures, f'{len(failures)} doc command(s) fail:\n\n' + '\n\n'.join(failures)
