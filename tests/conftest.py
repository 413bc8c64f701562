"""Shared fixtures: the default model, skipped with a clear message when it is not downloaded."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The default GGUF (``smollm2-135m``) in the pdserve cache; skips the test when it is absent."""
    from pdserve.model.registry import DEFAULT_MODEL, resolve_model_path

    path = resolve_model_path(DEFAULT_MODEL)
    if not path.is_file():
        pytest.skip(f"default model not downloaded ({path} missing): run `pdserve pull`")
    return path


# An out-of-tree device backend, as a vendor would ship it: its own package, found by its entry point alone
# (a *.dist-info folder on sys.path is what `pip install` leaves). CPU-backed: torch device "cpu", with its
# own attention, KV allocation and block copies, each counting its calls (pdserve_testchip.CALLS).
TESTCHIP_SOURCE = '''\
"""A CPU-backed pdserve device backend that counts the calls pdserve makes into it."""
import torch

from pdserve.devices import DeviceBackend
from pdserve.devices.base import copy_block_runs
from pdserve.model.attention import paged_attention

CALLS = {"is_available": 0, "attention": 0, "allocate_kv_cache": 0, "copy_blocks": 0}


class TestChip(DeviceBackend):
    __test__ = False  # not a pytest class
    name = "testchip"
    device_type = "cpu"
    priority = -10  # --device auto keeps the CPU
    same_node_connector = "shm"

    def is_available(self):
        CALLS["is_available"] += 1
        return True

    def device_name(self, device):
        return "TestChip T1"

    def has_native_bfloat16(self):
        return False

    def supported_dtypes(self):
        return (torch.float32, torch.bfloat16)

    def attention(self):
        def attend(q, k, v, kv_cache, meta, scale, window=None):
            CALLS["attention"] += 1
            return paged_attention(q, k, v, kv_cache, meta, scale, window)
        return attend

    def allocate_kv_cache(self, shape, dtype, device):
        CALLS["allocate_kv_cache"] += 1
        return torch.zeros(shape, dtype=dtype, device=device)

    def copy_blocks(self, dst, dst_ids, src, src_ids, layers=slice(None), src_layers=None):
        CALLS["copy_blocks"] += 1
        copy_block_runs(dst, dst_ids, src, src_ids, layers, src_layers)
'''


def write_device_plugin(root: Path, package: str, entry_points: str, source: str) -> Path:
    """``root`` with package ``package`` (one module: ``source``) and its dist-info declaring ``entry_points``
    (the body of entry_points.txt); put ``root`` on sys.path (or PYTHONPATH) to install it."""
    (root / package).mkdir(parents=True, exist_ok=True)
    (root / package / "__init__.py").write_text(source)
    dist = root / f"{package}-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(entry_points)
    return root


@pytest.fixture(scope="session")
def testchip_dir(tmp_path_factory) -> Path:
    """A folder holding the out-of-tree ``pdserve_testchip`` package, not yet on sys.path."""
    return write_device_plugin(tmp_path_factory.mktemp("plugins"), "pdserve_testchip",
                               "[pdserve.devices]\ntestchip = pdserve_testchip:TestChip\n", TESTCHIP_SOURCE)


@pytest.fixture
def testchip(testchip_dir, monkeypatch):
    """``pdserve_testchip`` installed for this test (on sys.path, the device registry rediscovered); its
    module, whose CALLS count the calls into the backend."""
    import importlib

    from pdserve import devices

    monkeypatch.syspath_prepend(str(testchip_dir))
    devices.refresh()
    module = importlib.import_module("pdserve_testchip")
    for key in module.CALLS:
        module.CALLS[key] = 0
    yield module
    monkeypatch.undo()
    devices.refresh()


@pytest.fixture
def device_plugin(tmp_path, monkeypatch):
    """``device_plugin(package, entry_points, source)``: write and install another plugin package for this
    test (the registry rediscovers; undone afterwards)."""
    from pdserve import devices

    def install(package: str, entry_points: str, source: str) -> Path:
        root = write_device_plugin(tmp_path / package, package, entry_points, source)
        monkeypatch.syspath_prepend(str(root))
        devices.refresh()
        return root

    yield install
    monkeypatch.undo()
    devices.refresh()
