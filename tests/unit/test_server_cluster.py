"""Cluster files and the shared engine flags."""
from __future__ import annotations

import argparse
import logging

import pytest

from pdserve.cluster.args import add_engine_args, engine_args_to_argv, engine_config_from_args, parse_cpu_list
from pdserve.cluster.cli import add_up_args
from pdserve.cluster.config import cluster_settings, load_cluster_file


def test_engine_flags_round_trip():
    parser = add_engine_args(argparse.ArgumentParser())
    args = parser.parse_args(["--kv-cache-memory", "512MiB", "--block-size", "32", "--max-num-seqs", "7",
                              "--no-prefix-caching", "--max-model-len", "1024", "--dtype", "bfloat16"])
    config = engine_config_from_args(args)
    assert config.cache.kv_cache_memory_bytes == 512 * 2**20 and config.cache.block_size == 32
    assert not config.cache.enable_prefix_caching and config.scheduler.max_num_seqs == 7
    assert config.model.max_model_len == 1024 and config.model.dtype == "bfloat16"
    again = engine_config_from_args(parser.parse_args(engine_args_to_argv(args)))
    assert again == config


def test_cpu_lists():
    assert parse_cpu_list("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(ValueError):
        parse_cpu_list(",")


def test_cluster_file(tmp_path, caplog):
    path = tmp_path / "best-cluster.yaml"
    path.write_text("model: smollm2-135m\nmode: disaggregated\nprefill: 2\ndecode: 3\nkv_transfer: tcp\n"
                    "scheduler:\n  max_num_batched_tokens: 1024\n  max_num_seqs: 64\n"
                    "cache:\n  kv_cache_memory: 2GiB\n  block_size: 32\nhardware: h100-sxm\ntp: 2\n")
    with caplog.at_level(logging.INFO):
        s = load_cluster_file(path)
    assert s == {"model": "smollm2-135m", "prefill": 2, "decode": 3, "colocated": 0, "kv_transfer": "tcp",
                 "max_num_batched_tokens": 1024, "max_num_seqs": 64, "kv_cache_memory": "2GiB", "block_size": 32}
    assert "hardware" in caplog.text and "tp" in caplog.text
    # every setting is a real flag of ``pdserve up``
    parser = argparse.ArgumentParser()
    add_up_args(parser)
    dests = set(vars(parser.parse_args([])))
    assert set(s) <= dests


def test_cluster_file_modes_and_errors():
    assert cluster_settings({"mode": "colocated"}) == {"colocated": 1, "prefill": 0, "decode": 0}
    assert cluster_settings({"mode": "colocated", "instances": 4})["colocated"] == 4
    with pytest.raises(ValueError, match="mode"):
        cluster_settings({"mode": "both"})
    with pytest.raises(ValueError, match="prefil"):
        cluster_settings({"prefil": 1})
    with pytest.raises(ValueError, match="scheduler.max_seqs"):
        cluster_settings({"scheduler": {"max_seqs": 1}})


def test_planner_best_cluster_file_is_accepted(tmp_path):
    """A file as ``pdserve plan`` writes it (the simulator's own writer) starts the same cluster shape."""
    from pdserve.sim.cluster import load_cluster

    path = tmp_path / "best-cluster.yaml"
    path.write_text("model: smollm2-135m\nmode: disaggregated\nprefill: 2\ndecode: 3\nrouting: least_loaded\n"
                    "scheduler: {max_num_batched_tokens: 2048, max_num_seqs: 256, enable_chunked_prefill: true}\n"
                    "cache: {block_size: 16, enable_prefix_caching: true}\nprefill_hardware: h100-sxm\n"
                    "decode_hardware: h200\ntp: {prefill: 1, decode: 2}\n"
                    "notes: {precision: bf16, pools: {prefill: {max_num_batched_tokens: 8192}}}\n"
                    "predicted: {goodput_rps: 12.5}\n")
    spec = load_cluster(path)  # the simulator reads it, and writes it back as the planner does
    for f in (path, spec.dump(tmp_path / "dumped.yaml")):
        s = load_cluster_file(f)
        assert (s["prefill"], s["decode"], s["colocated"], s["routing"]) == (2, 3, 0, "least_loaded")
        assert s["max_num_seqs"] == 256 and s["block_size"] == 16 and s["model"] == "smollm2-135m"


def test_cores_are_split_evenly_between_workers():
    from pdserve.cluster.local import split_cores

    assert split_cores([0, 1], 1) == ["0,1"]  # the colocated baseline gets every core
    assert split_cores([0, 1], 2) == ["0", "1"]  # a prefill + decode pair, one core each
    assert split_cores([0, 1], 3) == ["0", "1", "0"]
    assert split_cores([0, 1, 2, 3, 4], 2) == ["0,1", "2,3,4"]


def test_per_pool_scheduler_settings_reach_their_workers(tmp_path):
    """``notes.pools`` of a planner's cluster file set each pool's workers' scheduler; flags win."""
    from pdserve.cluster.cli import apply_up_config
    from pdserve.cluster.local import LocalCluster
    from pdserve.sim.cluster import ClusterSpec, PoolSpec

    spec = ClusterSpec("smollm2-135m", "disaggregated", prefill=PoolSpec("h100-sxm", 1, max_num_batched_tokens=8192,
                                                                           max_num_seqs=16),
                       decode=PoolSpec("h100-sxm", 2, max_num_batched_tokens=512, max_num_seqs=200,
                                       enable_chunked_prefill=False))
    path = spec.dump(tmp_path / "best-cluster.yaml")
    engine = argparse.ArgumentParser()
    add_engine_args(engine)

    def worker_settings(argv_up, role):
        parser = argparse.ArgumentParser()
        add_up_args(parser)
        cluster = LocalCluster(apply_up_config(parser.parse_args(argv_up)))
        try:
            known, _ = engine.parse_known_args(cluster.worker_argv(0, role, None, tmp_path / "r.json")[3:])
        finally:
            cluster.tmpdir.rmdir()
        return known.max_num_batched_tokens, known.max_num_seqs, known.enable_chunked_prefill

    assert worker_settings(["--config", str(path)], "prefill") == (8192, 16, True)
    assert worker_settings(["--config", str(path)], "decode") == (512, 200, False)
    assert worker_settings(["--config", str(path), "--max-num-seqs", "7"], "decode") == (512, 7, False)
    with pytest.raises(ValueError, match="notes.pools.decode.max_seqs"):
        cluster_settings({"mode": "disaggregated", "notes": {"pools": {"decode": {"max_seqs": 3}}}})
