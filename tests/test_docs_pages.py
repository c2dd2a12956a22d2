"""The pages that need nothing the README's commands make work as written, from a fresh clone.

Every page of docs/ and experiments/README.md but the README's group and the
pages after the quickstart (tests/doc_pages.py), in reading order. A command
the README shows too is not run again (tests/test_docs.py runs it).
"""

from tests import doc_pages
from tests.doc_session import Session


def test_other_pages_work_as_written(tmp_path, data_dir, run_command, monkeypatch):
  doc_pages.enter(tmp_path, monkeypatch, data_dir)
  session = Session(tmp_path, data_dir, run_command, seen=doc_pages.readme_seen())
  failures = session.run_all(doc_pages.commands_of(doc_pages.other_pages()))
  print(session.report())
  assert not failures, f'{len(failures)} doc command(s) fail:\n\n' + '\n\n'.join(failures)
