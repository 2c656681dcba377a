"""The run store: points round-trip, fingerprints key runs, and finished points survive restarts,
kills and concurrent writers in other processes."""

import sqlite3
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from prunecore.store import (
    RunStore,
    StoreError,
    default_store_path,
    fingerprint_data,
    fingerprint_model,
    run_id,
)

CONFIG = {"criterion": "l1", "levels": [0.25, 0.5], "metric": "accuracy"}
ROWS = [  # different metric columns per row, as sweeps of different metrics produce them
    {"group": "conv1", "sparsity": 0.25, "accuracy": 0.9, "params": 100},
    {"group": "conv1", "sparsity": 0.5, "accuracy": 0.8, "params": 50, "flops": 1000},
    {"group": "fc", "sparsity": 0.25, "loss": 0.3, "kept": 6},
]

# A sweep worker in a separate process: opens the shared run and its own, waits for the start signal
# so that the writers really overlap, then writes n points to each, reporting every committed one.
WRITER = """
import sys, time
from pathlib import Path
from prunecore.store import RunStore

path, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = RunStore(path)
store.open_run("shared", "tiny", "mfp", "dfp", {}, 0)
store.open_run(name, "tiny", "mfp", "dfp", {}, n)
Path(path + "." + name + ".ready").touch()
while not Path(path + ".go").exists():
    time.sleep(0.005)
for i in range(n):
    store.add_point("shared", {"group": name, "sparsity": i / n, "step": i})
    store.add_point(name, {"group": "g", "sparsity": i / n, "step": i})
    print(i, flush=True)
"""


@pytest.fixture
def store(tmp_path):
    s = RunStore(tmp_path / "runs.sqlite")
    yield s
    s.close()


def open_run(store: RunStore, rid: str = "r1", expected: int = 4) -> None:
    store.open_run(rid, "tiny", "m" * 64, "d" * 64, CONFIG, expected)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


@pytest.fixture
def start_writers():
    """Start WRITER processes and release them together; any left running are killed at teardown."""
    procs: list[subprocess.Popen] = []

    def start(path: Path, names: list[str], n: int) -> list[subprocess.Popen]:
        started = [
            subprocess.Popen([sys.executable, "-c", WRITER, str(path), name, str(n)], stdout=subprocess.PIPE, text=True)
            for name in names
        ]
        procs.extend(started)
        deadline = time.monotonic() + 120
        while not all(Path(f"{path}.{name}.ready").exists() for name in names):
            assert all(p.poll() is None for p in started), "a writer died before starting"
            assert time.monotonic() < deadline, "writers did not start"
            time.sleep(0.02)
        Path(f"{path}.go").touch()
        return started

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def store_steps(store: RunStore, rid: str) -> list[int]:
    return store.points(rid)["step"].tolist()


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


# --- round trip ---------------------------------------------------------------------------------


def test_points_round_trip_in_order_with_first_seen_columns(store):
    open_run(store)
    assert list(store.points("r1").columns) == ["group", "sparsity"] and store.points("r1").empty
    for row in ROWS:
        store.add_point("r1", row)
    frame = store.points("r1")
    assert list(frame.columns) == ["group", "sparsity", "accuracy", "params", "flops", "loss", "kept"]
    pd.testing.assert_frame_equal(frame, pd.DataFrame(ROWS, columns=frame.columns))
    assert store.done("r1") == {("conv1", 0.25), ("conv1", 0.5), ("fc", 0.25)}


def test_readding_a_point_replaces_it_in_place(store):
    open_run(store)
    for row in ROWS:
        store.add_point("r1", row)
    store.add_point("r1", {"group": "conv1", "sparsity": 0.25, "accuracy": 0.95, "params": 100})
    frame = store.points("r1")
    assert len(frame) == 3
    assert frame.loc[0, ["group", "sparsity", "accuracy"]].tolist() == ["conv1", 0.25, 0.95]


def test_sparsity_is_rounded_to_six_decimals(store):
    open_run(store)
    store.add_point("r1", {"group": "g", "sparsity": 0.1 + 0.2, "accuracy": 0.5})
    assert store.done("r1") == {("g", 0.3)}
    store.add_point("r1", {"group": "g", "sparsity": 0.3, "accuracy": 0.6})
    assert store.points("r1")["accuracy"].tolist() == [0.6]


def test_numpy_and_torch_scalars_are_stored_as_numbers(store):
    open_run(store)
    store.add_point("r1", {"group": "g", "sparsity": np.float32(0.5), "acc": torch.tensor(0.25), "n": np.int64(3)})
    assert store.points("r1").iloc[0].tolist() == ["g", 0.5, 0.25, 3]


def test_run_info_fields_complete_and_newest_first(store):
    open_run(store, "r1", expected=4)
    open_run(store, "r1", expected=99)  # idempotent: a resumed sweep keeps the original row
    for row in ROWS:
        store.add_point("r1", row)
    info = store.get("r1")
    assert (info.run_id, info.model_name, info.model_fp, info.data_fp) == ("r1", "tiny", "m" * 64, "d" * 64)
    assert (info.config, info.points, info.expected, info.complete) == (CONFIG, 3, 4, False)
    assert datetime.fromisoformat(info.created).tzinfo is not None
    store.mark_complete("r1")
    assert store.get("r1").complete
    open_run(store, "r2")
    assert [r.run_id for r in store.runs()] == ["r2", "r1"]
    assert store.runs()[1] == store.get("r1")


def test_delete_removes_the_run_and_only_its_points(store):
    open_run(store, "r1")
    open_run(store, "r2")
    store.add_point("r1", ROWS[0])
    store.add_point("r2", ROWS[1])
    store.delete("r1")
    assert [r.run_id for r in store.runs()] == ["r2"]
    with pytest.raises(StoreError, match="r1"):
        store.points("r1")
    open_run(store, "r1")  # a re-opened run starts empty
    assert store.done("r1") == set()
    assert len(store.points("r2")) == 1


@pytest.mark.parametrize("suffix, read", [(".csv", pd.read_csv), (".parquet", pd.read_parquet)])
def test_export_reads_back_equal(store, tmp_path, suffix, read):
    open_run(store)
    for row in ROWS:
        store.add_point("r1", row)
    path = store.export("r1", tmp_path / "out" / f"curves{suffix}")
    assert path == tmp_path / "out" / f"curves{suffix}"
    pd.testing.assert_frame_equal(read(path), store.points("r1"))


# --- fingerprints and run ids -------------------------------------------------------------------


def test_fingerprint_model_sees_weights_and_architecture():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp = fingerprint_model(model)
    assert len(fp) == 64 and fp == fingerprint_model(tiny_model())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    changed = tiny_model()
    with torch.no_grad():
        changed[2].bias[1] += 1e-3
    assert fingerprint_model(changed) != fp
    other_arch = tiny_model()
    other_arch[1] = nn.Tanh()  # same state_dict, different architecture
    assert fingerprint_model(other_arch) != fp
    half = tiny_model().to(torch.bfloat16)  # dtype is part of it, and bf16 hashes without numpy support
    assert fingerprint_model(half) != fp


def test_fingerprint_model_sees_buffers():
    bn = nn.BatchNorm1d(3)
    fp = fingerprint_model(bn)
    bn.running_mean += 1
    assert fingerprint_model(bn) != fp


def test_fingerprint_data_batch_forms():
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    tensors, singles, pairs = [x[:4], x[4:]], [(x[:4],), (x[4:],)], [(x[:4], y[:4]), (x[4:], y[4:])]
    fps = [fingerprint_data(d) for d in (tensors, singles, pairs)]
    assert all(len(fp) == 64 for fp in fps)
    assert fps[0] == fingerprint_data(iter(tensors)) == fps[1]  # x and (x,) are the same data
    assert fps[2] != fps[1]
    assert fingerprint_data(DataLoader(TensorDataset(x, y), batch_size=4)) == fps[2]
    assert fingerprint_data([(x[:4], y[:4]), (x[4:], 1 - y[4:])]) != fps[2]  # one target changed
    assert fingerprint_data([(x, y)]) != fps[2]  # batching is part of it
    assert fingerprint_data([x[:4].double(), x[4:].double()]) != fps[0]
    with pytest.raises(TypeError, match="batch 0"):
        fingerprint_data([(x, [0, 1])])


def test_run_id_is_stable_and_keyed_by_every_input():
    model_fp, data_fp = fingerprint_model(tiny_model()), fingerprint_data([torch.ones(2, 4)])
    rid = run_id(model_fp, data_fp, {"criterion": "l1", "levels": [0.5]})
    assert len(rid) == 16 and set(rid) <= set("0123456789abcdef")
    assert rid == run_id(model_fp, data_fp, {"levels": [0.5], "criterion": "l1"})  # key order is irrelevant
    changed = tiny_model()
    with torch.no_grad():
        changed[0].weight[0, 0] += 1
    others = {
        run_id(model_fp, data_fp, {"criterion": "l2", "levels": [0.5]}),
        run_id(fingerprint_model(changed), data_fp, {"criterion": "l1", "levels": [0.5]}),
        run_id(model_fp, fingerprint_data([torch.zeros(2, 4)]), {"criterion": "l1", "levels": [0.5]}),
    }
    assert rid not in others and len(others) == 3


# --- location and persistence -------------------------------------------------------------------


def test_default_store_path_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNECORE_STORE", str(tmp_path / "mine.sqlite"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_store_path() == tmp_path / "mine.sqlite"
    monkeypatch.delenv("PRUNECORE_STORE")
    assert default_store_path() == tmp_path / "xdg" / "prunecore" / "runs.sqlite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_store_path() == tmp_path / "home" / ".cache" / "prunecore" / "runs.sqlite"


def test_store_without_path_creates_the_default_file(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNECORE_STORE", str(tmp_path / "deep" / "dir" / "runs.sqlite"))
    store = RunStore()
    open_run(store)
    store.close()
    assert (tmp_path / "deep" / "dir" / "runs.sqlite").is_file()


def test_points_persist_across_instances(tmp_path):
    first = RunStore(tmp_path / "runs.sqlite")
    live = RunStore(tmp_path / "runs.sqlite")  # a second open instance sees writes without reopening
    open_run(first)
    first.add_point("r1", ROWS[0])
    assert live.done("r1") == {("conv1", 0.25)}
    first.close()
    again = RunStore(tmp_path / "runs.sqlite")
    again.add_point("r1", ROWS[1])
    pd.testing.assert_frame_equal(again.points("r1"), live.points("r1"))
    assert len(again.points("r1")) == 2 and again.get("r1").points == 2
    again.close()
    live.close()


# --- concurrency and crashes --------------------------------------------------------------------


def test_threads_share_one_store(store):
    open_run(store)

    def write(t: int) -> None:
        for i in range(50):
            store.add_point("r1", {"group": f"t{t}", "sparsity": i / 50, "step": i})

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(store.done("r1")) == 200


def test_processes_write_concurrently_while_parent_reads(tmp_path, start_writers):
    path, n = tmp_path / "runs.sqlite", 200
    reader = RunStore(path)
    procs = start_writers(path, ["a", "b"], n)
    seen, sizes = 0, set()
    while any(p.poll() is None for p in procs):  # every snapshot shows a prefix of each writer's points
        frame = reader.points("shared")
        sizes.add(len(frame))
        assert len(frame) >= seen and not frame.duplicated(["group", "sparsity"]).any()
        for name in ("a", "b"):
            steps = frame.loc[frame["group"] == name].get("step", pd.Series()).tolist()
            assert steps == list(range(len(steps)))
        seen = len(frame)
        time.sleep(0.01)
    for proc in procs:
        proc.communicate(timeout=120)
        assert proc.returncode == 0
    assert any(0 < size < 2 * n for size in sizes), "the parent never read while the writers wrote"
    frame = reader.points("shared")
    for name in ("a", "b"):
        assert frame.loc[frame["group"] == name, "step"].tolist() == list(range(n))
        assert store_steps(reader, name) == list(range(n))
    assert {r.run_id: r.points for r in reader.runs()} == {"shared": 2 * n, "a": n, "b": n}
    reader.close()
    with sqlite3.connect(path) as conn:  # insertion order is a total order: no two points share a place
        assert conn.execute("SELECT COUNT(DISTINCT seq) FROM points WHERE run_id = 'shared'").fetchone()[0] == 2 * n
    assert integrity(path) == "ok"


def test_killed_sweep_loses_no_finished_point_and_resumes(tmp_path, start_writers):
    path, n = tmp_path / "runs.sqlite", 2000
    (proc,) = start_writers(path, ["a"], n)
    finished = [int(proc.stdout.readline()) for _ in range(50)]  # printed only after add_point returned
    proc.kill()  # SIGKILL: no cleanup, no atexit
    proc.communicate(timeout=60)
    assert integrity(path) == "ok"
    store = RunStore(path)
    done = store.done("a")
    assert {("g", round(i / n, 6)) for i in finished} <= done and len(done) < n
    for i in range(n):  # resume: only the missing points are computed
        if ("g", round(i / n, 6)) not in done:
            store.add_point("a", {"group": "g", "sparsity": i / n, "step": i})
    assert store_steps(store, "a") == list(range(n))
    store.close()


# --- errors -------------------------------------------------------------------------------------


def test_garbage_file_gives_store_error_naming_the_path(tmp_path):
    path = tmp_path / "runs.sqlite"
    path.write_bytes(b"this is not a database\n" * 100)
    with pytest.raises(StoreError) as info:
        RunStore(path)
    message = str(info.value)
    assert str(path) in message and "PRUNECORE_STORE" in message and "delete" in message


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "runs.sqlite"
    RunStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="schema version 99"):
        RunStore(path)


def test_unknown_run_id_names_known_ones(store):
    with pytest.raises(StoreError, match="it is empty"):
        store.get("nope")
    open_run(store, "r1")
    for call in (store.get, store.points, store.done, store.mark_complete, store.delete):
        with pytest.raises(StoreError, match=r"unknown run id 'nope'.*known: r1"):
            call("nope")
    with pytest.raises(StoreError, match="nope"):
        store.add_point("nope", ROWS[0])


def test_point_needs_group_and_sparsity(store):
    open_run(store)
    with pytest.raises(ValueError, match="'group' and 'sparsity'"):
        store.add_point("r1", {"group": "g", "accuracy": 1.0})


def test_unsupported_export_format(store, tmp_path):
    open_run(store)
    with pytest.raises(StoreError, match=r"\.csv and \.parquet"):
        store.export("r1", tmp_path / "curves.xlsx")
    assert not (tmp_path / "curves.xlsx").exists()


def test_a_run_keeps_one_predictor_which_goes_with_the_run(store):
    open_run(store, "r1")
    open_run(store, "r2")
    assert store.get_predictor("r1") is None
    store.put_predictor("r1", {"format": "prunecore.predictor/3", "plans": 30})
    store.put_predictor("r1", {"format": "prunecore.predictor/3", "plans": 44})  # a refit replaces it
    assert store.get_predictor("r1") == {"format": "prunecore.predictor/3", "plans": 44}
    assert store.get_predictor("r2") is None
    with pytest.raises(StoreError, match="unknown run id 'nope'"):
        store.put_predictor("nope", {})
    with pytest.raises(ValueError):  # JSON has no NaN: refused before anything is written
        store.put_predictor("r2", {"band": float("nan")})
    store.delete("r1")
    open_run(store, "r1")
    assert store.get_predictor("r1") is None


def test_a_version_1_store_gains_the_predictors_and_latency_tables_and_still_reads_read_only(tmp_path):
    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as conn:  # what prunecore wrote before predictors were stored
        conn.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, model_name TEXT, model_fp TEXT, data_fp TEXT,"
                     " config TEXT, created TEXT, expected INTEGER, complete INTEGER)")  # fmt: skip
        conn.execute("CREATE TABLE points (run_id TEXT, grp TEXT, sparsity REAL, data TEXT, seq INTEGER,"
                     " PRIMARY KEY (run_id, grp, sparsity))")  # fmt: skip
        conn.execute("INSERT INTO runs VALUES ('r1', 'm', 'mfp', 'dfp', '{}', '2026-01-01', 1, 1)")
        conn.execute("PRAGMA user_version = 1")
    old = RunStore(path, read_only=True)
    assert old.get("r1").complete and old.get_predictor("r1") is None  # readable as it is
    assert old.get_latency("any") is None
    old.close()
    store = RunStore(path)  # opened for writing: upgraded in place
    store.put_predictor("r1", {"plans": 12})
    store.put_latency("cpu/conv", {"ms": [1.5, 2.0]})
    assert store.get_predictor("r1") == {"plans": 12}
    assert store.get_latency("cpu/conv") == {"ms": [1.5, 2.0]} and store.get_latency("cpu/other") is None
    store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
