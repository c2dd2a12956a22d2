"""A Google Cloud Storage server on 127.0.0.1 for the tests: an emulator from PyPI behind a small front.

`python -m tests.storage_server PORT DATA_DIR` runs it; `StorageServer` (and the `gcs` fixture of
tests/test_storage.py) start and stop it. Clients are pointed at it by their documented settings
(`client_env`): gcsfs and google-cloud-storage by `STORAGE_EMULATOR_HOST`, tensorstore by
`TENSORSTORE_GCS_HTTP_URL`. With credentials, tensorstore sends the token of
`GOOGLE_AUTH_TOKEN_FOR_TESTING` and gcsfs is anonymous (`FSSPEC_GCS_TOKEN=anon`: gcsfs takes no bare
token); without, both look for Application Default Credentials as in production. Nothing leaves
127.0.0.1: the metadata-server addresses that the Google auth libraries probe for credentials are
pointed at a closed local port.

The emulator (gcp-storage-emulator, in the server's process) speaks GCS's JSON API, but ignores the
generation preconditions (`ifGenerationMatch`, `ifGenerationNotMatch`) and names no generation on a
download, both of which tensorstore relies on (and gcsfs' exclusive create, `mode='create'`, the
checkpoint cache's lock in a bucket): the front checks the preconditions against the object's
metadata and adds the `x-goog-generation` header, as GCS does. The emulator models neither credentials
nor permissions nor outages either; the front adds those, as GCS answers them, switched by
`POST /_control` with a JSON body:
- `require_token`: a request without `Authorization: Bearer ...` gets 401 (an anonymous caller);
- `deny`: buckets whose every request gets 403 (no permission);
- `fail_writes`: the next N object uploads (of names holding `fail_writes_matching`, if set) get 503
  (transient: the storage libraries retry them);
- `deny_writes_matching`: every upload of an object whose name holds this text gets 403 from now on (a
  failure that persists: permission revoked mid-run; 403 is not retried);
`GET /_stats` returns the counts of requests by method.
"""

import contextlib
import http.client
import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from typing import Optional

TOKEN = 'vit-jax-test-token'
CLOSED_PORT_URL = '127.0.0.1:9'  # discard: nothing listens there, so a credentials probe fails at once.


def client_env(url: str, token: Optional[str] = TOKEN) -> dict[str, str]:
  """Environment that points every storage client at the server `url` (http://127.0.0.1:PORT)."""
  env = {
      'STORAGE_EMULATOR_HOST': url,  # gcsfs, google-cloud-storage (orbax's bucket check).
      'TENSORSTORE_GCS_HTTP_URL': url,  # tensorstore's gcs driver (orbax's arrays).
      'TENSORSTORE_GCS_HTTP_VERSION': '1',
      # Where google-auth and tensorstore look for a metadata server (credentials on a GCE/TPU VM).
      'GCE_METADATA_HOST': CLOSED_PORT_URL, 'GCE_METADATA_IP': CLOSED_PORT_URL,
      'GCE_METADATA_ROOT': CLOSED_PORT_URL, 'NO_GCE_CHECK': 'True',
      'EPATH_USE_TF': 'false',
      # gcsfs' zonal / hierarchical-namespace bucket support first asks the storage-control gRPC API about
      # the bucket, which no emulator serves (it waits 60 s, then falls back to the plain JSON API).
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
  }
  if token:
    env.update(GOOGLE_AUTH_TOKEN_FOR_TESTING=token, FSSPEC_GCS_TOKEN='anon')
  return env


class _Front(http.server.BaseHTTPRequestHandler):
  """Forwards each request to the emulator, unless a switch of `state` answers it first."""
  protocol_version = 'HTTP/1.1'
  state: dict = {}
  upstream: tuple[str, int] = ('127.0.0.1', 0)
  lock = threading.Lock()

  def log_message(self, *args) -> None:
    pass

  def _body(self) -> bytes:
    length = self.headers.get('Content-Length')
    if length is not None:
      return self.rfile.read(int(length))
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      chunks = []
      while True:
        size = int(self.rfile.readline().strip() or b'0', 16)
        if not size:
          self.rfile.readline()
          return b''.join(chunks)
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
    return b''

  def _answer(self, code: int, body: dict) -> None:
    data = json.dumps(body).encode()
    self.send_response(code)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _error(self, code: int, message: str) -> None:
    self._answer(code, {'error': {'code': code, 'message': message,
                                  'errors': [{'message': message, 'domain': 'global'}]}})

  def _bucket(self) -> str:
    parts = self.path.split('?')[0].split('/')
    return parts[parts.index('b') + 1] if 'b' in parts[:-1] else ''

  def _handle(self) -> None:
    body = self.body = self._body()
    if self.path.startswith('/_control'):
      with self.lock:
        self.state.update(json.loads(body or b'{}'))
      return self._answer(200, self.state)
    if self.path.startswith('/_stats'):
      return self._answer(200, self.state.get('stats', {}))
    with self.lock:
      stats = self.state.setdefault('stats', {})
      stats[self.command] = stats.get(self.command, 0) + 1
      upload = self.path.startswith('/upload/')
      if self.state.get('require_token') and not self.headers.get('Authorization', '').startswith('Bearer '):
        return self._error(401, 'Anonymous caller does not have storage.objects access to the Google Cloud '
                                'Storage object. Permission denied.')
      if self._bucket() in self.state.get('deny', ()):
        return self._error(403, f'The caller does not have permission to access bucket {self._bucket()}.')
      matching = self.state.get('deny_writes_matching')
      if upload and matching and (matching in urllib.parse.unquote(self.path) or matching.encode() in body):
        return self._error(403, 'The caller does not have storage.objects.create access (revoked).')
      failing = self.state.get('fail_writes_matching')
      if upload and self.state.get('fail_writes', 0) > 0 and (
          not failing or failing in urllib.parse.unquote(self.path) or failing.encode() in body):
        self.state['fail_writes'] -= 1
        return self._error(503, 'Service Unavailable (injected by tests/storage_server.py).')
    self._forward(body)

  def _upstream(self, method: str, path: str, body: bytes = b'', headers: Optional[dict] = None):
    """(status, reason, headers, body) of one request to the emulator."""
    connection = http.client.HTTPConnection(*self.upstream, timeout=120)
    headers = dict(headers or {}, **{'Content-Length': str(len(body))})
    connection.request(method, path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, response.reason, response.getheaders(), data

  def _generation(self, bucket: str, encoded_name: str) -> Optional[tuple[str, str]]:
    """(generation, metageneration) of an object, None when it does not exist."""
    status, _, _, data = self._upstream('GET', f'/storage/v1/b/{bucket}/o/{encoded_name}')
    if status != 200:
      return None
    meta = json.loads(data)
    return str(meta['generation']), str(meta.get('metageneration', 1))

  def _object(self) -> Optional[tuple[str, str]]:
    """(bucket, percent-encoded object name) the request is about, None for bucket-level requests."""
    path, _, query = self.path.partition('?')
    parts = path.split('/')
    if 'o' in parts and 'b' in parts and parts.index('o') + 1 < len(parts):
      return parts[parts.index('b') + 1], '/'.join(parts[parts.index('o') + 1:])
    name = urllib.parse.parse_qs(query).get('name')
    if path.startswith('/upload/') and not name:  # A multipart upload names its object in the JSON part.
      found = re.search(rb'\{"name": ("(?:[^"\\]|\\.)*")', self.body[:4096])
      name = [json.loads(found.group(1))] if found else None
    if path.startswith('/upload/') and name:
      return parts[parts.index('b') + 1], urllib.parse.quote(name[0], safe='')
    return None

  def _precondition_fails(self) -> Optional[int]:
    """412 (or 304 for a read) when the request's ifGenerationMatch / ifGenerationNotMatch does not hold:
    the emulator ignores both, and tensorstore relies on them."""
    query = urllib.parse.parse_qs(self.path.partition('?')[2])
    match, not_match = query.get('ifGenerationMatch', [None])[0], query.get('ifGenerationNotMatch', [None])[0]
    target = self._object()
    if (match is None and not_match is None) or target is None:
      return None
    current = self._generation(*target)
    generation = current[0] if current else '0'
    if match is not None and match != generation:
      return 412
    if not_match is not None and not_match == generation:
      return 304 if self.command == 'GET' else 412
    return None

  def _forward(self, body: bytes) -> None:
    headers = {k: v for k, v in self.headers.items()
               if k.lower() not in ('host', 'transfer-encoding', 'content-length', 'connection')}
    headers['Host'] = self.headers.get('Host', f'{self.upstream[0]}:{self.upstream[1]}')
    with self.lock if 'ifGeneration' in self.path else contextlib.nullcontext():
      failed = self._precondition_fails()
      if failed == 304:
        self.send_response(304)
        self.send_header('Content-Length', '0')
        self.end_headers()
        return
      if failed:
        return self._error(412, 'At least one of the pre-conditions you specified did not hold.')
      status, reason, response_headers, data = self._upstream(self.command, self.path, body, headers)
    extra = {}
    media = self.command == 'GET' and ('alt=media' in self.path or self.path.startswith('/download/'))
    if media and status in (200, 206) and not any(k.lower() == 'x-goog-generation' for k, _ in response_headers):
      # GCS names the generation of the bytes it sends; the emulator does not (tensorstore reads it).
      current = self._generation(*self._object())
      if current:
        extra = {'x-goog-generation': current[0], 'x-goog-metageneration': current[1]}
    self.send_response(status, reason)
    for key, value in list(response_headers) + list(extra.items()):
      if key.lower() not in ('content-length', 'transfer-encoding', 'connection', 'server', 'date'):
        self.send_header(key, value)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

  def do_HEAD(self) -> None:
    self._handle()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def serve(port: int, data_dir: str, buckets: list[str]) -> None:
  """Runs the emulator on a free port and the front on `port`, both on 127.0.0.1, until killed."""
  from gcp_storage_emulator.server import create_server
  upstream_port = free_port()
  emulator = create_server('127.0.0.1', upstream_port, in_memory=False, data_dir=data_dir)
  emulator.start()
  for bucket in buckets:
    request = urllib.request.Request(f'http://127.0.0.1:{upstream_port}/storage/v1/b',
                                     data=json.dumps({'name': bucket}).encode(),
                                     headers={'Content-Type': 'application/json'}, method='POST')
    urllib.request.urlopen(request, timeout=10).read()
  _Front.upstream = ('127.0.0.1', upstream_port)
  front = http.server.ThreadingHTTPServer(('127.0.0.1', port), _Front)
  front.daemon_threads = True
  print('ready', flush=True)
  front.serve_forever()


class StorageServer:
  """The server as a child process: `url`, `control(**switches)`, `stop()`."""

  def __init__(self, data_dir: str, buckets: tuple[str, ...] = ('vit-jax-test', 'vit_models')):
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    self.log = open(os.path.join(data_dir, 'server.log'), 'ab')  # The emulator's and the front's messages.
    self.process = subprocess.Popen([sys.executable, '-m', 'tests.storage_server', str(self.port), data_dir,
                                     *buckets], cwd=root, stdout=subprocess.PIPE, stderr=self.log,
                                    stdin=subprocess.DEVNULL)
    line = self.process.stdout.readline()
    if line.strip() != b'ready':
      self.stop()
      raise RuntimeError(f'storage server did not start: {line!r}')

  def control(self, **switches) -> dict:
    """Sets the front's switches (see the module doc); returns them all."""
    request = urllib.request.Request(f'{self.url}/_control', data=json.dumps(switches).encode(), method='POST')
    return json.loads(urllib.request.urlopen(request, timeout=10).read())

  def reset(self) -> None:
    self.control(require_token=False, deny=[], fail_writes=0, fail_writes_matching='', deny_writes_matching='')

  def stop(self) -> None:
    if self.process.poll() is None:
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
    self.log.close()


if __name__ == '__main__':
  serve(int(sys.argv[1]), sys.argv[2], sys.argv[3:])
