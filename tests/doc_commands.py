"""The commands of the docs, as a new user would copy them: read from the Markdown, in reading order.

`tests/test_docs.py` runs them. This module only reads and classifies (no JAX):
- a ```bash / ```sh / ```shell block is commands, one per line (a trailing `\\` continues
  it; `&&` and `;` separate commands); a line `# error: TEXT` right after a command says the
  command must fail with that `error:` line;
- a ```python block is a program;
- a block that starts with `#!` is a file shown, not commands; an unlabelled block is output;
- `<!-- doctest: flags-only REASON -->` on a line before a block marks its commands as checked
  for their flags only (their Python compiled only): for what the test machine cannot do
  (a failing disk, a GPU, a cluster, downloads) when the test cannot tell by itself.
"""

import dataclasses
import os
import re
import shlex
from typing import Iterator, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHELL = ('bash', 'sh', 'shell')
MARKER = re.compile(r'<!--\s*doctest:\s*(\S+)\s*(.*?)\s*-->')


@dataclasses.dataclass
class Command:
  """One command (or Python program) of the docs, where it is and what it must do."""
  path: str  # Relative to the repo root.
  line: int  # 1-based line of the command's first line.
  kind: str  # 'shell' or 'python'.
  text: str  # The command line (continuations joined), or the Python source.
  argv: list[str] = dataclasses.field(default_factory=list)  # Shell words, comments dropped.
  flags_only: str = ''  # The marker's reason, if the doc marks the block flags-only.
  expect_error: str = ''  # The text after `# error:` on the lines that follow, if any.
  problem: str = ''  # Why the line is not a command the test can read (a pipe, a bracketed synopsis).

  def where(self) -> str:
    return f'{self.path}:{self.line}'


def doc_files() -> list[str]:
  """README.md, then the pages in the order the README's "Docs" list links them, then pages it does not
  link (alphabetically), then experiments/README.md: the order a reader meets them."""
  readme = open(os.path.join(REPO, 'README.md')).read()
  docs_list = readme.split('\n## Docs', 1)[-1]
  linked = [p for p in re.findall(r'\]\((docs/[\w.-]+\.md)\)', docs_list)
            if os.path.isfile(os.path.join(REPO, p))]
  pages = sorted(f'docs/{name}' for name in os.listdir(os.path.join(REPO, 'docs')) if name.endswith('.md'))
  ordered = list(dict.fromkeys(linked + pages))
  return ['README.md'] + ordered + ['experiments/README.md']


def blocks(path: str) -> Iterator[tuple[int, str, list[str], str]]:
  """(line of the first body line, language, body lines, marker reason or '') of each fenced block."""
  lines = open(os.path.join(REPO, path)).read().split('\n')
  marker, i = '', 0
  while i < len(lines):
    line = lines[i]
    found = MARKER.search(line)
    if found:
      if found.group(1) != 'flags-only':
        raise ValueError(f'{path}:{i + 1}: unknown doctest marker {found.group(1)!r} (docs/testing.md)')
      marker = found.group(2) or 'marked flags-only'
    fence = re.match(r'^(\s*)(```+)\s*(\S*)', line)
    if fence:
      end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(fence.group(2)))
      yield i + 2, fence.group(3).lower(), lines[i + 1:end], marker
      marker, i = '', end
    i += 1


def split_commands(text: str) -> list[list[str]]:
  """The shell words of each command of one line: `a && b; c` gives three; comments dropped."""
  lexer = shlex.shlex(text, posix=True, punctuation_chars=';&|')
  lexer.whitespace_split = True
  commands, current = [], []
  for word in lexer:
    if word in ('&&', ';', '||'):
      commands.append(current)
      current = []
    elif word in ('&', '|'):
      raise ValueError(f'`{word}`: a pipe or background job, or a synopsis (`[A|B]`), not a command to copy')
    else:
      current.append(word)
  return [c for c in commands + [current] if c]


def commands(path: str) -> list[Command]:
  """Every command and program of one doc page, in order."""
  found = []
  for start, language, body, marker in blocks(path):
    if language == 'python':
      found.append(Command(path, start, 'python', '\n'.join(body), flags_only=marker))
      continue
    if language not in SHELL or (body and body[0].startswith('#!')):
      continue
    i = 0
    while i < len(body):
      first, text = i, body[i]
      while text.rstrip().endswith('\\') and i + 1 < len(body):
        i += 1
        text = text.rstrip()[:-1] + ' ' + body[i].strip()
      i += 1
      if not text.strip() or text.lstrip().startswith('#'):
        continue
      expect = []
      while i < len(body) and body[i].lstrip().startswith('#') and (
          expect or body[i].lstrip().startswith('# error:')):
        expect.append(body[i].lstrip()[1:].strip())
        i += 1
      error = ' '.join(expect)[len('error:'):].strip() if expect else ''
      try:
        split = split_commands(text)
      except ValueError as e:
        found.append(Command(path, start + first, 'shell', text, problem=str(e)))
        continue
      for argv in split:
        found.append(Command(path, start + first, 'shell', text, argv, marker, error))
  return found


def all_commands() -> list[Command]:
  return [c for path in doc_files() for c in commands(path)]


def program(argv: list[str]) -> tuple[str, list[str]]:
  """(what runs, its arguments): 'vit-jax' for `vit-jax`, `.venv/bin/vit-jax`, `python -m vit_jax`
  (and `python -m vit_jax.main`, which is `vit-jax train`), 'python' for other Python, else the
  program's base name."""
  name = os.path.basename(argv[0])
  if name == 'vit-jax':
    return 'vit-jax', argv[1:]
  if re.fullmatch(r'python[\d.]*', name):
    if argv[1:3] == ['-m', 'vit_jax']:
      return 'vit-jax', argv[3:]
    if argv[1:3] == ['-m', 'vit_jax.main']:
      return 'vit-jax', ['train'] + argv[3:]
    return 'python', argv[1:]
  return name, argv[1:]


def flag_value(args: list[str], name: str) -> Optional[str]:
  """The value of `--name VALUE` or `--name=VALUE` in `args` (the last one), else None."""
  value = None
  for i, arg in enumerate(args):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(args):
      value = args[i + 1]
  return value


def quote(argv: list[str]) -> str:
  return ' '.join(shlex.quote(a) for a in argv)
