"""Who can reach the dashboard, and what it lets them do: localhost however it is started, no code from afar.

The server tests start a real `streamlit run` from folders other than the repository root (where the
project-level .streamlit/config.toml used to be the only thing keeping it on 127.0.0.1) and read
the kernel's socket table; the rest drive the pages through AppTest with the address the server
would have been started on.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import pytest
from streamlit import config
from streamlit.testing.v1 import AppTest

from dashboard import state

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "dashboard" / "app.py"
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column


# -- the decision, as plain functions ---------------------------------------------------------------
@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "localhost", "LOCALHOST", "::1", "[::1]", " 127.0.0.1 "])
def test_loopback_addresses_serve_this_machine_only(address):
    assert state.is_loopback(address)
    assert state.factory_allowed(address, {})
    assert state.exposure_warning(address, {}) is None


@pytest.mark.parametrize("address", [None, "", "0.0.0.0", "::", "192.168.1.20", "10.0.0.5", "example.org", "my-host"])
def test_other_addresses_warn_and_turn_the_factory_off(address):
    assert not state.is_loopback(address)
    assert not state.factory_allowed(address, {})
    assert not state.factory_allowed(address, {state.REMOTE_ENV: "yes"})  # only the documented value opts in
    warning = state.exposure_warning(address, {})
    assert warning is not None and "other machines can reach it" in warning and state.REMOTE_ENV in warning
    assert (address or "every network interface") in warning


def test_the_remote_opt_in_offers_the_factory_without_the_warning():
    assert state.factory_allowed("0.0.0.0", {state.REMOTE_ENV: "1"})
    assert state.exposure_warning("0.0.0.0", {state.REMOTE_ENV: "1"}) is None


def test_only_package_function_specs_run_code():
    assert state.runs_code("mypkg.nets:build_net") and state.runs_code("os:getcwd")
    assert not any(state.runs_code(s) for s in ("sample:resnet20", "torchvision:resnet18", "timm:convnext_atto"))


def test_input_shapes_parse_or_raise_a_user_error():
    from prunecore.errors import UserError

    assert state.parse_shape(" ") is None
    assert state.parse_shape("1, 3,224,224") == [1, 3, 224, 224]
    for bad in ("1,x,28", "1,0,28", "1,,3", "-1,3"):
        with pytest.raises(UserError, match="comma-separated integers"):
            state.parse_shape(bad)


def test_both_config_files_keep_the_dashboard_on_this_machine():
    script = tomllib.loads((APP.parent / ".streamlit" / "config.toml").read_text())  # read wherever it starts
    project = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())  # read when started from ROOT
    assert script == project
    assert script["server"]["address"] == "127.0.0.1"
    assert script["server"]["headless"] is True and script["browser"]["gatherUsageStats"] is False
    assert script["server"]["maxUploadSize"] * 2**20 >= 304_000_000 * 4  # an fp32 ViT-L/16 state_dict


# -- the pages, served on a given address -----------------------------------------------------------
@pytest.fixture
def served_on(monkeypatch, tmp_path):
    """Set `server.address` as `streamlit run --server.address` would; put it back afterwards."""
    monkeypatch.setenv("PRUNECORE_STORE", str(tmp_path / "runs.db"))
    monkeypatch.delenv(state.REMOTE_ENV, raising=False)
    original = config.get_option("server.address")
    yield lambda address: config.set_option("server.address", address)
    config.set_option("server.address", original)


def _model_page() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.session_state[state.DATA_LIMIT] = 64
    return at.run()


def test_on_loopback_the_factory_box_says_it_runs_code_here(served_on):
    served_on("127.0.0.1")
    at = _model_page()
    assert not at.exception and not at.warning
    at.radio(key="model_source").set_value("Factory function").run()
    box = at.text_input(key="factory_spec")
    assert "runs the function" in box.label and "on this machine" in box.label
    assert "imports package.module" in box.help


def test_on_another_address_the_app_warns_and_no_factory_spec_is_loaded(served_on):
    served_on("0.0.0.0")
    at = _model_page()
    assert not at.exception
    assert any("`0.0.0.0`" in w.value and "other machines" in w.value for w in at.warning)
    at.radio(key="model_source").set_value("Factory function").run()
    assert not at.exception
    assert "factory_spec" not in [t.key for t in at.text_input]  # no box to type a spec into
    assert any("Factory box is off" in i.value for i in at.info)
    at.session_state[state.MODEL_SPEC] = "os:getcwd"  # however a code spec got there, it is not loaded
    at.switch_page("views/export.py").run()
    assert not at.exception
    assert any(e.value.startswith("Not loading os:getcwd") for e in at.error)
    # (the warning is app.py's, above st.navigation, so a browser shows it on every page; AppTest
    # drops the entrypoint's elements after switch_page, so it is only checked on the first page)


def test_the_remote_opt_in_offers_the_factory_box(served_on, monkeypatch):
    served_on("0.0.0.0")
    monkeypatch.setenv(state.REMOTE_ENV, "1")
    at = _model_page()
    assert not at.exception and not at.warning
    at.radio(key="model_source").set_value("Factory function").run()
    assert at.text_input(key="factory_spec").value == "torchvision.models:resnet18"


def test_the_weights_uploader_states_the_upload_limit(served_on):
    served_on("127.0.0.1")
    at = _model_page()
    at.radio(key="model_source").set_value("torchvision architecture").run()
    (uploader,) = at.get("file_uploader")
    assert f"{config.get_option('server.maxUploadSize'):,} MB" in uploader.help


def test_a_missing_data_folder_is_an_error_on_the_page(served_on, tmp_path):
    served_on("127.0.0.1")
    at = _model_page()
    at.radio(key="data_source").set_value("Image folder").run()
    at.text_input(key="data_folder").set_value(str(tmp_path / "no_such_folder")).run()
    assert not at.exception
    assert any("does not exist" in e.value for e in at.error)


# -- a real server, started from elsewhere than the repository root ---------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _listening(port: int) -> set[str]:
    """The local addresses with a listening TCP socket on `port`, from /proc/net/tcp and tcp6."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, status = line.split()[1], line.split()[3]
            hex_address, hex_port = local.split(":")
            if status != LISTEN or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(hex_address)  # 32-bit words in host (little-endian) order
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.add(str(ipaddress.ip_address(words)))
    return found


def _other_ipv4() -> str | None:
    """An IPv4 address of this machine that is not loopback, or None."""
    candidates = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP: picks the outgoing interface, sends nothing
            candidates.append(s.getsockname()[0])
        except OSError:
            pass
    try:
        candidates.append(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    return next((a for a in candidates if not ipaddress.ip_address(a).is_loopback
                 and not ipaddress.ip_address(a).is_unspecified), None)  # fmt: skip


@pytest.fixture(scope="module", params=["elsewhere", "dashboard"])
def server(request, tmp_path_factory):
    """`streamlit run` without --server.address: from a temporary folder (absolute script path), or
    from dashboard/ (`streamlit run app.py`); yields the port once it accepts connections."""
    tmp = tmp_path_factory.mktemp("cwd")
    cwd, script = (tmp, str(APP)) if request.param == "elsewhere" else (APP.parent, "app.py")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}  # only the config files decide
    env.update(PRUNECORE_STORE=str(tmp / "runs.db"), PYTHONDONTWRITEBYTECODE="1")
    log = tmp / "streamlit.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", script, "--server.port", str(port), "--server.headless", "true"],
            cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120  # a timeout for a server that never comes up, not a speed check
        while not _accepts("127.0.0.1", port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start from {cwd}: {log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield port
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_the_server_listens_on_loopback_only(server):
    assert _accepts("127.0.0.1", server)
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp to read the listening sockets from")
    assert _listening(server) == {"127.0.0.1"}  # not 0.0.0.0, not ::


def test_the_server_refuses_other_interfaces(server):
    other = _other_ipv4()
    if other is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    assert not _accepts(other, server)
