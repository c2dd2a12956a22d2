"""A FUSE file system that mirrors a directory and fails chosen operations on chosen paths.

`python tests/faultfs.py SOURCE MOUNTPOINT RULES` mounts SOURCE at MOUNTPOINT
(libfuse 2 through fusepy; root mounts without fusermount) until it is
unmounted. Every operation goes to SOURCE's files unless a rule in the JSON
file RULES matches it, in which case it fails with that rule's errno, as a
network file system that stops answering (EIO) or a file system that denies
access (EACCES) does. RULES is read again whenever it changes, so a test can
switch faults on and off while processes use the mount:

  [{"path": "checkpoints/6/default/d/*", "errno": "EIO", "ops": ["read"]}]

`path` is a glob over the path inside the mount ('' is its root, `*` also
crosses '/'); `ops` are operation names of fusepy's `Operations` (all when
absent). Orbax and tensorstore do their own file I/O (tensorstore in C++), so
faults have to come from the file system to reach them.
"""

import errno
import fnmatch
import json
import os
import sys

from fuse import FUSE, FuseOSError, Operations


class FaultFS(Operations):
  """Passthrough of `source` whose operations fail where the rules in `rules_path` say."""

  def __init__(self, source: str, rules_path: str):
    self.source = os.path.realpath(source)
    self.rules_path = rules_path
    self.rules, self.rules_mtime = [], None

  def _check(self, op: str, path: str) -> None:
    try:
      mtime = os.stat(self.rules_path).st_mtime_ns
    except FileNotFoundError:
      mtime = None
    if mtime != self.rules_mtime:
      self.rules_mtime = mtime
      if mtime is None:
        self.rules = []
      else:
        with open(self.rules_path) as f:
          self.rules = json.load(f)
    inside = path.lstrip('/')
    for rule in self.rules:
      if ('ops' not in rule or op in rule['ops']) and fnmatch.fnmatchcase(inside, rule['path']):
        raise FuseOSError(getattr(errno, rule['errno']))

  def __call__(self, op, path, *args):
    self._check(op, path)
    try:
      return super().__call__(op, self.source + path, *args)
    except OSError as e:
      raise FuseOSError(e.errno) from None

  def access(self, path, mode):
    if not os.access(path, mode):
      raise FuseOSError(errno.EACCES)

  def chmod(self, path, mode):
    return os.chmod(path, mode)

  def chown(self, path, uid, gid):
    return os.chown(path, uid, gid)

  def create(self, path, mode, fi=None):
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)

  def flush(self, path, fh):
    return 0

  def fsync(self, path, datasync, fh):
    return os.fdatasync(fh) if datasync else os.fsync(fh)

  def fsyncdir(self, path, datasync, fh):
    return 0

  def getattr(self, path, fh=None):
    st = os.lstat(path)
    return {key: getattr(st, key) for key in ('st_atime', 'st_ctime', 'st_gid', 'st_mode', 'st_mtime',
                                              'st_nlink', 'st_size', 'st_uid')}

  def link(self, target, source):
    return os.link(self.source + source, target)

  def mkdir(self, path, mode):
    return os.mkdir(path, mode)

  def open(self, path, flags):
    return os.open(path, flags)

  def read(self, path, size, offset, fh):
    return os.pread(fh, size, offset)

  def readdir(self, path, fh):
    return ['.', '..'] + os.listdir(path)

  def readlink(self, path):
    return os.readlink(path)

  def release(self, path, fh):
    return os.close(fh)

  def rename(self, old, new):
    self._check('rename', new[len(self.source):])
    return os.rename(old, self.source + new)

  def rmdir(self, path):
    return os.rmdir(path)

  def statfs(self, path):
    st = os.statvfs(path)
    return {key: getattr(st, key) for key in ('f_bavail', 'f_bfree', 'f_blocks', 'f_bsize', 'f_favail',
                                              'f_ffree', 'f_files', 'f_flag', 'f_frsize', 'f_namemax')}

  def symlink(self, target, source):
    return os.symlink(source, target)

  def truncate(self, path, length, fh=None):
    if fh is not None:
      return os.ftruncate(fh, length)
    with open(path, 'r+b') as f:
      f.truncate(length)

  def unlink(self, path):
    return os.unlink(path)

  def utimens(self, path, times=None):
    return os.utime(path, times)

  def write(self, path, data, offset, fh):
    return os.pwrite(fh, data, offset)


if __name__ == '__main__':
  source, mountpoint, rules = sys.argv[1:4]
  # No caching of attributes, names or data, so that a switched rule applies at the next operation.
  FUSE(FaultFS(source, rules), mountpoint, foreground=True, nothreads=False, allow_other=True,
       attr_timeout=0, entry_timeout=0, negative_timeout=0, direct_io=True)
