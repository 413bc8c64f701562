"""Runs the model on a scheduled batch: builds the inputs as host lists, copies each tensor to the
device once, runs one forward pass, computes logits only where a token is sampled, and samples."""
from __future__ import annotations

from collections.abc import Callable

import torch

from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.sampler import Sampler
from pdserve.engine.scheduler import ScheduledChunk, SchedulerOutput
from pdserve.model.attention import build_metadata


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 device: torch.device) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler(device)

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, block_ids: dict[str, list[int]],
                on_layer: Callable[[int], None] | None = None) -> tuple[dict[str, int], dict[str, TokenLogprobs]]:
        """Compute every chunk of ``sched``; return the sampled token (and logprobs where asked) of each
        request whose chunk reaches the end of its tokens. ``on_layer(i)``: called once layer ``i``'s KV is
        written (layer-wise KV saves)."""
        # Prefill chunks (several tokens) first, then decodes: the layout attention expects.
        chunks = sorted(sched.chunks, key=lambda c: c.num_tokens == 1)
        input_ids: list[int] = []
        positions: list[int] = []
        sample_rows: list[int] = []
        sampled_chunks: list[ScheduledChunk] = []
        for chunk in chunks:
            end = chunk.start + chunk.num_tokens
            input_ids.extend(chunk.request.all_token_ids[chunk.start:end])
            positions.extend(range(chunk.start, end))
            if chunk.samples:
                sample_rows.append(len(input_ids) - 1)
                sampled_chunks.append(chunk)
        meta = build_metadata([(c.start, c.num_tokens, block_ids[c.request.request_id]) for c in chunks],
                              self.block_size, self.device)
        ids_t = torch.tensor(input_ids, dtype=torch.long).to(self.device)
        pos_t = torch.tensor(positions, dtype=torch.long).to(self.device)
        hidden = self.model(ids_t, pos_t, self.kv_caches, meta, on_layer)  # (num_tokens, hidden_size)
        if not sampled_chunks:
            return {}, {}
        rows = torch.tensor(sample_rows, dtype=torch.long).to(self.device)
        logits = self.model.logits(hidden.index_select(0, rows))  # (num_sampled, vocab), model dtype
        requests = [c.request for c in sampled_chunks]
        out = self.sampler(logits, requests)
        tokens = {r.request_id: t for r, t in zip(requests, out.token_ids)}
        logprobs = {r.request_id: lp for r, lp in zip(requests, out.logprobs) if lp is not None}
        return tokens, logprobs
