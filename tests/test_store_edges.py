"""Run store edge cases: read-only stores read, corrupt rows named, atomic export, empty group lists refused."""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import prunecore.files
from prunecore.errors import UserError
from prunecore.files import OutputPathError
from prunecore.sensitivity import sweep
from prunecore.store import RunStore, StoreError

CONFIG = {"criterion": "l1", "levels": [0.5], "groups": ["conv1", "fc"]}
ROWS = [
    {"group": "conv1", "sparsity": 0.5, "accuracy": 0.8},
    {"group": "fc", "sparsity": 0.5, "accuracy": 0.7, "loss": 0.3},
]


def filled_store(path: Path) -> None:
    """A store at `path` holding run 'r1' with ROWS, closed (no -wal or -shm file left)."""
    store = RunStore(path)
    store.open_run("r1", "tiny", "m" * 64, "d" * 64, CONFIG, 3)
    for row in ROWS:
        store.add_point("r1", row)
    store.close()


WRITES = {
    "open_run": lambda s: s.open_run("r2", "tiny", "m", "d", CONFIG, 1),
    "add_point": lambda s: s.add_point("r1", {"group": "conv1", "sparsity": 0.25, "accuracy": 0.9}),
    "mark_complete": lambda s: s.mark_complete("r1"),
    "delete": lambda s: s.delete("r1"),
}


# --- read-only stores ---------------------------------------------------------------------------


def test_a_read_only_store_reads_everything_and_writes_nothing(tmp_path):
    path = tmp_path / "runs.sqlite"
    filled_store(path)
    before = path.read_bytes()
    store = RunStore(path, read_only=True)
    assert store.read_only
    assert [r.run_id for r in store.runs()] == ["r1"] and store.get("r1").points == 2
    assert store.done("r1") == {("conv1", 0.5), ("fc", 0.5)}
    expected = pd.DataFrame(ROWS, columns=["group", "sparsity", "accuracy", "loss"])
    pd.testing.assert_frame_equal(store.points("r1"), expected)
    for name, write in WRITES.items():
        with pytest.raises(StoreError, match=rf"run store {path} is read-only \(it was opened with read_only=True\)"):
            write(store)
    store.close()
    assert path.read_bytes() == before, "a read-only store changed the file"
    assert [r.run_id for r in RunStore(path).runs()] == ["r1"]  # and a writer still finds it whole


@pytest.mark.parametrize(
    "unwritable, reason, write",
    [
        ("folder", "its folder {folder} is not writable", lambda store: store.add_point("r1", ROWS[0])),
        ("file", "the file is not writable", lambda store: store.open_run("r3", "tiny", "m", "d", CONFIG, 1)),
    ],
)
def test_an_unwritable_folder_or_file_opens_the_store_read_only(tmp_path, monkeypatch, unwritable, reason, write):
    """As root the permission bits stop nothing, so os.access answers as it would for another user."""
    path = tmp_path / "runs.sqlite"
    filled_store(path)
    denied = tmp_path if unwritable == "folder" else path
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == denied else real_access(p, mode))
    store = RunStore(path)
    assert store.read_only and store.done("r1") == {("conv1", 0.5), ("fc", 0.5)} and len(store.points("r1")) == 2
    with pytest.raises(StoreError, match=rf"run store {path} is read-only \({reason.format(folder=tmp_path)}\)"):
        write(store)
    store.close()


def test_a_missing_store_in_an_unwritable_folder_is_a_store_error(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(StoreError, match=rf"run store {tmp_path / 'runs.sqlite'} does not exist, and it cannot be"):
        RunStore(tmp_path / "runs.sqlite")
    assert not (tmp_path / "runs.sqlite").exists()
    with pytest.raises(StoreError, match="does not exist"):
        RunStore(tmp_path / "other.sqlite", read_only=True)


def test_sqlite_refusing_a_write_says_the_store_is_read_only(tmp_path, monkeypatch):
    """A store that became read-only after it was opened (permissions changed, a read-only remount)."""
    path = tmp_path / "runs.sqlite"
    filled_store(path)
    store = RunStore(path)
    conn = store._connect()
    conn.execute("PRAGMA query_only = 1")  # SQLITE_READONLY on every write, like a read-only file
    with pytest.raises(StoreError, match=rf"run store {path} is read-only \(SQLite says: attempt to write"):
        store.add_point("r1", ROWS[0])
    store.close()


READER = """
import json, os, sys
from prunecore.store import RunStore, StoreError

def read(path):
    store = RunStore(path)
    out = {"read_only": store.read_only, "runs": [r.run_id for r in store.runs()], "points": len(store.points("r1")),
           "done": sorted(map(list, store.done("r1")))}
    try:
        store.open_run("r2", "tiny", "m", "d", {}, 1)
    except StoreError as e:
        out["write"] = str(e)
    return out

path, warm_up, user = sys.argv[1], sys.argv[2], int(sys.argv[3])
read(warm_up)  # a writable copy: loads every module while the interpreter's own files can still be read
if user:
    os.setgroups([]), os.setgid(user), os.setuid(user)  # for good: no capability left to override permissions
print(json.dumps(read(path)))
"""


@pytest.fixture
def read_only_folder(tmp_path):
    """(a folder the reader cannot write, the reader's uid or 0): chmod 0o555, and when root, read as nobody."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        yield folder, 0
        folder.chmod(0o755)
        return
    base = Path(tempfile.mkdtemp(prefix="prunecore-ro-"))  # pytest's tmp_path is closed to other users
    base.chmod(0o755)
    (base / "ro").mkdir()
    yield base / "ro", 65534
    shutil.rmtree(base)


def test_a_store_in_a_really_read_only_folder_is_readable(read_only_folder, tmp_path):
    """Real permissions: no -shm file can be made beside the WAL store, so SQLite's mode=ro alone fails."""
    folder, user = read_only_folder
    path = folder / "runs.sqlite"
    filled_store(path)
    shutil.copy(path, tmp_path / "warm.sqlite")
    path.chmod(0o644)
    folder.chmod(0o555)
    done = subprocess.run([sys.executable, "-c", READER, str(path), str(tmp_path / "warm.sqlite"), str(user)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if user and "PermissionError" in done.stderr and "setuid" in done.stderr:
        pytest.skip("this container forbids switching to another user")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["read_only"] and out["runs"] == ["r1"] and out["points"] == 2
    assert out["done"] == [["conv1", 0.5], ["fc", 0.5]]
    assert out["write"].startswith(f"run store {path} is read-only (") and "not writable" in out["write"]
    assert sorted(p.name for p in folder.iterdir()) == ["runs.sqlite"]


# --- corrupt rows -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "corruption, read, what",
    [
        ("UPDATE points SET data = '{not json' WHERE grp = 'fc'", "points", r"point \('fc', 0.5\): not JSON"),
        ("UPDATE points SET data = '[1, 2]' WHERE grp = 'fc'", "points", r"point \('fc', 0.5\): a JSON list, not"),
        ("UPDATE points SET data = NULL WHERE grp = 'fc'", "points", r"point \('fc', 0.5\): not JSON"),
        ("UPDATE points SET sparsity = 'half' WHERE grp = 'fc'", "done", r"point key \('fc', 'half'\)"),
        ("UPDATE runs SET config = 'oops'", "get", "config: not JSON"),
        ("UPDATE runs SET config = '3'", "runs", "config: a JSON int, not a dict"),
        ("UPDATE runs SET config = 'oops'", "points", "config: not JSON"),
    ],
)
def test_a_corrupt_row_names_the_store_and_the_run(tmp_path, corruption, read, what):
    path = tmp_path / "runs.sqlite"
    filled_store(path)
    with sqlite3.connect(path) as conn:
        conn.execute(corruption)
    conn.close()
    store = RunStore(path)
    call = {"points": store.points, "done": store.done, "get": store.get, "runs": lambda _: store.runs()}[read]
    with pytest.raises(StoreError, match=rf"^run store {path}: run 'r1' has a corrupt {what}") as info:
        call("r1")
    assert f"prunecore runs --store {path} --delete r1" in str(info.value)
    store.delete("r1")  # the way out the message names works
    assert store.runs() == []
    store.close()


# --- export -------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path):
    filled_store(tmp_path / "runs.sqlite")
    s = RunStore(tmp_path / "runs.sqlite")
    yield s
    s.close()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_that_fails_at_the_last_step_leaves_no_file(store, tmp_path, monkeypatch, suffix):
    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setattr(prunecore.files.os, "replace", full_disk)
    with pytest.raises(OutputPathError, match=rf"export file '{out / ('curves' + suffix)}' was not written \(the disk"):
        store.export("r1", out / f"curves{suffix}")
    assert list(out.iterdir()) == []  # neither the file nor a temporary one


def test_export_that_fails_keeps_the_previous_file(store, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "curves.csv"
    target.write_text("previous export\n")

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(prunecore.files.os, "fsync", failing_fsync)
    with pytest.raises(OutputPathError, match="was not written"):
        store.export("r1", target)
    assert target.read_text() == "previous export\n"
    assert [p.name for p in target.parent.iterdir()] == ["curves.csv"]  # no temporary file left
    monkeypatch.undo()
    store.export("r1", target)
    pd.testing.assert_frame_equal(pd.read_csv(target), store.points("r1"))


def test_export_to_a_folder_or_under_a_file_is_an_output_path_error(store, tmp_path):
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(OutputPathError, match="is a folder"):
        store.export("r1", tmp_path / "folder.csv")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="is a file"):
        store.export("r1", tmp_path / "file" / "curves.csv")


# --- empty group lists --------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [[], ()])
def test_a_run_with_an_empty_group_list_is_refused(store, groups):
    with pytest.raises(StoreError, match=r"run 'r9' sweeps no groups \(its group list is empty\)"):
        store.open_run("r9", "tiny", "m", "d", {**CONFIG, "groups": groups}, 1)
    assert [r.run_id for r in store.runs()] == ["r1"]
    store.open_run("r8", "tiny", "m", "d", {"criterion": "l1"}, 1)  # no group list at all is not an empty one


def test_a_sweep_of_no_groups_is_refused_and_stores_nothing(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 2, (4,))
    path = tmp_path / "runs.sqlite"
    with pytest.raises(UserError, match="group"):
        sweep(model, [(x, y)], x[:1], levels=[0.5], groups=[], store=path, progress=False)
    assert RunStore(path).runs() == []
