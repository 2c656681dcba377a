import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the helper modules beside the tests: toy_models, timm_zoo


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine, tiny models run 100x slower with two (spin-waits).

    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
