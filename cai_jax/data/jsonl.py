"""JSON Lines I/O with line-numbered errors, crash-safe writes, and stage manifests.

Every stage of the pipeline reads the previous stage's files and writes its own,
so this module holds the three guarantees the design asks of data on disk:

* Bad input is reported where it is: every error a data file can cause is a
  `DataError` whose message starts with `path:LINE:` and names the field, so a
  user can open the file at that line and fix it.
* Nothing half-written is ever published: whole files go through a temporary
  file in the same directory, `fsync` and `os.replace` (`atomic_write_jsonl`,
  `atomic_write_json`); long generation stages write through `ResumableWriter`,
  which only ever appends to a `.partial` file and publishes it by rename.
* A finished stage can be recognised and skipped: `write_manifest` records the
  resolved config, content hashes of the inputs, counts, seed and code version,
  and `manifest_matches` says whether an output directory already holds the
  result of the same config on the same inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
import tempfile
from typing import IO, Any, Iterable, Iterator, Mapping

try:  # POSIX only; elsewhere ResumableWriter simply runs without the lock.
  import fcntl
except ImportError:  # pragma: no cover
  fcntl = None

MANIFEST_NAME = "manifest.json"


class DataError(ValueError):
  """A problem with user-supplied data; the message names file, line and field.

  A `ValueError` subclass so callers that already catch `ValueError` keep
  working, while entrypoints can catch exactly this to print a one-line error
  instead of a traceback.
  """


def data_error(path: str, line: int | None, message: str) -> DataError:
  """A `DataError` prefixed `path:LINE:` (or `path:` when no line applies)."""
  where = f"{path}:{line}" if line is not None else f"{path}"
  return DataError(f"{where}: {message}")


_TYPE_NAMES = {
    str: "a string", int: "an integer", float: "a number", bool: "a boolean",
    list: "a list", dict: "an object", type(None): "null",
}


def _type_name(value: Any) -> str:
  """JSON's name for a Python value's type, as the user wrote it in the file."""
  if value is None:
    return "null"
  return {str: "str", int: "int", float: "float", bool: "bool", list: "list",
          dict: "object"}.get(type(value), type(value).__name__)


def require(record: Mapping[str, Any], field: str, types: type | tuple[type, ...], path: str,
            line: int | None, *, context: str = "") -> Any:
  """Returns `record[field]`, or raises a `DataError` naming file, line and field.

  `types` is a type or a tuple of types, as for `isinstance`, except that a
  JSON boolean never passes for a number (Python's `bool` is an `int`).
  `context` prefixes the field name for nested fields, e.g.
  `context="conversations[2]."` gives `field 'conversations[2].value'`.
  """
  name = f"{context}{field}"
  if not isinstance(record, Mapping):
    raise data_error(path, line, f"expected an object holding field '{name}', "
                     f"got {_type_name(record)}")
  if field not in record:
    raise data_error(path, line, f"field '{name}' missing")
  value = record[field]
  allowed = types if isinstance(types, tuple) else (types,)
  ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
  if not ok:
    wanted = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in allowed)
    raise data_error(path, line, f"field '{name}' must be {wanted}, got {_type_name(value)}")
  return value


# ----------------------------------------------------------------------------
# Reading.


def _open_text(path: str) -> IO[bytes]:
  """Opens a data file as bytes; `.gz` is read through gzip (hh-rlhf ships `.jsonl.gz`)."""
  if path.endswith(".gz"):
    return gzip.open(path, "rb")
  return open(path, "rb")


def _check_readable(path: str) -> None:
  if not os.path.exists(path):
    raise DataError(f"{path}: file does not exist")
  if os.path.isdir(path):
    raise DataError(f"{path}: is a directory, expected a JSON Lines file")


def _decode_line(raw: bytes, path: str, line: int) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise data_error(path, line, f"not valid UTF-8 ({e.reason} at byte {e.start})") from None


def _first_char(path: str) -> str:
  """The first non-blank character of the file ("" if none), BOM skipped."""
  with _open_text(path) as f:
    while chunk := f.read(4096):
      text = chunk.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
      if text:
        return text[0]
  return ""


def _array_records(path: str) -> Iterator[tuple[int, dict]]:
  """Elements of a file holding one JSON array, each with the line it starts on."""
  with _open_text(path) as f:
    data = f.read()
  try:
    text = data.decode("utf-8").lstrip("\ufeff")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise data_error(path, line, f"not valid UTF-8 ({e.reason})") from None
  decoder = json.JSONDecoder()
  ws = re.compile(r"\s*")
  pos = ws.match(text, 0).end() + 1  # past "["
  line_of = lambda p: text.count("\n", 0, p) + 1
  pos = ws.match(text, pos).end()
  if text.startswith("]", pos):
    return
  while True:
    try:
      value, end = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise data_error(path, e.lineno, f"malformed JSON in array element: {e.msg} "
                       f"(column {e.colno})") from None
    line = line_of(pos)
    if not isinstance(value, dict):
      raise data_error(path, line, f"array element must be a JSON object, got "
                       f"{_type_name(value)}")
    yield line, value
    pos = ws.match(text, end).end()
    if text.startswith(",", pos):
      pos = ws.match(text, pos + 1).end()
    elif text.startswith("]", pos):
      rest = text[pos + 1:]
      if rest.strip():
        raise data_error(path, line_of(pos + 1 + len(rest) - len(rest.lstrip())),
                         "unexpected text after the closing ']' of the JSON array")
      return
    else:
      raise data_error(path, line_of(pos), "malformed JSON array: expected ',' or ']' "
                       "after an element")


def _jsonl_records(path: str) -> Iterator[tuple[int, dict]]:
  with _open_text(path) as f:
    for line, raw in enumerate(f, start=1):
      text = _decode_line(raw, path, line)
      if line == 1:
        text = text.lstrip("\ufeff")
      if not text.strip():
        continue
      try:
        value = json.loads(text)
      except json.JSONDecodeError as e:
        raise data_error(path, line, f"malformed JSON: {e.msg} (column {e.colno}); each "
                         f"line must be one complete JSON object") from None
      if not isinstance(value, dict):
        raise data_error(path, line, f"expected a JSON object, got {_type_name(value)}")
      yield line, value


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
  """Yields `(line_number, record)` for each record of a JSON Lines file.

  Line numbers are 1-based and count blank lines, so they are what an editor
  shows. Also reads a file holding one JSON array of objects (line = where the
  element starts), which is what `.json` often means outside the HF world, and
  gzip-compressed files (`.gz`). HF `Dataset.to_json` writes JSON Lines even
  under a `.json` name, so the format is chosen from the first character
  (`[` = array), not from the extension.

  Raises `DataError` for a missing file, malformed JSON, a record that is not
  an object, and a file with no records at all (an empty input is almost
  always a wrong path or a failed download, never a valid dataset).
  """
  path = os.fspath(path)
  _check_readable(path)
  records = _array_records(path) if _first_char(path) == "[" else _jsonl_records(path)
  count = 0
  for item in records:
    count += 1
    yield item
  if count == 0:
    raise DataError(f"{path}: no records (the file is empty or holds only blank lines)")


# ----------------------------------------------------------------------------
# Writing whole files atomically.


def _fsync_dir(directory: str) -> None:
  """Makes a rename durable; a no-op where directories cannot be opened (Windows)."""
  with contextlib.suppress(OSError):
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _read_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


# Read once, at import: os.umask can only be read by setting it, which would race
# with files other threads create (orbax's async saves, TensorBoard, the server).
_UMASK = _read_umask()


def default_file_mode() -> int:
  """The mode `open()` gives a new file under the umask (0644 under umask 022)."""
  return 0o666 & ~_UMASK


def read_json(path: str | os.PathLike) -> Any:
  """One JSON document; a file that is not JSON is a DataError naming it."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise DataError(f"{path}: not valid JSON ({e})") from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes bytes so that `path` appears complete or not at all."""
  with _atomic_file(os.fspath(path), binary=True) as f:
    f.write(data)


@contextlib.contextmanager
def _atomic_file(path: str, binary: bool = False) -> Iterator[IO]:
  """A file that appears at `path` complete, or not at all."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
  try:
    with (os.fdopen(fd, "wb") if binary else
          os.fdopen(fd, "w", encoding="utf-8", newline="\n")) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, default_file_mode())   # mkstemp's 0600 -> what open() would have given
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  _fsync_dir(directory)


def dumps_line(record: Mapping[str, Any]) -> str:
  """One JSON Lines line (no newline); non-ASCII kept readable, as HF's `to_json` does."""
  return json.dumps(record, ensure_ascii=False)


def atomic_write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
  """Writes records as JSON Lines through a temp file + fsync + rename; returns the count."""
  path = os.fspath(path)
  count = 0
  with _atomic_file(path) as f:
    for record in records:
      f.write(dumps_line(record) + "\n")
      count += 1
  return count


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes one JSON document (indented, for people to read) atomically."""
  path = os.fspath(path)
  with _atomic_file(path) as f:
    json.dump(obj, f, ensure_ascii=False, indent=2)
    f.write("\n")


# ----------------------------------------------------------------------------
# Incremental, resumable output.


def _valid_key(key: Any) -> bool:
  return isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool))


class ResumableWriter:
  """Crash-safe incremental JSON Lines output for long generation stages.

  Protocol (what makes "killed and restarted" equal "never interrupted"):

  1. Records are appended to `path + ".partial"`, one line per `write`, each
     line written with a single `write` call and flushed; every
     `fsync_every` records (and at `finalize`) the file is fsynced.
  2. On open, an existing partial file is read back. A kill can only have
     cut the *last* line short (appends never rewrite earlier bytes), so a
     trailing line without its newline is truncated away; any other
     malformed line is real corruption and raises `DataError` (delete the
     partial file to start over).
  3. `done_keys` then holds `record[key_field]` of every record already
     written; the caller skips those inputs and writes only the rest. A key
     written twice is refused, so the output never holds duplicates, and
     since only whole lines survive and every unwritten key is redone, it
     has no gaps.
  4. `finalize()` fsyncs and renames the partial file to `path` in one
     atomic step: readers see either no `path` or the complete file. The
     fingerprint goes with it (`path + ".meta.json"`).
  5. A published file whose fingerprint matches, with no partial file beside
     it, is taken back as the partial file and resumed: a stage killed after
     publishing it (before its manifest), or rerun with only settings that
     derive other files from it changed, regenerates nothing.

  `fingerprint` (e.g. `config_fingerprint(config)`) is stored next to the
  partial file (`path + ".partial.meta.json"`); a partial file left by a run
  with a different fingerprint (or key field) is discarded instead of resumed
  (`fingerprint=None` skips the check), so changing the config never mixes
  old and new records (`discarded_stale` tells the caller it happened).
  `restart=True` discards any partial file and ignores a published one.
  Deciding that a finished stage can be skipped altogether is
  `manifest_matches`'s job. An advisory lock on the partial file stops two
  processes from appending to the same output.
  """

  def __init__(self, path: str | os.PathLike, key_field: str, *, fsync_every: int = 100,
               fingerprint: str | None = None, restart: bool = False):
    if fsync_every < 1:
      raise ValueError(f"fsync_every must be >= 1, got {fsync_every}")
    self.path = os.fspath(path)
    self.partial_path = self.path + ".partial"
    self.meta_path = self.partial_path + ".meta.json"
    self.published_meta_path = self.path + ".meta.json"
    self.key_field = key_field
    self.fsync_every = fsync_every
    self.fingerprint = fingerprint
    self.discarded_stale = False
    self.dropped_incomplete_line = False
    self._records: list[dict] = []
    self._keys: set[Any] = set()
    self._unsynced = 0
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    self.reopened_published = (not restart and not os.path.exists(self.partial_path)
                               and os.path.exists(self.path)
                               and self._same_fingerprint(self.published_meta_path))
    if self.reopened_published:
      atomic_write_json(self.meta_path, {"key_field": key_field, "fingerprint": fingerprint})
      os.replace(self.path, self.partial_path)
    if (os.path.exists(self.partial_path) and not restart
        and not self._same_fingerprint(self.meta_path)):
      self.discarded_stale = True
    if restart or self.discarded_stale:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.partial_path)
    if not os.path.exists(self.partial_path):
      atomic_write_json(self.meta_path, {"key_field": key_field, "fingerprint": fingerprint})

    self._file = open(self.partial_path, "a+b")
    try:
      if fcntl is not None:
        try:
          fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
          raise DataError(f"{self.partial_path}: another process is writing this output; "
                          f"run one writer per output file") from None
      self._load_existing()
    except BaseException:
      self._file.close()
      raise

  def _same_fingerprint(self, meta_path: str) -> bool:
    try:
      with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    except (OSError, ValueError):
      # A partial without its meta file predates fingerprints or lost it: only
      # trust it when the caller did not ask for a fingerprint check. A published
      # file without one is never taken back.
      return self.fingerprint is None and meta_path == self.meta_path
    if meta.get("key_field") != self.key_field:
      return False
    return self.fingerprint is None or meta.get("fingerprint") == self.fingerprint

  def _load_existing(self) -> None:
    self._file.seek(0)
    data = self._file.read()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
      # A run killed mid-write: drop the incomplete tail so appends start on a line boundary.
      self._file.truncate(complete)
      self._file.flush()
      os.fsync(self._file.fileno())
      self.dropped_incomplete_line = True
    for line, raw in enumerate(io.BytesIO(data[:complete]), start=1):
      text = _decode_line(raw, self.partial_path, line)
      if not text.strip():
        continue
      try:
        record = json.loads(text)
      except json.JSONDecodeError as e:
        raise data_error(self.partial_path, line, f"corrupt record ({e.msg}); delete this "
                         f"partial file to regenerate the stage's output") from None
      if not isinstance(record, dict) or self.key_field not in record:
        raise data_error(self.partial_path, line, f"record has no field '{self.key_field}'; "
                         f"delete this partial file to regenerate the stage's output")
      key = record[self.key_field]
      if not _valid_key(key):
        raise data_error(self.partial_path, line, f"field '{self.key_field}' must be a string "
                         f"or an integer, got {_type_name(key)}")
      if key in self._keys:
        raise data_error(self.partial_path, line, f"duplicate {self.key_field} {key!r}; "
                         f"was the output written by two processes at once?")
      self._keys.add(key)
      self._records.append(record)
    self._file.seek(0, os.SEEK_END)

  @property
  def done_keys(self) -> frozenset:
    """Keys already in the output: skip these inputs on a restarted run."""
    return frozenset(self._keys)

  def __contains__(self, key: Any) -> bool:
    return key in self._keys

  def __len__(self) -> int:
    return len(self._records)

  def records(self) -> list[dict]:
    """Every record written so far (resumed ones first), in file order."""
    return list(self._records)

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends one record; its key must be new."""
    if self._file.closed:
      raise ValueError(f"{self.partial_path}: writer is closed")
    if self.key_field not in record:
      raise ValueError(f"record for {self.path} has no key field '{self.key_field}'")
    key = record[self.key_field]
    if not _valid_key(key):
      # Only these survive the JSON round trip as the same hashable value on resume.
      raise ValueError(f"key field '{self.key_field}' must be a string or an integer, got "
                       f"{type(key).__name__}")
    if key in self._keys:
      raise ValueError(f"{self.path}: {self.key_field} {key!r} already written; skip "
                       f"inputs whose key is in done_keys")
    line = (dumps_line(record) + "\n").encode("utf-8")
    self._file.write(line)
    self._file.flush()
    self._unsynced += 1
    if self._unsynced >= self.fsync_every:
      os.fsync(self._file.fileno())
      self._unsynced = 0
    self._keys.add(key)
    self._records.append(dict(record))

  def close(self) -> None:
    """Flushes and closes without publishing; the partial file stays for a resume."""
    if not self._file.closed:
      self._file.flush()
      os.fsync(self._file.fileno())
      self._file.close()

  def finalize(self) -> str:
    """Publishes the complete output at `path` atomically and removes the partial file."""
    if self._file.closed:
      raise ValueError(f"{self.partial_path}: writer is closed; finalize before close")
    self._file.flush()
    os.fsync(self._file.fileno())
    # The fingerprint first, so a published file always has it beside it.
    atomic_write_json(self.published_meta_path, {"key_field": self.key_field,
                                                 "fingerprint": self.fingerprint})
    # Rename while still holding the lock, so no second writer can slip in between.
    os.replace(self.partial_path, self.path)
    self._file.close()
    _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
    with contextlib.suppress(FileNotFoundError):
      os.unlink(self.meta_path)
    return self.path

  def __enter__(self) -> "ResumableWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    # Never finalize implicitly: leaving the block early must not publish a partial output.
    self.close()


# ----------------------------------------------------------------------------
# Manifests.


def is_hub_name(source: str) -> bool:
  """True for `owner/name` strings that are not local paths (a Hugging Face dataset id)."""
  return (not os.path.exists(source)
          and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None
          and not re.search(r"\.(jsonl?|gz|txt|csv|parquet)$", source))


def file_sha256(path: str | os.PathLike) -> str:
  """Hex SHA-256 of a file's bytes; for a directory, of its files' relative paths and hashes."""
  path = os.fspath(path)
  if os.path.isdir(path):
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
      dirs.sort()
      for name in sorted(files):
        full = os.path.join(root, name)
        rel = os.path.relpath(full, path).replace(os.sep, "/")
        digest.update(f"{rel}\0{file_sha256(full)}\n".encode())
    return digest.hexdigest()
  if not os.path.exists(path):
    raise DataError(f"{path}: file does not exist (cannot hash a missing input)")
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def plain_config(config: Any) -> Any:
  """A config as plain JSON data, so it can be saved and compared across runs."""
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
    config = config.to_dict()
  elif dataclasses.is_dataclass(config) and not isinstance(config, type):
    config = dataclasses.asdict(config)
  return json.loads(json.dumps(config, sort_keys=True, default=_json_default))


def _json_default(value: Any) -> Any:
  """NumPy scalars/arrays as numbers/lists (counts are often NumPy); anything else as text."""
  if hasattr(value, "tolist"):
    return value.tolist()
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return dataclasses.asdict(value)
  return str(value)


def config_fingerprint(config: Any) -> str:
  """A short stable hash of a config (e.g. `ResumableWriter`'s `fingerprint`)."""
  text = json.dumps(plain_config(config), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def input_entry(source: str | os.PathLike) -> dict:
  source = os.fspath(source)
  if is_hub_name(source):
    # A hub dataset has no local bytes to hash; its name stands for its content.
    return {"path": source, "sha256": None, "hub": True}
  return {"path": os.path.abspath(source), "sha256": file_sha256(source)}


def _git_commit() -> str | None:
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    result = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True,
                            text=True, timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  commit = result.stdout.strip()
  return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def code_version() -> dict:
  """The package version plus the git commit of the checkout, when it is one."""
  from cai_jax import __version__  # pylint: disable=import-outside-toplevel
  return {"cai_jax": __version__, "git_commit": _git_commit()}


def write_manifest(out_dir: str | os.PathLike, *, stage: str, config: Any,
                   inputs: Mapping[str, str | os.PathLike], counts: Mapping[str, Any],
                   seed: int | None, extra: Mapping[str, Any] | None = None) -> str:
  """Writes `out_dir/manifest.json` atomically and returns its path.

  Write it last, after the stage's outputs are published: `complete: true`
  in a manifest then means the directory holds a finished result, which is
  what lets the pipeline skip the stage on the next run.
  """
  out_dir = os.fspath(out_dir)
  manifest = {
      "stage": stage,
      "complete": True,
      "config": plain_config(config),
      "inputs": {name: input_entry(src) for name, src in inputs.items()},
      "counts": plain_config(dict(counts)),
      "seed": seed,
      "code_version": code_version(),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  if extra:
    manifest["extra"] = plain_config(dict(extra))
  path = os.path.join(out_dir, MANIFEST_NAME)
  atomic_write_json(path, manifest)
  return path


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
  """The manifest in `out_dir`, or None where there is none or it cannot be read."""
  try:
    with open(os.path.join(os.fspath(out_dir), MANIFEST_NAME), encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return None
  return manifest if isinstance(manifest, dict) else None


def manifest_matches(out_dir: str | os.PathLike, *, config: Any,
                     inputs: Mapping[str, str | os.PathLike]) -> bool:
  """True when `out_dir` holds a complete result of this config on these exact inputs.

  Inputs are compared by content hash, not path or mtime, so a moved
  workdir still matches and an edited input file does not. The code version
  is recorded but not compared: a code change alone does not invalidate
  data (delete the directory to force a rerun).
  """
  manifest = read_manifest(out_dir)
  if manifest is None or manifest.get("complete") is not True:
    return False
  if manifest.get("config") != plain_config(config):
    return False
  recorded = manifest.get("inputs")
  if not isinstance(recorded, dict) or set(recorded) != set(inputs):
    return False
  for name, source in inputs.items():
    entry = recorded[name]
    try:
      current = input_entry(source)
    except DataError:
      return False
    if not isinstance(entry, dict) or entry.get("sha256") != current["sha256"]:
      return False
    if current.get("hub") and entry.get("path") != current["path"]:
      return False
  return True
