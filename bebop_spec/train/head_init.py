"""Starting points for a head: the target's last decoder layer, with `fc` passing h through.

init_from="last_layer": every MTP decoder layer starts as a copy of the target's last
decoder layer and the head's final norm as the target's final norm; fc = [0 | I] maps
(enorm(e), hnorm(h)) to hnorm(h), so the head first reads the hidden alone and learns to
use the next token's embedding from there (EAGLE-style initialisation).
"""

from __future__ import annotations

import torch
from torch import nn

_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")


@torch.no_grad()
def init_from_last_layer(head: nn.Module, target: nn.Module) -> nn.Module:
    """Copy the target's last decoder layer and final norm into every MTP layer of `head`
    and set fc to the hidden pass-through [0 | I]; returns `head` (changed in place)."""
    last = target.model.layers[-1]
    hidden = target.config.hidden_size
    for i in range(head.num_layers):
        _, _, fc, layer, norm = head.parts(i)
        for name in _LAYER_PARTS:
            getattr(layer, name).load_state_dict(getattr(last, name).state_dict())
        norm.load_state_dict(target.model.norm.state_dict())
        fc.weight.zero_()
        fc.weight[:, hidden:].copy_(torch.eye(hidden, dtype=fc.weight.dtype))
    return head
