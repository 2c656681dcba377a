import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside the tests: toy_models, timm_zoo

from job_helpers import kill_workers, resnet_plan  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine, tiny models run 100x slower with two (spin-waits).

    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A run store of the test's own (a module's own `store` fixture takes precedence); one thread per
    worker, which on a busy 2-core machine runs small models several times faster; workers left running
    are killed afterwards."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = tmp_path / "runs.sqlite"
    yield path
    kill_workers(path)


@pytest.fixture(scope="module", name="resnet_plan")
def resnet_plan_fixture() -> tuple[torch.nn.Module, Any]:
    """The sample ResNet-20 and a uniform 30 % plan for it (tests of measuring and fine-tuning jobs)."""
    return resnet_plan()
