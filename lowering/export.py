"""torch.export of DLA language models: the full forward with dynamic batch and sequence
dimensions, and one generation step with the per-layer caches as pytree inputs and outputs."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.export import Dim


class LogitsModule(nn.Module):
    """``input_ids -> logits`` of a DLAForCausalLM (no cache): the graph a compiler wants."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids, use_cache=False).logits


class DecodeStepModule(nn.Module):
    """``(token [B, 1], caches) -> (logits [B, 1, V], new caches)``: one step of a generation loop."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, dla_cache: list):
        out = self.model(input_ids, dla_cache=dla_cache, use_cache=True)
        return out.logits, out.dla_cache


def export_forward(model: nn.Module, input_ids: Tensor, dynamic: bool = True) -> torch.export.ExportedProgram:
    """Export ``input_ids -> logits`` with dynamic batch and sequence length (>= 2: a length-1
    sequence is the decode step's job). The example needs B >= 2 and T >= 2: torch.export
    specialises a dimension it sees as 1."""
    if dynamic and min(input_ids.shape) < 2:
        raise ValueError(f"dynamic export needs an example with batch and length >= 2, got {tuple(input_ids.shape)}")
    shapes = {"input_ids": {0: Dim("batch", min=1, max=4096), 1: Dim("seq", min=2, max=1 << 20)}} \
        if dynamic else None
    return torch.export.export(LogitsModule(model).eval(), (input_ids,), dynamic_shapes=shapes)


def export_decode_step(model: nn.Module, batch_size: int = 2, dynamic: bool = True
                       ) -> torch.export.ExportedProgram:
    """Export one generation step; the batch dimension of the token and of every cache tensor is
    dynamic (the example needs batch_size >= 2). Example caches come from a short prefill."""
    if dynamic and batch_size < 2:
        raise ValueError("dynamic export needs an example batch_size >= 2 (a 1 would be specialised)")
    device = next(model.parameters()).device
    prompt = torch.zeros(batch_size, 2, dtype=torch.long, device=device)
    with torch.no_grad():
        cache = model(prompt, use_cache=True).dla_cache
    token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
    shapes = None
    if dynamic:
        batch = Dim("batch", min=1, max=4096)
        per_tensor = lambda t: {0: batch}
        shapes = {"input_ids": {0: batch},
                  "dla_cache": torch.utils._pytree.tree_map(per_tensor, cache)}
    return torch.export.export(DecodeStepModule(model).eval(), (token, cache), dynamic_shapes=shapes)
