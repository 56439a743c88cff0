"""Test-wide settings: offline, deterministic, small thread count (CI has 2 cores), workers.

The suite runs under pytest-xdist (``-n auto --dist loadfile --no-loadscope-reorder``, pytest.ini): the toy trainings are bound
by per-operator overhead, so two single-threaded workers on CI's 2 cores get through them ~1.4x faster
than one process with 2 threads (measured: the VQA learning test took 77 s alone with 2 threads, 52 s per
test two at a time with 1 thread each). Each worker's threads are the cores divided among the workers.
Whole modules go to one worker, so a module's shared fixtures (a training run, a toy dataset) are built
once. ``--dist loadgroup`` would allow finer units but does not group under pytest 9 (xdist 3.8 tags the
node ids after pytest 9 has fixed them)."""
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

_WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core, at most 4 (each holds its own torch and toy models in memory)."""
    return max(1, min(4, os.cpu_count() or 1))


def pytest_collection_modifyitems(items) -> None:
    """Minutes-long toy trainings (``learning``) first: started last, one of them would end the run on one
    worker while the others idle."""
    items.sort(key=lambda item: item.get_closest_marker('learning') is None)  # stable: file order otherwise


@pytest.fixture(autouse=True)
def _release_output_dir_locks():
    """A script run in-process that raised keeps its output folder's lock (a real process drops it on exit):
    drop it after each test, as the process's end would."""
    yield
    from engine import lock
    for held in list(lock._HELD.values()):
        held.release()


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
