"""The sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral, Qwen2-MoE): a router picks each token's top-k
experts, and the experts run batched over the step's tokens (plus Qwen2-MoE's shared expert, every token,
scaled by a sigmoid gate).

Routing is grouped by expert, not by token: the step's (token, expert) pairs are sorted by expert, each
active expert runs its gate/up and down GEMMs once over all the tokens routed to it (a loop over the
experts that received tokens, never over tokens), and the weighted results are added back per token.
Expert weights are stacked per layer, ``w13`` (num_experts, 2 * moe_intermediate, hidden) holding
[gate | up] rows and ``w2`` (num_experts, hidden, moe_intermediate), so loading and dummy weights
fill two tensors instead of 3 x num_experts small ones. On CPU, ``pack()`` turns them into one oneDNN-packed
weight per expert and matrix, as ``Linear.pack`` does for the dense GEMMs.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from pdserve.model.arch import ModelArch
from pdserve.model.layers import Linear, can_pack_linear_weight, linear, pack_linear_weight, silu_and_mul


class SparseMoeBlock(nn.Module):
    """The router ``gate`` (a Linear, hidden -> num_experts) and the stacked experts ``w13``, ``w2``
    (until ``pack()``: then empty, the experts held packed); with ``shared_expert`` (a dense MLP module, the
    caller's), also ``shared_expert_gate`` (a Linear, hidden -> 1)."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype, shared_expert: nn.Module | None = None) -> None:
        super().__init__()
        self.top_k = arch.num_experts_per_tok
        self.renormalize = arch.norm_topk_prob
        num_experts, hidden, inter = arch.num_experts, arch.hidden_size, arch.moe_intermediate_size
        self.gate = Linear(hidden, num_experts, bias=False, dtype=dtype)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, inter, dtype=dtype), requires_grad=False)
        self._packed: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # per expert: w13, w2
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = Linear(hidden, 1, bias=False, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: (num_tokens, hidden) -> (num_tokens, hidden)."""
        topk_weights, topk_ids = route(self.gate(h), self.top_k, self.renormalize)  # (T, k) each
        w13, w2 = self._packed or (self.w13, self.w2)
        out = grouped_experts(h, w13, w2, topk_weights, topk_ids)  # (T, hidden)
        if self.shared_expert is not None:
            out += torch.sigmoid(self.shared_expert_gate(h)) * self.shared_expert(h)  # (T, 1) * (T, hidden)
        return out

    def pack(self) -> None:
        """Once the weights are final: each expert's matrices into oneDNN's layout (where ``linear`` packs;
        a no-op elsewhere), the stacked parameters freed."""
        if self._packed is not None or not can_pack_linear_weight(self.w13):
            return
        self._packed = ([pack_linear_weight(w) for w in self.w13], [pack_linear_weight(w) for w in self.w2])
        empty = self.w13.new_empty(0)
        self.w13, self.w2 = (nn.Parameter(empty, requires_grad=False) for _ in range(2))


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts (in float32), then each token's ``top_k`` of highest probability.
    router_logits: (num_tokens, num_experts). Returns weights (num_tokens, top_k) float32 (summing to 1
    per token when ``renormalize``) and expert ids (num_tokens, top_k) int64."""
    probs = torch.softmax(router_logits.float(), dim=-1)  # (T, E)
    weights, ids = torch.topk(probs, top_k, dim=-1)  # (T, k) each
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def grouped_experts(h: torch.Tensor, w13: torch.Tensor | Sequence[torch.Tensor],
                    w2: torch.Tensor | Sequence[torch.Tensor], topk_weights: torch.Tensor,
                    topk_ids: torch.Tensor) -> torch.Tensor:
    """sum over k of ``topk_weights[t, k] * expert[topk_ids[t, k]](h[t])`` for every token t, where an
    expert is ``down(silu(gate(x)) * up(x))``: one GEMM pair per expert that received tokens.

    h: (num_tokens, hidden); w13: (num_experts, 2 * inter, hidden); w2: (num_experts, hidden, inter) (or
    per-expert lists of packed weights); topk_weights, topk_ids: (num_tokens, top_k). One host sync (the
    per-expert counts)."""
    top_k = topk_ids.shape[1]
    num_experts = len(w13)
    flat_ids = topk_ids.flatten()  # (T * k,) pair p = token p // k, its (p % k)-th choice
    order = torch.argsort(flat_ids, stable=True)  # (T * k,) pairs grouped by expert
    token_of_pair = order // top_k  # (T * k,) the token each sorted pair reads
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()  # tokens per expert
    x = h[token_of_pair]  # (T * k, hidden), rows grouped by expert
    out = torch.empty_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        gate_up = linear(x[rows], w13[expert])  # (count, 2 * inter): [gate | up]
        out[rows] = linear(silu_and_mul(gate_up), w2[expert])  # (count, hidden)
        start += count
    out.mul_(topk_weights.flatten()[order].unsqueeze(1).to(out.dtype))  # (T * k, hidden)
    return torch.zeros_like(h).index_add_(0, token_of_pair, out)  # (T, hidden)


# ---- checkpoint names --------------------------------------------------------------------------------

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
_MIXTRAL_PROJS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def canonical_expert_names(weights: Iterable[tuple[str, torch.Tensor]], moe_intermediate_size: int
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """Checkpoint tensors with every MoE name in one form, ``model.layers.N.mlp.gate.weight`` and
    ``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`` (Qwen3-MoE's hub names):

    - Mixtral's ``block_sparse_moe.{gate,experts.E.w1,w3,w2}`` are renamed;
    - stacked tensors (``mlp.experts.gate_up_proj`` (E, 2 * inter, hidden) and ``mlp.experts.down_proj``
      (E, hidden, inter), transformers 5's in-memory layout) are split into per-expert views (no copy).
    Other tensors pass unchanged."""
    for name, tensor in weights:
        if ".block_sparse_moe." in name:
            name = name.replace(".block_sparse_moe.", ".mlp.")
            parts = name.split(".")  # model.layers.N.mlp.experts.E.w1.weight
            if len(parts) == 8 and parts[4] == "experts" and parts[6] in _MIXTRAL_PROJS:
                parts[6] = _MIXTRAL_PROJS[parts[6]]
                name = ".".join(parts)
        prefix, _, last = name.rpartition(".experts.")
        if last == "gate_up_proj" and tensor.dim() == 3:
            for e in range(tensor.shape[0]):
                yield f"{prefix}.experts.{e}.gate_proj.weight", tensor[e, :moe_intermediate_size]
                yield f"{prefix}.experts.{e}.up_proj.weight", tensor[e, moe_intermediate_size:]
        elif last == "down_proj" and tensor.dim() == 3:
            for e in range(tensor.shape[0]):
                yield f"{prefix}.experts.{e}.down_proj.weight", tensor[e]
        else:
            yield name, tensor
