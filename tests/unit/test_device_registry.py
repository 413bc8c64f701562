"""The device backend registry: built-ins, plugins found by entry point, ``--device auto`` by priority, clear
errors for unknown, unavailable and broken backends, and the seams that ask the active backend (dtype, the
quantization check, KV staging's block copies, the worker's device info, the same-node KV connector)."""
from __future__ import annotations

import logging

import pytest
import torch

from pdserve import devices
from pdserve.devices import CpuBackend, CudaBackend, DeviceBackend, get_backend, resolve_backend
from pdserve.errors import DeviceError, ModelLoadError


@pytest.fixture(autouse=True)
def _fresh_registry():
    devices.refresh()
    yield
    devices.refresh()


def test_builtins_and_auto_prefers_cuda_by_priority(monkeypatch):
    found = devices.discover()
    assert isinstance(found.backends["cpu"], CpuBackend) and isinstance(found.backends["cuda"], CudaBackend)
    monkeypatch.setattr(CudaBackend, "is_available", lambda self: False)
    assert resolve_backend("auto") == (found.backends["cpu"], torch.device("cpu"))
    monkeypatch.setattr(CudaBackend, "is_available", lambda self: True)
    backend, device = resolve_backend("auto")
    assert backend.name == "cuda" and device == torch.device("cuda")
    assert resolve_backend("cuda:1")[1] == torch.device("cuda", 1)


def test_unknown_bad_index_and_unavailable_devices_fail_clearly(monkeypatch):
    with pytest.raises(DeviceError, match=r"unknown device 'tpu9': known devices are auto, cpu, cuda"):
        resolve_backend("tpu9")
    with pytest.raises(DeviceError, match="must be a number"):
        resolve_backend("cpu:x")
    monkeypatch.setattr(CudaBackend, "is_available", lambda self: False)
    with pytest.raises(DeviceError, match=r"'cuda' is not available on this machine \(available: cpu\)"):
        resolve_backend("cuda")


def test_a_plugin_is_found_by_its_entry_point_alone(testchip):
    backend, device = resolve_backend("testchip")
    assert type(backend).__module__ == "pdserve_testchip" and backend.name == "testchip"
    assert device == torch.device("cpu") and testchip.CALLS["is_available"] == 1
    assert "testchip" in str(pytest.raises(DeviceError, resolve_backend, "nope").value)
    assert resolve_backend("auto")[0].name in ("cpu", "cuda")  # priority -10: never chosen over the CPU
    assert backend.label(device) == "testchip (cpu)" and CpuBackend().label(device) == "cpu"


def test_auto_takes_the_plugin_of_highest_priority(device_plugin, monkeypatch):
    monkeypatch.setattr(CudaBackend, "is_available", lambda self: True)
    source = ("from pdserve.devices import DeviceBackend\n"
              "class Fast(DeviceBackend):\n    name = 'fastchip'\n    device_type = 'cpu'\n    priority = 500\n"
              "    def is_available(self):\n        return True\n"
              "class Absent(Fast):\n    name = 'absentchip'\n    priority = 900\n"
              "    def is_available(self):\n        raise RuntimeError('no driver')\n")
    device_plugin("fastchip_pkg", "[pdserve.devices]\nfastchip = fastchip_pkg:Fast\n"
                  "absentchip = fastchip_pkg:Absent\n", source)
    assert resolve_backend("auto")[0].name == "fastchip"  # absentchip's probe raised: unavailable, not fatal
    with pytest.raises(DeviceError, match="'absentchip' is not available"):
        resolve_backend("absentchip")


def test_broken_plugins_are_reported_and_leave_the_cpu_working(device_plugin, caplog):
    source = ("from pdserve.devices import DeviceBackend\n"
              "class Named(DeviceBackend):\n    name = 'othername'\n    device_type = 'cpu'\n"
              "    def is_available(self):\n        return True\n"
              "class Cpu(Named):\n    name = 'cpu'\n"
              "def factory():\n    return Named()\n"
              "NOT_A_BACKEND = 42\n")
    entry_points = ("[pdserve.devices]\n"
                    "missing = no_such_module_xyz:Backend\n"   # the import fails
                    "notbackend = brokenchips:NOT_A_BACKEND\n"  # not a DeviceBackend
                    "mismatch = brokenchips:factory\n"          # a factory whose backend has another name
                    "cpu = brokenchips:Cpu\n")                  # would shadow the built-in
    with caplog.at_level(logging.WARNING, logger="pdserve.devices.registry"):
        device_plugin("brokenchips", entry_points, source)
        found = devices.discover()
    assert set(found.broken) == {"missing", "notbackend", "mismatch", "cpu"}
    assert "ModuleNotFoundError" in found.broken["missing"] and "not a pdserve.devices" in found.broken["notbackend"]
    assert "calls itself 'othername'" in found.broken["mismatch"] and "taken by a built-in" in found.broken["cpu"]
    assert sum("device plugin" in r.message and "is broken" in r.message for r in caplog.records) == 4
    assert type(found.backends["cpu"]) is CpuBackend and resolve_backend("cpu")[0] is found.backends["cpu"]
    with pytest.raises(DeviceError, match=r"'missing' failed to load: no_such_module_xyz:Backend: ModuleNotFound"):
        get_backend("missing")


def test_the_plugin_allow_list(testchip, monkeypatch):
    monkeypatch.setenv(devices.registry.PLUGINS_ENV, "")
    devices.refresh()
    assert set(devices.discover().backends) == {"cpu", "cuda"}
    monkeypatch.setenv(devices.registry.PLUGINS_ENV, "testchip")
    devices.refresh()
    assert "testchip" in devices.discover().backends


def test_backend_for_device_is_the_active_one_of_that_type(testchip):
    cpu = devices.backend_for_device("cpu")
    assert isinstance(cpu, CpuBackend) and isinstance(devices.backend_for_device("cuda:0"), CudaBackend)
    chip = get_backend("testchip")
    devices.activate(chip)
    assert devices.backend_for_device(torch.device("cpu")) is chip
    assert isinstance(devices.backend_for_device("cuda"), CudaBackend)  # another type: not the active one
    with pytest.raises(DeviceError, match="no device backend drives torch device type 'meta'"):
        devices.backend_for_device("meta")


def test_dtype_and_quantization_follow_the_backend(testchip, monkeypatch):
    from pdserve.model.loader import cpu_has_bfloat16, resolve_dtype, resolve_quantization

    chip = get_backend("testchip")
    assert resolve_dtype("auto", chip) == torch.float32  # it says bfloat16 is not native
    assert resolve_dtype("bfloat16", chip) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="float16 is not supported on device testchip"):
        resolve_dtype("float16", chip)
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_has_bfloat16() else torch.float32)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_quantization("none", CudaBackend()) == "none"
    assert resolve_quantization("auto", CudaBackend()) == "none"  # no CPU kernels on a CUDA tensor
    with pytest.raises(ModelLoadError, match="quantization=q4_0 runs on the CPU only"):
        resolve_quantization("q4_0", CudaBackend())
    monkeypatch.setenv("PDSERVE_CPU_KERNELS", "0")
    from pdserve.kernels import cpu_ops

    cpu_ops.cache_clear()
    try:
        assert resolve_quantization("q8_0", chip) == "none"  # a CPU-backed chip, kernels off: dequantized
    finally:
        cpu_ops.cache_clear()


def test_kv_staging_and_connector_choice_ask_the_backend(testchip):
    from pdserve.kv.staging import Staging

    cache = torch.zeros(2, 2, 6, 4, 1, 3)  # (layers, k|v, blocks, block_size, kv_heads, head_dim)
    data = torch.arange(2 * 2 * 2 * 4 * 3, dtype=torch.float32).view(2, 2, 2, 4, 1, 3)
    Staging("cpu").from_host(cache, [4, 1], data)
    assert testchip.CALLS["copy_blocks"] == 0  # the built-in CPU backend's copy
    chip = get_backend("testchip")
    devices.activate(chip)
    staging = Staging("cpu")
    assert staging.backend is chip and not staging.staged and not staging.has_streams and not staging.pin
    staging.from_host(cache, [4, 1], data)
    assert testchip.CALLS["copy_blocks"] == 1
    assert torch.equal(cache[:, :, 4], data[:, :, 0]) and torch.equal(cache[:, :, 1], data[:, :, 1])
    assert torch.equal(staging.to_host(cache, [1, 4]), data.flip(2))
    assert chip.same_node_connector == "shm" and CudaBackend.same_node_connector == "cuda_ipc"


def test_worker_device_info_and_memory_come_from_the_backend(testchip):
    from pdserve.worker.busy import device_info

    chip, device = resolve_backend("testchip")
    info = device_info(chip, device)
    assert (info.device_type, info.device_name, info.num_cores) == ("cpu", "TestChip T1", 0)
    cpu_info = device_info(CpuBackend(), device)
    assert cpu_info.num_cores >= 1 and cpu_info.device_name and cpu_info.hardware  # a CPU entry always fits
    free, total = CpuBackend().memory_info(device)
    assert 0 < free <= total
    with pytest.raises(NotImplementedError):
        chip.memory_info(device)  # the default asks torch.cpu, which has no mem_get_info


def test_a_minimal_backend_needs_only_names_and_is_available():
    class Minimal(DeviceBackend):
        name = "minimal"
        device_type = "cpu"

        def is_available(self) -> bool:
            return True

    backend = Minimal()
    assert backend.default_dtype() == torch.bfloat16 and backend.attention() is None
    assert backend.uses_cpu_kernels and backend.kv_cache_in_host_memory and not backend.has_streams
    cache = backend.allocate_kv_cache((1, 2, 3, 4, 1, 2), torch.float32, torch.device("cpu"))
    assert cache.shape == (1, 2, 3, 4, 1, 2) and not cache.any()
    backend.synchronize(torch.device("cpu"))  # no streams: nothing to wait for


def test_pdserve_up_refuses_an_unknown_device_before_starting_workers(capsys):
    from pdserve.cli import main

    assert main(["up", "--device", "nosuchchip"]) == 2
    assert "pdserve up: error: unknown device 'nosuchchip': known devices are auto, cpu, cuda" in capsys.readouterr().err


def test_the_engine_warns_when_the_kv_cache_exceeds_free_memory(testchip, caplog):
    from pdserve.engine.core import _warn_if_over_memory

    class Small(CpuBackend):
        name = "small"

        def memory_info(self, device):
            return 1 << 20, 1 << 30

    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="pdserve.engine.core"):
        _warn_if_over_memory(Small(), cpu, 1 << 19)
        _warn_if_over_memory(get_backend("testchip"), cpu, 1 << 40)  # no memory_info: nothing to say
        assert not caplog.records
        _warn_if_over_memory(Small(), cpu, 2 << 20)
    assert "KV cache (0.00 GiB) is larger than small (cpu)'s free memory" in caplog.records[0].message
