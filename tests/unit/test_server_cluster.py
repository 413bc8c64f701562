"""Cluster files and the shared engine flags."""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace

import pytest

from pdserve import cluster_file
from pdserve.cluster.cli import add_up_args, apply_up_config
from pdserve.runtime import parse_cpu_list
from pdserve.settings import SETTINGS, add_engine_flags, engine_argv, engine_config, engine_config_from_args


def test_engine_flags_round_trip():
    parser = add_engine_flags(argparse.ArgumentParser())
    args = parser.parse_args(["--kv-cache-memory", "512MiB", "--block-size", "32", "--max-num-seqs", "7",
                              "--no-prefix-caching", "--max-model-len", "1024", "--dtype", "bfloat16",
                              "--quantization", "none"])
    config = engine_config_from_args(args)
    assert config.cache.kv_cache_memory_bytes == 512 * 2**20 and config.cache.block_size == 32
    assert not config.cache.enable_prefix_caching and config.scheduler.max_num_seqs == 7
    assert config.model.max_model_len == 1024 and config.model.dtype == "bfloat16"
    assert config.model.quantization == "none"
    assert "--model" not in engine_argv(config)  # settings at their default are left out
    assert engine_config_from_args(parser.parse_args(engine_argv(config))) == config
    # the same settings by name (LLM's keyword arguments, cluster files)
    assert engine_config(kv_cache_memory="512MiB", block_size=32, max_num_seqs=7, enable_prefix_caching=False,
                         max_model_len=1024, dtype="bfloat16", quantization="none") == config
    with pytest.raises(ValueError, match="max_num_seq"):
        engine_config(max_num_seq=7)
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        engine_config(max_num_seqs=0)


def test_every_engine_setting_is_a_flag_of_worker_up_and_generate():
    from pdserve.cli import build_parser

    parser = build_parser()
    for command in (["worker"], ["up"], ["generate", "x"]):
        args = parser.parse_args(command)
        assert set(SETTINGS) <= set(vars(args)), command


def test_cpu_lists():
    assert parse_cpu_list("0-2,5") == [0, 1, 2, 5]
    with pytest.raises(ValueError):
        parse_cpu_list(",")


def _up_args(argv):
    parser = argparse.ArgumentParser()
    add_up_args(parser)
    return apply_up_config(parser.parse_args(argv))


def _worker_engine_args(argv_up, role, tmp_path) -> argparse.Namespace:
    """The engine settings `pdserve up ARGV_UP` gives its first worker of ``role``."""
    from pdserve.cluster.local import LocalCluster

    cluster = LocalCluster(_up_args(argv_up))
    try:
        known, _ = add_engine_flags(argparse.ArgumentParser()).parse_known_args(
            cluster.worker_argv(0, role, None, tmp_path / "r.json")[3:])
    finally:
        cluster.tmpdir.rmdir()
    return known


def test_cluster_file_sets_up_and_flags_win(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("model: smollm2-135m\nengine: {max_num_batched_tokens: 1024, max_num_seqs: 64, "
                    "kv_cache_memory: 2GiB, block_size: 32}\n"
                    "serving: {mode: disaggregated, prefill: 2, decode: 3, kv_connector: tcp, routing: round_robin}\n"
                    "planning: {hardware: h100-sxm, tp: 2}\n")
    args = _up_args(["--config", str(path)])
    assert (args.prefill, args.decode, args.colocated, args.kv_connector, args.routing) == (2, 3, 0, "tcp",
                                                                                          "round_robin")
    config = engine_config_from_args(args)
    assert (config.scheduler.max_num_batched_tokens, config.scheduler.max_num_seqs, config.cache.block_size,
            config.cache.kv_cache_memory_bytes) == (1024, 64, 32, 2 * 2**30)
    # flags given with a value other than their default win over the file
    args = _up_args(["--config", str(path), "--max-num-seqs", "7", "--routing", "least_loaded"])
    assert engine_config_from_args(args).scheduler.max_num_seqs == 7 and args.routing == "least_loaded"


def test_cluster_file_prices_reach_the_frontend_and_flags_win(tmp_path):
    """``serving.price_per_hour`` (live cost, docs/monitoring.md): every worker's or per pool; the frontend
    of ``pdserve up`` gets them as ``--price-per-hour``, unless that flag is given."""
    from pdserve.server.monitor_args import monitor_args_to_argv, monitor_options_from_args

    path = tmp_path / "cluster.yaml"
    path.write_text("model: smollm2-135m\nserving: {price_per_hour: {prefill: 2.99, decode: 1.79}}\n")
    args = _up_args(["--config", str(path)])
    assert args.price_per_hour == ["prefill=2.99", "decode=1.79"]
    assert dict(monitor_options_from_args(args).prices) == {"prefill": 2.99, "decode": 1.79}
    assert monitor_args_to_argv(args) == ["--price-per-hour", "prefill=2.99", "--price-per-hour", "decode=1.79"]
    path.write_text("model: smollm2-135m\nserving: {price_per_hour: 0.08}\n")
    assert _up_args(["--config", str(path)]).price_per_hour == ["0.08"]
    assert _up_args(["--config", str(path), "--price-per-hour", "1.5"]).price_per_hour == ["1.5"]


def test_cluster_file_errors_name_the_key(tmp_path):
    for text, words in (("model: m\nserving: {mode: both}\n", "mode"),
                        ("model: m\nserving: {prefil: 1}\n", "prefil"),
                        ("model: m\nengine: {max_seqs: 1}\n", "max_seqs"),
                        ("model: m\nengine: {quantization: bogus}\n", "quantization must be one of .*'bogus'"),
                        ("model: m\nserving: {pools: {decode: {max_seqs: 3}}}\n", "serving.pools.decode"),
                        ("model: m\nplanning: {hardwre: h200}\n", "hardwre"),
                        ("model: m\nserving: {price_per_hour: {gpu: 1}}\n", "price_per_hour"),
                        ("model: m\nserving: {price_per_hour: -1}\n", "price_per_hour"),
                        ("model: m\nnotes: {}\n", "notes"),
                        ("engine: {}\n", "model")):
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(ValueError, match=words):
            cluster_file.load(path)


def test_planner_best_cluster_file_deploys_the_simulated_layout(tmp_path):
    """A file as ``pdserve plan`` writes it: ``pdserve up --config`` starts the layout the simulator ran."""
    from pdserve.sim.cluster import ClusterSpec, PoolSpec, load_cluster

    spec = ClusterSpec("smollm2-135m", "disaggregated", prefill=PoolSpec("h100-sxm", 2, max_num_batched_tokens=8192),
                       decode=PoolSpec("h200", 3, 2, max_num_seqs=256), routing="least_loaded",
                       extra={"goodput_rps": 12.5})
    path = spec.dump(tmp_path / "best-cluster.yaml")
    assert load_cluster(path) == spec
    args = _up_args(["--config", str(path)])
    assert args.planned is None  # predicted: gives no cost, so nothing is shown beside the live one
    with_cost = replace(spec, extra={"price_per_hour": 9.0, "cost_per_mtok": {"output_per_mtok": 0.2}})
    planned = json.loads(_up_args(["--config", str(with_cost.dump(tmp_path / "b.yaml"))]).planned)
    assert planned == {"price_per_hour": 9.0, "cost_per_mtok": {"output_per_mtok": 0.2}}
    bad = replace(spec, extra={"price_per_hour": "nine"})
    with pytest.raises(ValueError, match="b2.yaml: predicted: .*price_per_hour"):
        _up_args(["--config", str(bad.dump(tmp_path / "b2.yaml"))])
    assert (args.prefill, args.decode, args.colocated, args.routing) == (2, 3, 0, "least_loaded")
    assert args.model == "smollm2-135m"
    for pool, expected in (("prefill", (8192, 128)), ("decode", (2048, 256))):
        s = engine_config_from_args(args, **args.pool_settings.get(pool, {})).scheduler
        assert (s.max_num_batched_tokens, s.max_num_seqs) == expected


def test_cores_are_split_evenly_between_workers():
    from pdserve.cluster.local import split_cores

    assert split_cores([0, 1], 1) == ["0,1"]  # the colocated baseline gets every core
    assert split_cores([0, 1], 2) == ["0", "1"]  # a prefill + decode pair, one core each
    assert split_cores([0, 1], 3) == ["0", "1", "0"]
    assert split_cores([0, 1, 2, 3, 4], 2) == ["0,1", "2,3,4"]


def test_per_pool_engine_settings_reach_their_workers(tmp_path):
    """``serving.pools`` of a cluster file set each pool's workers' engine; flags win."""
    from pdserve.cluster.local import LocalCluster
    from pdserve.sim.cluster import ClusterSpec, PoolSpec

    spec = ClusterSpec("smollm2-135m", "disaggregated", prefill=PoolSpec("h100-sxm", 1, max_num_batched_tokens=8192,
                                                                           max_num_seqs=16),
                       decode=PoolSpec("h100-sxm", 2, max_num_batched_tokens=512, max_num_seqs=200,
                                       enable_chunked_prefill=False))
    path = spec.dump(tmp_path / "best-cluster.yaml")
    engine = add_engine_flags(argparse.ArgumentParser())

    def worker_settings(argv_up, role):
        cluster = LocalCluster(_up_args(argv_up))
        try:
            known, _ = engine.parse_known_args(cluster.worker_argv(0, role, None, tmp_path / "r.json")[3:])
        finally:
            cluster.tmpdir.rmdir()
        return known.max_num_batched_tokens, known.max_num_seqs, known.enable_chunked_prefill

    assert worker_settings(["--config", str(path)], "prefill") == (8192, 16, True)
    assert worker_settings(["--config", str(path)], "decode") == (512, 200, False)
    assert worker_settings(["--config", str(path), "--max-num-seqs", "7"], "decode") == (512, 7, False)


def test_quantization_from_a_cluster_file_reaches_the_workers(tmp_path):
    """``engine: {quantization: none}`` is passed to every worker; ``--quantization`` on the command line wins."""
    path = tmp_path / "cluster.yaml"
    path.write_text("model: smollm2-135m\nengine: {quantization: none}\nserving: {mode: disaggregated}\n")

    def worker_quantization(argv_up, role):
        return _worker_engine_args(argv_up, role, tmp_path).quantization

    assert worker_quantization(["--config", str(path)], "prefill") == "none"
    assert worker_quantization(["--config", str(path)], "decode") == "none"
    assert worker_quantization(["--config", str(path), "--quantization", "q4_0"], "decode") == "q4_0"
    assert worker_quantization([], "decode") == "auto"


def test_up_with_a_bad_cluster_file_says_which_key(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "bad.yaml"
    path.write_text("model: smollm2-135m\nserving: {modde: colocated}\n")
    run = subprocess.run([sys.executable, "-m", "pdserve.cli", "up", "--config", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2
    assert "unknown field `modde`" in run.stderr and "Traceback" not in run.stderr


def test_ray_backend_from_a_cluster_file_and_flags(tmp_path):
    """`serving: {backend: ray}` and `--ray`: the address, each pool's placement, connector auto unless named; a
    pool the placement names wrong is a clear error; auto runs the controller. (The cluster itself: tests/e2e/test_e2e_ray.py.)"""
    from pdserve.cluster.ray_launcher import Placement, RayCluster

    path = tmp_path / "cluster.yaml"
    path.write_text("model: smollm2-135m\nserving:\n  backend: ray\n  prefill: 2\n  ray:\n    address: 10.1.2.3:6379\n"
                    "    strategy: SPREAD\n    pools:\n      prefill: {num_cpus: 4, num_gpus: 1, resources: {h100: 1}}\n"
                    "      decode: {label_selector: {accelerator: h200}}\n")
    args = _up_args(["--config", str(path)])
    assert (args.ray, args.ray_strategy, args.kv_connector, args.mode, args.prefill) == \
        ("10.1.2.3:6379", "SPREAD", "auto", "disaggregated", 2)
    assert args.ray_placements["prefill"] == Placement(4, 1, {"h100": 1})
    assert args.ray_placements["prefill"].bundle() == {"CPU": 4, "GPU": 1, "h100": 1}
    assert args.ray_placements["decode"].label_selector == {"accelerator": "h200"}
    pool = RayCluster(args)._plan()[0]
    worker_args = RayCluster(args)._worker_args(pool, "prefill-0")
    assert worker_args[:6] == ["--role", "prefill", "--kv-connector", "auto", "--worker-id", "prefill-0"]
    args = _up_args(["--ray", "--kv-connector", "tcp", "--no-kv-layerwise"])
    assert (args.ray, args.kv_connector, args.mode) == ("", "tcp", "auto")  # the default, as without Ray
    assert "--no-kv-layerwise" in RayCluster(args)._worker_args(RayCluster(args)._plan()[0], "prefill-0")
    assert _up_args([]).kv_connector == "shm"  # the local launcher's default is unchanged
    with pytest.raises(ValueError, match="unknown pool 'prefil'"):
        _up_args(["--ray", "--ray-placement", '{"prefil": {"num_cpus": 2}}'])
    # auto on Ray: the pools as given, the controller and path choice in the frontend (roles and time move,
    # not cores: actors are not pinned)
    from pdserve.cluster.local import frontend_argv
    args = _up_args(["--ray", "--mode", "auto", "--prefill", "2"])
    assert [p.name for p in RayCluster(args)._plan()] == ["prefill", "decode"] and args.prefill == 2
    argv = frontend_argv(args, ["--ray-address", "x", "--ray-namespace", "y"])
    assert "--elastic" in argv and argv[argv.index("--elastic-initial") + 1] == "split"
    path.write_text("model: smollm2-135m\nserving: {backend: ray, ray: {pools: {decode: {num_cpu: 2}}}}\n")
    with pytest.raises(ValueError, match="num_cpu"):
        _up_args(["--config", str(path)])


def test_kv_cache_dtype_reaches_every_worker_and_the_simulator_once(tmp_path):
    """``engine: {kv_cache_dtype: fp8}`` (or ``pdserve up --kv-cache-dtype fp8``) is passed to every worker, and
    the simulator reads the same setting (planning.kv_dtype follows it); a file that says two things, or a pool
    with another KV dtype than its peers, is refused; int8 is refused naming what is supported."""
    from pdserve.cli import build_parser
    from pdserve.sim.cluster import ClusterSpec

    def worker_kv_dtype(argv_up, role):
        return _worker_engine_args(argv_up, role, tmp_path).kv_cache_dtype

    path = tmp_path / "cluster.yaml"
    path.write_text("model: smollm2-135m\nengine: {kv_cache_dtype: fp8}\nplanning: {hardware: h100-sxm}\n")
    assert worker_kv_dtype(["--config", str(path)], "prefill") == worker_kv_dtype(["--config", str(path)],
                                                                                  "decode") == "fp8"
    assert worker_kv_dtype(["--kv-cache-dtype", "fp8"], "decode") == "fp8"
    assert worker_kv_dtype([], "prefill") == "auto"
    spec = ClusterSpec.from_file(cluster_file.load(path))
    assert spec.kv_dtype == "fp8"
    written = spec.to_file()  # as `pdserve plan` writes it: the engine's setting, no second name
    assert written.engine["kv_cache_dtype"] == "fp8" and written.planning.kv_dtype is None
    assert ClusterSpec.from_file(cluster_file.parse(cluster_file.msgspec.to_builtins(written))).kv_dtype == "fp8"
    assert ClusterSpec.from_file(cluster_file.parse({"model": "m", "planning": {"hardware": "h100-sxm"}})).kv_dtype \
        == "bf16"

    for text, words in (("engine: {kv_cache_dtype: fp8}\nplanning: {kv_dtype: bf16}\n", "contradicts"),
                        ("planning: {kv_dtype: fp8}\n", "contradicts"),
                        ("serving: {pools: {prefill: {kv_cache_dtype: fp8}}}\n", "differs between pools"),
                        ("engine: {kv_cache_dtype: int8}\n", r"one of \('auto', 'fp8'\).*per-token scales")):
        path.write_text("model: m\n" + text)
        with pytest.raises(ValueError, match=words):
            cluster_file.load(path)
    with pytest.raises(SystemExit):  # argparse: "invalid choice: 'int8' (choose from auto, fp8)"
        build_parser().parse_args(["worker", "--kv-cache-dtype", "int8"])
