"""Test-wide settings: offline, deterministic, small thread count (CI has 2 cores)."""
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope='module')
def module_dir(tmp_path_factory):
    """``module_dir(name)`` makes a folder that is deleted when the module's tests are done.

    Training runs shared by a module's tests write checkpoints of tens of MB each; pytest would keep them
    to the end of the session (and for two more sessions), which filled CI's disk. Per-test folders are
    deleted by ``tmp_path_retention_policy = failed`` in pytest.ini."""
    made = []

    def make(name: str) -> Path:
        path = tmp_path_factory.mktemp(name)
        made.append(path)
        return path

    yield make
    for path in made:
        shutil.rmtree(path, ignore_errors=True)
