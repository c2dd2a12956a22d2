"""A real one-node SLURM cluster on 127.0.0.1 for the tests, everything in one temporary directory.

munged (its own key and socket), slurmctld and slurmd from Debian's packages
(`.ci/install_slurm`), configured by a slurm.conf in the directory that the
clients find through $SLURM_CONF. No accounting database: jobs are followed
with `squeue`. Timers are short (a requeued job may start again after 11 s
instead of 121 s; the scheduler looks at pending jobs every second) but the
time-limit check runs every 30 s as on any cluster: it is compiled into
slurmctld (PERIODIC_TIMEOUT). Each daemon is stopped by the PID it wrote.
"""

import datetime
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Optional

PROGRAMS = ('munged', 'slurmctld', 'slurmd', 'sbatch', 'srun', 'squeue', 'scontrol', 'scancel', 'sinfo')
CHECK_LINE = 'Testing job time limits'  # slurmctld's debug2 line at each time-limit check.
CHECK_PERIOD_S = 30  # slurmctld's PERIODIC_TIMEOUT.
ENDED_STATES = {'COMPLETED', 'CANCELLED', 'FAILED', 'TIMEOUT', 'NODE_FAIL', 'PREEMPTED', 'OUT_OF_MEMORY',
                'BOOT_FAIL', 'DEADLINE'}


class ClusterError(Exception):
  """The cluster did not start; the message says why, with the end of the daemons' logs."""


def missing_programs() -> list[str]:
  """The SLURM and munge programs not found on PATH (or in /usr/sbin)."""
  path = os.environ.get('PATH', '') + os.pathsep + '/usr/sbin' + os.pathsep + '/sbin'
  return [p for p in PROGRAMS if not shutil.which(p, path=path)]


def _free_ports(count: int) -> list[int]:
  sockets = [socket.socket() for _ in range(count)]
  try:
    for s in sockets:
      s.bind(('127.0.0.1', 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


class Cluster:
  """munged + slurmctld + slurmd under `root`; `start()`, then `env` for the clients, `stop()` at the end."""

  def __init__(self, root: str, cpus: int = 2):
    self.root = os.path.abspath(root)
    self.cpus = cpus
    self.node = socket.gethostname().split('.')[0]
    self.conf = os.path.join(self.root, 'slurm.conf')
    self.env = dict(os.environ, SLURM_CONF=self.conf)
    self.path = os.environ.get('PATH', '') + os.pathsep + '/usr/sbin' + os.pathsep + '/sbin'
    self._pid_files = []

  def _file(self, *parts: str) -> str:
    return os.path.join(self.root, *parts)

  def _write_config(self) -> None:
    controller_port, node_port = _free_ports(2)
    munge = self._file('munge')
    lines = {
        'ClusterName': 'vitjax', 'SlurmctldHost': f'{self.node}(127.0.0.1)',
        'SlurmctldPort': controller_port, 'SlurmdPort': node_port,
        'AuthType': 'auth/munge', 'CredType': 'cred/munge',
        # A requeued job may start again 11 s after it stopped, not 121 s (the launch credential's lifetime).
        'AuthInfo': f'socket={munge}/socket,cred_expire=10',
        'SlurmUser': 'root', 'SlurmdUser': 'root',
        'StateSaveLocation': self._file('state'), 'SlurmdSpoolDir': self._file('spool'),
        'SlurmctldPidFile': self._file('slurmctld.pid'), 'SlurmdPidFile': self._file('slurmd.pid'),
        'SlurmctldLogFile': self._file('slurmctld.log'), 'SlurmdLogFile': self._file('slurmd.log'),
        'SlurmctldDebug': 'debug2', 'LogTimeFormat': 'iso8601_ms',  # The time-limit checks, to the ms.
        'ProctrackType': 'proctrack/linuxproc', 'TaskPlugin': 'task/none', 'MpiDefault': 'none',
        'JobAcctGatherType': 'jobacct_gather/none', 'AccountingStorageType': 'accounting_storage/none',
        'JobCompType': 'jobcomp/none', 'SchedulerType': 'sched/builtin',
        'SchedulerParameters': 'sched_interval=1', 'SelectType': 'select/cons_tres',
        'SelectTypeParameters': 'CR_Core', 'ReturnToService': 2,
        'SlurmctldTimeout': 5, 'SlurmdTimeout': 5, 'MessageTimeout': 5, 'KillWait': 10,
        'InactiveLimit': 0, 'MinJobAge': 300, 'OverTimeLimit': 0,
        # The node is this machine, with `cpus` CPUs whatever it has.
        'SlurmdParameters': 'config_overrides',
    }
    text = ''.join(f'{key}={value}\n' for key, value in lines.items())
    text += (f'NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=4000 State=UNKNOWN\n'
             f'PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP\n')
    with open(self.conf, 'w') as f:
      f.write(text)

  def _daemon(self, command: list[str], pid_file: str, log: str) -> None:
    """Runs a daemon that forks into the background and writes `pid_file`; raises ClusterError if it did not."""
    self._pid_files.append(pid_file)
    output = self._file(os.path.basename(command[0]) + '.out')
    with open(output, 'w') as out:  # A file, not a pipe: a daemon may keep its descriptors open.
      result = subprocess.run(command, env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, timeout=30)
    deadline = time.time() + 10
    while not os.path.exists(pid_file) and time.time() < deadline:
      time.sleep(0.05)
    if result.returncode or not os.path.exists(pid_file):
      raise ClusterError(f'{command[0]} did not start (exit code {result.returncode}).\n'
                         f'{self.log_tail(output)}\n{self.log_tail(log)}')

  def log_tail(self, path: str, lines: int = 15) -> str:
    if not os.path.exists(path):
      return f'(no {os.path.basename(path)})'
    with open(path, errors='replace') as f:
      return f'end of {os.path.basename(path)}:\n' + ''.join(f.readlines()[-lines:])

  def start(self, timeout_s: float = 30) -> None:
    """Starts munged, slurmctld and slurmd and waits until the node takes jobs."""
    missing = missing_programs()
    if missing:
      raise ClusterError(f'not installed: {", ".join(missing)} (.ci/install_slurm installs them)')
    try:
      socket.gethostbyname(self.node)
    except OSError:
      raise ClusterError(f'this host name {self.node!r} does not resolve; map it in /etc/hosts '
                         '(.ci/install_slurm does)') from None
    for folder in ('munge', 'state', 'spool'):
      os.makedirs(self._file(folder), exist_ok=True)
    os.chmod(self.root, 0o755)  # munged wants every folder above its socket searchable by all.
    os.chmod(self._file('munge'), 0o755)
    key = self._file('munge', 'munge.key')
    with open(key, 'wb') as f:
      f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    self._write_config()

    def program(name):
      return shutil.which(name, path=self.path)
    munge = self._file('munge')
    self._daemon([program('munged'), f'--socket={munge}/socket', f'--key-file={key}',
                  f'--pid-file={munge}/munged.pid', f'--log-file={munge}/munged.log',
                  f'--seed-file={munge}/munged.seed'], f'{munge}/munged.pid', f'{munge}/munged.log')
    # -i: ignore any saved state (there is none); the node name and the config are ours.
    self._daemon([program('slurmctld'), '-f', self.conf, '-i'], self._file('slurmctld.pid'),
                 self._file('slurmctld.log'))
    self.controller_started = datetime.datetime.now()  # Its time-limit checks come every 30 s from here.
    self._daemon([program('slurmd'), '-f', self.conf, '-N', self.node], self._file('slurmd.pid'),
                 self._file('slurmd.log'))
    deadline = time.time() + timeout_s
    state = ''
    while time.time() < deadline:
      result = self.run('sinfo', '-h', '-n', self.node, '-o', '%T', check=False)
      state = (result.stdout + result.stderr).strip()
      if state in ('idle', 'mixed', 'allocated'):
        break
      time.sleep(0.1)
    else:
      raise ClusterError(f'the node is {state!r} after {timeout_s:.0f} s, not idle.\n'
                         f'{self.log_tail(self._file("slurmctld.log"))}\n{self.log_tail(self._file("slurmd.log"))}')
    # The controller's first scheduling pass comes a few seconds after it starts: a job that ran
    # says the cluster takes jobs.
    result = subprocess.run([shutil.which('srun', path=self.path), '--time=1', 'true'], env=self.env,
                            capture_output=True, text=True, timeout=timeout_s)
    if result.returncode:
      raise ClusterError(f'a first job (srun true) failed: {result.stderr.strip()}\n'
                         f'{self.log_tail(self._file("slurmctld.log"))}\n{self.log_tail(self._file("slurmd.log"))}')


  def stop(self) -> None:
    """Cancels the jobs left, then stops each daemon by the PID it wrote (slurmd, slurmctld, munged).

    A job's processes outlive the daemons, so they go first; a daemon still
    there after 10 s gets SIGKILL.
    """
    if len(self._pid_files) == 3:  # All three daemons started.
      try:
        active = [j for j, state in self.job_states().items() if state not in ENDED_STATES]
        if active:
          self.run('scancel', *active, check=False)
          self.wait_jobs(active, timeout_s=30)
      except (RuntimeError, TimeoutError, subprocess.TimeoutExpired):
        pass  # Stop the daemons all the same.
    for pid_file in reversed(self._pid_files):
      try:
        with open(pid_file) as f:
          pid = int(f.read().split()[0])
        os.kill(pid, signal.SIGTERM)
      except (OSError, ValueError, IndexError):
        continue
      deadline = time.time() + 10
      while time.time() < deadline:
        try:
          os.kill(pid, 0)
        except OSError:
          break
        if _is_zombie(pid):
          break
        time.sleep(0.05)
      else:
        try:
          os.kill(pid, signal.SIGKILL)
        except OSError:
          pass
    self._pid_files = []

  def run(self, *args: str, check: bool = True, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Runs a SLURM client (`sbatch`, `squeue`, ...) against this cluster."""
    result = subprocess.run([shutil.which(args[0], path=self.path), *args[1:]], env=env or self.env,
                            capture_output=True, text=True, timeout=60)
    if check and result.returncode:
      raise RuntimeError(f'{" ".join(args)}: exit code {result.returncode}: {result.stderr.strip()}')
    return result

  def job_states(self) -> dict[str, str]:
    """{job id (`A_T` for array tasks): state} of every job the controller still lists."""
    out = self.run('squeue', '-h', '-r', '--states=all', '-o', '%i %T').stdout
    return dict(line.split() for line in out.splitlines() if line.strip())

  def wait_jobs(self, job_ids: list[str], timeout_s: float = 300) -> dict[str, str]:
    """Waits until none of `job_ids` is pending, running or completing; returns their last states."""
    deadline = time.time() + timeout_s
    last = {}
    while time.time() < deadline:
      states = self.job_states()
      last.update({j: states[j] for j in job_ids if j in states})
      if all(states.get(j, 'GONE') in ENDED_STATES | {'GONE'} for j in job_ids):
        return last
      time.sleep(0.5)
    raise TimeoutError(f'jobs {job_ids} still {last} after {timeout_s:.0f} s')

  def time_limit_checks(self) -> list[datetime.datetime]:
    """When slurmctld checked its jobs' time limits (every 30 s from its start), from its log; local time."""
    pattern = re.compile(r'^\[([0-9T:.-]+)\] debug2: ' + CHECK_LINE)
    with open(self.controller_log_path, errors='replace') as f:
      return [datetime.datetime.fromisoformat(m.group(1)) for m in map(pattern.match, f) if m]

  @property
  def controller_log_path(self) -> str:
    return self._file('slurmctld.log')

  def controller_log(self) -> str:
    """slurmctld's log so far (debug2: its time-limit checks, the warning signals it sent)."""
    with open(self.controller_log_path, errors='replace') as f:
      return f.read()


def _is_zombie(pid: int) -> bool:
  """A daemon that exited but is not reaped yet (its parent is not init) counts as stopped."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] == 'Z'
  except OSError:
    return True
