"""The run store: sweep points kept in an embedded SQLite file, each committed the moment it is done.

Runs are keyed by fingerprints of model, data and config, points by (group, sparsity), so a re-run
finds its stored curve and a killed sweep resumes; WAL mode lets a dashboard and a CLI share the file.
A store the user cannot write (a read-only folder or file, `read_only=True`) is opened for reading only.

    >>> store.open_run(rid, "resnet18", model_fp, data_fp, {"criterion": "l1"}, expected=40)
    >>> store.add_point(rid, {"group": "layer1.0.conv1", "sparsity": 0.5, "accuracy": 0.71})
    >>> store.done(rid)
    {('layer1.0.conv1', 0.5)}
"""

import hashlib
import json
import os
import sqlite3
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import pandas as pd
import torch
from torch import nn

from prunecore.errors import UserError
from prunecore.files import write_atomic

__all__ = [
    "DataHasher", "RunInfo", "RunStore", "StoreError", "default_store_path", "fingerprint_data", "fingerprint_model",
    "run_id",
]  # fmt: skip

SCHEMA_VERSION = 3  # 2: the predictors table, 3: the latency table (an older store gains them when opened to write)
_DIGITS = 6  # sparsity is a key: rounded so that 0.1 + 0.2 and 0.3 name the same point
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, model_name TEXT, model_fp TEXT, data_fp TEXT,"
    " config TEXT, created TEXT, expected INTEGER, complete INTEGER)",
    "CREATE TABLE IF NOT EXISTS points (run_id TEXT, grp TEXT, sparsity REAL, data TEXT, seq INTEGER,"
    " PRIMARY KEY (run_id, grp, sparsity))",
    "CREATE TABLE IF NOT EXISTS predictors (run_id TEXT PRIMARY KEY, predictor TEXT, created TEXT)",
    "CREATE TABLE IF NOT EXISTS latency (key TEXT PRIMARY KEY, data TEXT, created TEXT)",
)


class StoreError(UserError, RuntimeError):
    """The run store cannot do what was asked; the message names the run or the file and a way out."""


def default_store_path() -> Path:
    """$PRUNECORE_STORE, else $XDG_CACHE_HOME/prunecore/runs.sqlite, else ~/.cache/prunecore/runs.sqlite."""
    if os.environ.get("PRUNECORE_STORE"):
        return Path(os.environ["PRUNECORE_STORE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    cache = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # XDG: relative is invalid
    return cache / "prunecore" / "runs.sqlite"


def _feed(h: Any, *parts: str | torch.Tensor) -> None:
    """Length-prefix every part (a tensor: dtype, shape, raw bytes) so no two different inputs hash alike."""
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            _feed(h, str(t.dtype), str(tuple(t.shape)))
            raw = memoryview(t.reshape(-1).view(torch.uint8).numpy())  # zero-copy; bf16 and bool too
        else:
            raw = memoryview(part.encode())
        h.update(raw.nbytes.to_bytes(8, "little"))
        h.update(raw)


def fingerprint_model(model: nn.Module) -> str:
    """Hash of the class, the architecture (str) and every state_dict entry, so any weight edit is seen."""
    h = hashlib.sha256()
    _feed(h, f"{type(model).__module__}.{type(model).__qualname__}", str(model))
    for name, value in model.state_dict().items():
        _feed(h, name, value if isinstance(value, torch.Tensor) else repr(value))  # repr: extra_state objects
    return h.hexdigest()


def fingerprint_data(data: Iterable) -> str:
    """Hash of all tensors of all batches (x, (x,) or (x, y)); one pass, so shuffling changes it."""
    hasher = DataHasher()
    for batch in data:
        hasher.add(batch)
    return hasher.hexdigest()


class DataHasher:
    """`fingerprint_data` one batch at a time, so the pass that evaluates the data can also fingerprint it."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._batches = 0

    def add(self, batch: Any) -> None:
        parts = batch if isinstance(batch, (tuple, list)) else (batch,)
        if not all(isinstance(part, torch.Tensor) for part in parts):
            raise TypeError(f"fingerprint_data: batch {self._batches} must be a tensor or a tuple of tensors")
        _feed(self._h, f"batch {self._batches} of {len(parts)}", *parts)
        self._batches += 1

    def hashing(self, data: Iterable) -> Iterator[Any]:
        """The batches of `data`, each added to the hash as it passes."""
        for batch in data:
            self.add(batch)
            yield batch

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def run_id(model_fp: str, data_fp: str, config: Mapping[str, Any]) -> str:
    """16 hex digits naming a sweep: the same model, data and config always find the same run."""
    h = hashlib.sha256()
    _feed(h, model_fp, data_fp, json.dumps(dict(config), sort_keys=True, separators=(",", ":")))
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class RunInfo:
    """One stored sweep; `points` counts stored points, `expected` how many the sweep will make."""

    run_id: str
    model_name: str
    model_fp: str
    data_fp: str
    config: dict
    created: str
    points: int
    expected: int
    complete: bool


def _unwritable(path: Path) -> str:
    """Why the store at `path` can only be read ("" when it can be written): the file or its folder."""
    if path.exists() and not os.access(path, os.W_OK):
        return "the file is not writable"
    if path.exists() and not os.access(path.parent, os.W_OK):  # WAL needs its -wal and -shm files beside it
        return f"its folder {path.parent} is not writable"
    if not path.exists():
        folder = next((p for p in path.parents if p.exists()), None)
        if folder is not None and folder.is_dir() and not os.access(folder, os.W_OK):
            return f"the folder {folder} is not writable"
    return ""


def _plain(value: Any) -> Any:  # numpy and torch scalars or arrays, as metrics often come
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"run store: a point cannot hold a {type(value).__name__}")


class RunStore:
    """Sweep runs and their points in one SQLite file; safe across threads and processes.

    `read_only=True` never writes the file (nor its folder); a store whose file or folder the user
    cannot write is opened that way by itself. Writing to a read-only store is a `StoreError`.
    """

    def __init__(self, path: str | Path | None = None, read_only: bool = False) -> None:
        self.path = Path(path).expanduser() if path is not None else default_store_path()
        self._lock = threading.Lock()  # one connection, so one operation at a time per instance
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._read_only = "it was opened with read_only=True" if read_only else _unwritable(self.path)
        if self._read_only and not self.path.is_file():
            raise StoreError(f"run store {self.path} does not exist, and it cannot be created: {self._read_only}")
        if not self._read_only:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"run store {self.path} cannot be created: {e.strerror or e}; "
                                 "pick another with PRUNECORE_STORE or store=") from None  # fmt: skip
        with self._op(write=not self._read_only) as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"run store {self.path} has schema version {version}, newer than this prunecore "
                                 f"reads ({SCHEMA_VERSION}); upgrade, or pick another with PRUNECORE_STORE or store=")
            if version == 0 and self._read_only:
                raise StoreError(f"run store {self.path} holds no runs yet (schema version {version}) and is "
                                 f"read-only: {self._read_only}")  # fmt: skip
            if version < SCHEMA_VERSION and not self._read_only:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @property
    def read_only(self) -> bool:
        """Whether this store only reads (asked for, or the file or its folder is not writable)."""
        return bool(self._read_only)

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # a connection must never cross a fork
            conn = self._connect_read_only() if self._read_only else self._connect_read_write()
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _connect_read_write(self) -> sqlite3.Connection:
        # timeout=30 is busy_timeout: wait up to 30 s for another writer instead of failing
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode = WAL")  # kept in the file: readers never block the writer
        conn.execute("PRAGMA synchronous = NORMAL")  # in WAL a commit survives kill -9, not power loss
        return conn

    def _connect_read_only(self) -> sqlite3.Connection:
        """`mode=ro`; where that cannot open a WAL store (no -shm file, and none can be made in a
        read-only folder) the file is read as an immutable snapshot: no writer has it open then."""
        uri = self.path.resolve().as_uri() + "?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError:  # SQLITE_READONLY_DIRECTORY, SQLITE_CANTOPEN
            conn.close()
        return sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None, check_same_thread=False)

    def _refuse_write(self, why: str) -> StoreError:
        return StoreError(f"run store {self.path} is read-only ({why}), so nothing can be written to it; "
                          "pick a writable one with PRUNECORE_STORE or store=")  # fmt: skip

    @contextmanager
    def _op(self, write: bool = False, run: str | None = None) -> Iterator[sqlite3.Connection]:
        """One transaction (on a known `run`); sqlite3 errors become StoreError naming the file."""
        if write and self._read_only:
            raise self._refuse_write(self._read_only)
        with self._lock:
            try:
                conn = self._connect()  # writes lock up front: a read upgraded to a write would skip busy_timeout
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")
                try:
                    if run is not None and not conn.execute("SELECT 1 FROM runs WHERE run_id = ?", (run,)).fetchone():
                        known = [r[0] for r in conn.execute("SELECT run_id FROM runs ORDER BY created DESC LIMIT 6")]
                        hint = f"known: {', '.join(known[:5])}{', ...' * (len(known) > 5)}" if known else "it is empty"
                        raise StoreError(f"unknown run id {run!r} in run store {self.path}; {hint}")
                    yield conn
                    conn.execute("COMMIT")
                finally:
                    if conn.in_transaction:  # an error, or a failed COMMIT: leave the connection clean
                        conn.execute("ROLLBACK")
            except sqlite3.DatabaseError as e:
                if write and getattr(e, "sqlite_errorname", "").startswith("SQLITE_READONLY"):
                    raise self._refuse_write(f"SQLite says: {e}") from e  # e.g. permissions changed since opening
                bad = any(word in str(e) for word in ("not a database", "malformed"))
                hint = " (not a readable SQLite database: delete it, or pick another with PRUNECORE_STORE or store=)"
                raise StoreError(f"run store {self.path}: {e}{hint if bad else ''}") from e

    def close(self) -> None:
        """Release the file (tests, long-lived apps); the store reconnects if used again."""
        with self._lock:
            if self._conn is not None:
                self._conn, conn = None, self._conn
                conn.close()

    def open_run(
        self, run_id: str, model_name: str, model_fp: str, data_fp: str, config: Mapping[str, Any], expected: int
    ) -> None:
        """Create the run if absent; an existing run (a resumed sweep) is left as it is.

        A `config` whose "groups" is an empty list is refused: such a sweep measures nothing.
        """
        groups = config.get("groups")
        if isinstance(groups, (list, tuple)) and not groups:
            raise StoreError(f"run {run_id!r} sweeps no groups (its group list is empty); name at least one group, "
                             "or give none to sweep every prunable group")  # fmt: skip
        created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        values = (run_id, model_name, model_fp, data_fp, json.dumps(dict(config), sort_keys=True), created, expected)
        with self._op(write=True) as conn:
            conn.execute("INSERT OR IGNORE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, 0)", values)

    def done(self, run_id: str) -> set[tuple[str, float]]:
        """The (group, sparsity) keys already stored: what a resumed sweep skips."""
        with self._op(run=run_id) as conn:
            rows = conn.execute("SELECT grp, sparsity FROM points WHERE run_id = ?", (run_id,)).fetchall()
        out = set()
        for grp, sparsity in rows:
            if not isinstance(grp, str) or isinstance(sparsity, (str, bytes)) or sparsity is None:
                raise self._corrupt(run_id, f"point key ({grp!r}, {sparsity!r})", "not a (group, sparsity) pair")
            out.add((grp, round(sparsity, _DIGITS)))
        return out

    def add_point(self, run_id: str, row: Mapping[str, Any]) -> None:
        """Store one point, committed at once; re-adding a key replaces its values but keeps its place."""
        if "group" not in row or "sparsity" not in row:
            raise ValueError(f"a point needs 'group' and 'sparsity', got columns {list(row)}")
        grp, sparsity = str(row["group"]), round(float(row["sparsity"]), _DIGITS)
        data = json.dumps({**row, "group": grp, "sparsity": sparsity}, default=_plain)
        with self._op(write=True, run=run_id) as conn:
            conn.execute(
                "INSERT INTO points SELECT ?, ?, ?, ?, COALESCE(MAX(seq), 0) + 1 FROM points WHERE run_id = ?1"
                " ON CONFLICT (run_id, grp, sparsity) DO UPDATE SET data = excluded.data",
                (run_id, grp, sparsity, data),
            )

    def points(self, run_id: str) -> pd.DataFrame:
        """The stored points in insertion order; columns in first-seen order after 'group' and 'sparsity'.

        `frame.attrs` carries the run's id, model name and sweep config (criterion, levels, ...),
        which `allocate` reads to stay consistent with how the curves were measured.
        """
        with self._op(run=run_id) as conn:
            found = conn.execute("SELECT grp, sparsity, data FROM points WHERE run_id = ? ORDER BY seq",
                                 (run_id,)).fetchall()  # fmt: skip
            info = self._infos(conn, run_id)[0]
        rows = [self._decode(run_id, f"point ({grp!r}, {sparsity!r})", data, dict) for grp, sparsity, data in found]
        columns = list(dict.fromkeys(["group", "sparsity", *(k for r in rows for k in r)]))
        frame = pd.DataFrame(rows, columns=columns)
        frame.attrs.update(run_id=run_id, model_name=info.model_name, config=info.config)
        return frame

    def mark_complete(self, run_id: str) -> None:
        """Flag a sweep as finished, so the dashboard can tell it from one that was interrupted."""
        with self._op(write=True, run=run_id) as conn:
            conn.execute("UPDATE runs SET complete = 1 WHERE run_id = ?", (run_id,))

    def _infos(self, conn: sqlite3.Connection, run_id: str | None = None) -> list[RunInfo]:
        rows = conn.execute(
            "SELECT run_id, model_name, model_fp, data_fp, config, created, (SELECT COUNT(*) FROM points p"
            " WHERE p.run_id = r.run_id), expected, complete FROM runs r WHERE ?1 IS NULL OR run_id = ?1"
            " ORDER BY created DESC, rowid DESC", (run_id,)
        ).fetchall()
        return [RunInfo(*r[:4], self._decode(r[0], "config", r[4], dict), r[5], r[6], r[7], bool(r[8])) for r in rows]

    def _decode(self, run_id: str, what: str, text: Any, kind: type) -> Any:
        """A JSON column of one row, or a StoreError naming the store, the run and the row."""
        try:
            value = json.loads(text)
        except (TypeError, ValueError) as e:  # not text, or not JSON
            raise self._corrupt(run_id, what, f"not JSON: {e}") from None
        if not isinstance(value, kind):
            raise self._corrupt(run_id, what, f"a JSON {type(value).__name__}, not a {kind.__name__}")
        return value

    def _corrupt(self, run_id: str, what: str, why: str) -> StoreError:
        return StoreError(f"run store {self.path}: run {run_id!r} has a corrupt {what}: {why}; delete the run "
                          f"(prunecore runs --store {self.path} --delete {run_id}) or the store")  # fmt: skip

    def runs(self) -> list[RunInfo]:
        """Every stored run, newest first."""
        with self._op() as conn:
            return self._infos(conn)

    def get(self, run_id: str) -> RunInfo:
        """The run's summary; StoreError naming a few known ids if there is none."""
        with self._op(run=run_id) as conn:
            return self._infos(conn, run_id)[0]

    def delete(self, run_id: str) -> None:
        """Remove the run, all its points and its predictor in one transaction."""
        with self._op(write=True, run=run_id) as conn:
            conn.execute("DELETE FROM points WHERE run_id = ?", (run_id,))
            if self._has_predictors(conn):
                conn.execute("DELETE FROM predictors WHERE run_id = ?", (run_id,))
            conn.execute("DELETE FROM runs WHERE run_id = ?", (run_id,))

    def put_predictor(self, run_id: str, predictor: Mapping[str, Any]) -> None:
        """Keep the run's fitted predictor (`prunecore.predict.Predictor.to_dict()`), replacing an older one."""
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        text = json.dumps(dict(predictor), sort_keys=True, allow_nan=False)
        with self._op(write=True, run=run_id) as conn:
            conn.execute("INSERT OR REPLACE INTO predictors VALUES (?, ?, ?)", (run_id, text, created))

    def get_predictor(self, run_id: str) -> dict[str, Any] | None:
        """The run's predictor as `put_predictor` kept it; None when the run has none."""
        with self._op(run=run_id) as conn:
            if not self._has_predictors(conn):  # a version-1 store, opened read-only
                return None
            row = conn.execute("SELECT predictor FROM predictors WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else self._decode(run_id, "predictor", row[0], dict)

    @staticmethod
    def _has_predictors(conn: sqlite3.Connection) -> bool:
        return RunStore._has_table(conn, "predictors")

    @staticmethod
    def _has_table(conn: sqlite3.Connection, name: str) -> bool:
        found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone()
        return found is not None

    def put_latency(self, key: str, entry: Mapping[str, Any]) -> None:
        """Keep a latency measurement (a layer's table, a model's calibration: `prunecore.latency`) under
        `key`, which names the machine, the runtime and the shapes it was measured for."""
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        text = json.dumps(dict(entry), sort_keys=True, allow_nan=False)
        with self._op(write=True) as conn:
            conn.execute("INSERT OR REPLACE INTO latency VALUES (?, ?, ?)", (key, text, created))

    def get_latency(self, key: str) -> dict[str, Any] | None:
        """The entry `put_latency` kept under `key`; None when there is none (or it is not readable JSON,
        so it is measured again)."""
        with self._op() as conn:
            if not self._has_table(conn, "latency"):  # an older store, opened read-only
                return None
            row = conn.execute("SELECT data FROM latency WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        try:
            entry = json.loads(row[0])
        except ValueError:
            return None
        return entry if isinstance(entry, dict) else None

    def export(self, run_id: str, path: str | Path) -> Path:
        """Write the points as .csv or .parquet (chosen by suffix), atomically, and return the path.

        The file appears whole or not at all: a full disk leaves no partial file and whatever was
        there untouched (`OutputPathError`, as for a folder or a path under a file).
        """
        path = Path(path)
        writer = {".csv": pd.DataFrame.to_csv, ".parquet": pd.DataFrame.to_parquet}.get(path.suffix.lower())
        if writer is None:
            raise StoreError(f"cannot export to {path.name!r}: supported formats are .csv and .parquet")
        frame = self.points(run_id)  # before mkdir: an unknown run leaves no folder behind
        content = writer(frame, None, index=False)  # no path: the text or bytes the file will hold
        return write_atomic(path, content, what="export file")
