"""Path choice (router/path.py): a prompt mostly cached on its decode worker is prefilled there; a long prompt
beside a decode batch under a step target goes to the prefill worker; a local prefill that would stall the
decodes past the ITL objective is refused; the prediction rides on the route."""
from __future__ import annotations

from pdserve.hashing import hash_block_tokens
from pdserve.router import InstanceTracker, InstanceView, Router, make_policy
from pdserve.router.path import PathChooser

BS = 16


def _router(chooser, decode_kw=None, prefill_kw=None):
    tracker = InstanceTracker()
    tracker.add(InstanceView("p", "prefill", num_blocks=100, num_free_blocks=100, prefill_token_s=5e-4,
                             **(prefill_kw or {})))
    d = {"num_running": 8, "decode_step_s": 0.03, "step_target_s": 0.04, **(decode_kw or {})}
    tracker.add(InstanceView("d", "decode", num_blocks=100, num_free_blocks=100, prefill_token_s=5e-4, **d))
    return Router(tracker, make_policy("least_loaded"), path_chooser=chooser), tracker


def test_long_prompt_beside_a_decode_batch_goes_remote():
    router, _ = _router(PathChooser())
    prompt = list(range(2000))
    route = router.route(len(prompt), hash_block_tokens(prompt, BS), BS)
    # local: 20 tokens per 40 ms step beside the decodes (4 s); remote: 2000 x 0.5 ms (1 s) + transfer
    assert route.prefill_id == "p" and route.prediction.is_remote
    assert route.prediction.remote_ttft_s < route.prediction.local_ttft_s


def test_mostly_cached_prompt_is_prefilled_locally():
    prompt = list(range(2000))
    hashes = hash_block_tokens(prompt, BS)
    router, tracker = _router(PathChooser())
    tracker.apply_kv_events("d", stored=hashes[:-1], evicted=[])  # all but the last block cached on d
    route = router.route(len(prompt), hashes, BS)
    assert route.prefill_id is None and not route.prediction.is_remote


def test_idle_decode_worker_prefills_locally_when_as_fast():
    router, _ = _router(PathChooser(), decode_kw={"num_running": 0})
    prompt = list(range(300))
    route = router.route(len(prompt), hash_block_tokens(prompt, BS), BS)
    assert route.prefill_id is None  # same speed per token, no transfer: local


def test_local_prefill_that_would_stall_decodes_past_the_itl_bound_is_refused():
    prompt = list(range(500))
    hashes = hash_block_tokens(prompt, BS)
    loose, _ = _router(PathChooser(local_preference=1.2), decode_kw={"step_target_s": None})
    tight, _ = _router(PathChooser(itl_bound_s=0.1, local_preference=1.2), decode_kw={"step_target_s": None})
    # without a step target the decodes wait for the whole 500-token prefill step (~0.28 s): fine without an
    # ITL objective (local is within 1.2x of remote), refused with a 100 ms one
    assert loose.route(len(prompt), hashes, BS).prefill_id is None
    assert tight.route(len(prompt), hashes, BS).prefill_id == "p"


def test_parked_prefill_worker_is_not_routed_to():
    router, tracker = _router(PathChooser())
    tracker.instances["p"].cores = ()
    prompt = list(range(2000))
    route = router.route(len(prompt), hash_block_tokens(prompt, BS), BS)
    assert route.prefill_id is None and route.decode_id == "d"
