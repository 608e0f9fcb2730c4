"""Projection patchers: linears that read one input run as one GEMM (sdkernels.linear_groups).

  qkv_projection      each self-attention's to_q, to_k and to_v (one input: the normalized hidden states)
  shared_projections  across a model: every cross-attention's to_k and to_v (the text states), and every ResnetBlock2D's
                      time_emb_proj (SiLU of the time embedding) with conv1's bias added in the same pass

They group only modules whose callers go through ``linear_groups.project``: attention run by our processor (the
attention patcher) and ResNet blocks run by the resnet_gn_silu forward; so they follow those patchers. A member's
weight becomes a view of its group's buffer (no memory added); ``unpatch`` gives each its own memory again. Models
under accelerate's offload hooks are left alone.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

from torch import nn

from ..linear_groups import LinearGroup, link
from ..patch import Patcher, patched_by, register
from .attention import _classes as _attention_classes
from .group_norm import _resnet_block_class

_GROUPS = "_sdkernels_linear_groups"


def _plain_linear(m) -> bool:
    return type(m) is nn.Linear


def _ours(attn) -> bool:
    return "attention" in patched_by(attn)


def _offloaded(model) -> bool:
    """accelerate's offload hooks move parameters between devices by replacing their memory: a group would then
    hold a copy of its members' weights on the GPU between calls."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def _group(module: nn.Module, groups: list) -> None:
    for group in groups:
        link(group)
    module.__dict__[_GROUPS] = groups


def _dissolve(module: nn.Module) -> None:
    for group in module.__dict__.pop(_GROUPS, ()):
        group.dissolve()


def _distinct(params) -> bool:
    present = [id(p) for p in params if p is not None]
    return len(present) == len(set(present))


# ---- qkv_projection ------------------------------------------------------------------------------------------------

def _find_attention(model):
    attention, _ = _attention_classes()
    if attention is None or _offloaded(model):
        return ()
    # (attention left by the attention patcher calls its projections itself: not a candidate)
    return ((name, m) for name, m in model.named_modules()
            if isinstance(m, attention) and not m.is_cross_attention and _ours(m))


def _qkv(attn) -> list:
    return [attn.to_q, attn.to_k, attn.to_v]


def _qkv_why_not(attn) -> Optional[str]:
    members = _qkv(attn)
    if not all(_plain_linear(m) for m in members):
        return "to_q, to_k or to_v is not a plain nn.Linear (e.g. LoRA-wrapped)"
    if len({(m.in_features, m.weight.dtype, m.weight.device, m.bias is None) for m in members}) != 1:
        return "to_q, to_k and to_v differ in input width, dtype, device or bias"
    if not _distinct([p for m in members for p in (m.weight, m.bias)]):
        return "to_q, to_k and to_v share parameters"
    return None


register(Patcher(
    name="qkv_projection", find=_find_attention, why_not=_qkv_why_not,
    apply=lambda attn: _group(attn, [LinearGroup("self-attention to_q/to_k/to_v", _qkv(attn))]),
    restore=_dissolve))


# ---- shared_projections ----------------------------------------------------------------------------------------------

def _cross_kv(model) -> list:
    attention, _ = _attention_classes()
    if attention is None:
        return []
    found = []
    for m in model.modules():
        if isinstance(m, attention) and m.is_cross_attention and _ours(m):
            found += [p for p in (m.to_k, m.to_v) if _plain_linear(p)]
    return found


def _time_projections(model) -> list:
    """(time_emb_proj, conv1's bias) of each ResnetBlock2D whose forward (resnet_gn_silu's) adds the two in one
    (sdkernels.patchers.group_norm._project_time_embedding): a "default" time embedding and a conv1 with a bias."""
    resnet = _resnet_block_class()
    if resnet is None:
        return []
    return [(block.time_emb_proj, block.conv1.bias) for block in model.modules()
            if isinstance(block, resnet) and "resnet_gn_silu" in patched_by(block)
            and _plain_linear(block.time_emb_proj) and block.time_embedding_norm == "default"
            and type(block.conv1) is nn.Conv2d and block.conv1.bias is not None]


def _by_kind(pairs) -> list:
    """Split (linear, extra) pairs into lists that can share one buffer."""
    kinds = defaultdict(list)
    for linear, extra in pairs:
        kinds[(linear.in_features, linear.weight.dtype, linear.weight.device, linear.bias is None)].append(
            (linear, extra))
    return [pairs for pairs in kinds.values() if len(pairs) >= 2]


def _shared_groups(model) -> list:
    groups = []
    for name, pairs in (("cross-attention to_k/to_v", [(m, None) for m in _cross_kv(model)]),
                        ("time_emb_proj (+ conv1 bias)", _time_projections(model))):
        for members in _by_kind(pairs):
            params = [p for linear, extra in members for p in (linear.weight, linear.bias, extra)]
            if _distinct(params):
                linears, extras = zip(*members)
                groups.append((name, list(linears), list(extras)))
    return groups


def _find_model(model):
    return [("(the model)", model)] if not _offloaded(model) and _shared_groups(model) else []


register(Patcher(
    name="shared_projections", find=_find_model,
    apply=lambda model: _group(model, [LinearGroup(name, linears, extras)
                                       for name, linears, extras in _shared_groups(model)]),
    restore=_dissolve))
