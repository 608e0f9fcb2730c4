"""GroupNorm patchers: sdkernels::group_norm in place of diffusers' GroupNorm (+ SiLU) pairs, in priority order.

  resnet_gn_silu    ResnetBlock2D: norm1 + SiLU, and norm2 + SiLU unless scale_shift comes between, each one op
  norm_out_gn_silu  conv_norm_out + conv_act at the end of a UNet, VAE encoder or decoder: one op
  group_norm        every other nn.GroupNorm (attention blocks, Transformer2DModel.norm, ...): the op without SiLU

Every patched forward runs the module's original forward when autograd must record it or autocast is on
(``must_run_original``), and for inputs the op does not take (not 3 to 5 dims, not floating point); inputs the
op takes but its kernels do not (fp64, odd strides) run on the op's reference path, with one warning.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import banded
from ..linear_groups import project
from ..ops.bias_add import add_bias_residual_
from ..ops.group_norm import group_norm
from ..patch import (Patcher, bind_forward, must_run_original, original_forward, register, restore_child, swap_child,
                     unbind_forward, why_not_plain)


def _op_takes(x) -> bool:
    return isinstance(x, torch.Tensor) and 3 <= x.dim() <= 5 and x.is_floating_point()


def _fused_norm(norm: nn.GroupNorm, x: torch.Tensor, silu: bool, shift=None) -> torch.Tensor:
    return group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu=silu, shift=shift)


def _named(model: nn.Module, cls: type):
    return ((name, m) for name, m in model.named_modules() if isinstance(m, cls))


# ---- resnet_gn_silu: diffusers ResnetBlock2D ------------------------------------------------------------------

def _resnet_block_class():
    try:
        from diffusers.models.resnet import ResnetBlock2D
    except ImportError:
        return None
    return ResnetBlock2D


# The names ResnetBlock2D.forward uses (its code's co_names) in the diffusers versions _resnet_forward mirrors:
# 0.27 to 0.36, and 0.37 to 0.42 where the only change is that conv_shortcut's input is made contiguous in
# training only (same values). Another forward (0.26's LoRA scale, a future change) leaves the blocks alone.
_MIRRORED_FORWARD_NAMES = tuple(frozenset(names) for names in (
    ("ValueError", "chunk", "contiguous", "conv1", "conv2", "conv_shortcut", "deprecate", "downsample", "dropout",
     "get", "len", "nonlinearity", "norm1", "norm2", "output_scale_factor", "shape", "skip_time_act",
     "time_emb_proj", "time_embedding_norm", "torch", "upsample"),
    ("ValueError", "chunk", "contiguous", "conv1", "conv2", "conv_shortcut", "deprecate", "downsample", "dropout",
     "get", "len", "nonlinearity", "norm1", "norm2", "output_scale_factor", "shape", "skip_time_act",
     "time_emb_proj", "time_embedding_norm", "torch", "training", "upsample"),
))


def _resnet_forward(self, input_tensor, temb, *args, **kwargs):
    """diffusers' ResnetBlock2D.forward (0.42.1), step for step, with norm1 + SiLU (and norm2 + SiLU unless the
    time embedding is scale_shift) as one fused op each, conv1's bias and the time embedding added as norm2 reads
    its input, and conv2's bias, the shortcut and 1 / output_scale_factor added in one pass over conv2's output.
    Whatever the fused path does not cover, including the deprecated ``scale`` argument and scale_shift without
    temb (an error), goes to the original forward."""
    norm1, norm2 = self.norm1, self.norm2
    if (args or kwargs or not _op_takes(input_tensor)
            or (self.time_embedding_norm == "scale_shift" and temb is None)
            or must_run_original(input_tensor, temb, norm1.weight, norm1.bias, norm2.weight, norm2.bias)):
        return original_forward(self)(input_tensor, temb, *args, **kwargs)
    conv1, conv2 = self.conv1, self.conv2  # once each: a submodule lookup is a Python call (Module.__getattr__)
    if (banded.wants_bands(self, input_tensor) and _bands_fit(self)
            and (temb is None or temb.dtype == input_tensor.dtype)):  # (the bands add temb in place)
        return banded.resnet_forward(self, input_tensor, temb)

    hidden_states = _fused_norm(norm1, input_tensor, silu=True)

    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # diffusers: upsample_nearest_nhwc fails with large batches
            input_tensor = input_tensor.contiguous()
            hidden_states = hidden_states.contiguous()
        input_tensor = self.upsample(input_tensor)
        hidden_states = self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor = self.downsample(input_tensor)
        hidden_states = self.downsample(hidden_states)

    bias_joined = False  # whether temb holds conv1's bias already
    if self.time_emb_proj is not None:
        if not self.skip_time_act:
            temb = shared_silu(self.nonlinearity, temb)
        temb, bias_joined = _project_time_embedding(self, hidden_states, temb)

    shift = None
    if bias_joined or _folds_bias_into_temb(self, hidden_states, temb):
        # conv1's bias joins the time embedding, and both join norm2's input as it is read (a per-(sample, channel)
        # shift): no pass over the activation for either (PyTorch adds a conv's bias in a strided pass of its own)
        hidden_states = conv_without_bias(conv1, hidden_states)
        if not bias_joined:
            temb = temb + conv1.bias[:, None, None]
        if temb.shape[0] == hidden_states.shape[0]:
            shift = temb.flatten(1)
    elif (temb is None and self.time_embedding_norm != "scale_shift"
          and _conv_bias_foldable(conv1, hidden_states)):
        # no time embedding (the VAE's blocks): conv1's bias alone is norm2's shift, broadcast over the batch
        hidden_states = conv_without_bias(conv1, hidden_states)
        shift = conv1.bias.expand(hidden_states.shape[0], -1)
    else:
        hidden_states = conv1(hidden_states)

    if self.time_embedding_norm == "scale_shift":  # scale and shift sit between norm2 and the SiLU
        time_scale, time_shift = torch.chunk(temb, 2, dim=1)
        hidden_states = norm2(hidden_states)
        hidden_states = hidden_states * (1 + time_scale) + time_shift
        hidden_states = self.nonlinearity(hidden_states)
    else:  # "default", or a VAE block's "group" (no time embedding there): norm2 right before the SiLU
        if self.time_embedding_norm == "default" and temb is not None and shift is None:
            hidden_states = _add_into_fresh(hidden_states, temb)
        hidden_states = _fused_norm(norm2, hidden_states, silu=True, shift=shift)

    hidden_states = self.dropout(hidden_states)
    shortcut_done = False
    if (conv3x3_takes(conv2, hidden_states)  # the conv3x3 patcher took conv2: the shortcut joins its epilogue
            and not (conv2._forward_hooks or conv2._forward_pre_hooks)):  # (hooks: conv2 is called)
        input_tensor, shortcut_done = _shortcut(self, input_tensor), True
        if (input_tensor.dtype == hidden_states.dtype
                and input_tensor.shape == (hidden_states.shape[0], conv2.out_channels, *hidden_states.shape[2:])):
            return conv_plus_residual(conv2, hidden_states, input_tensor, 1.0 / self.output_scale_factor)
    bias_joins_shortcut = _conv_bias_foldable(conv2, hidden_states)
    if bias_joins_shortcut:
        hidden_states = conv_without_bias(conv2, hidden_states)
    else:
        hidden_states = conv2(hidden_states)

    if not shortcut_done:
        input_tensor = _shortcut(self, input_tensor)

    if bias_joins_shortcut and _epilogue_takes(hidden_states, input_tensor):
        # conv2's bias, the shortcut and the output scale in one pass over conv2's own output
        return add_bias_residual_(hidden_states, conv2.bias, input_tensor, 1.0 / self.output_scale_factor)
    if bias_joins_shortcut:
        hidden_states = hidden_states + conv2.bias[:, None, None]
    out = _add_into_fresh(hidden_states, input_tensor)
    if self.output_scale_factor != 1.0:  # (x / 1.0 == x: eager's division there only copies)
        out = out.div_(self.output_scale_factor)  # out is ours: conv2's output or a fresh sum
    return out


# The last time embedding shared_silu saw: (weak reference to it, its version counter, silu of it).
_last_silu = [None, -1, None]


def shared_silu(nonlinearity: nn.Module, temb: torch.Tensor) -> torch.Tensor:
    """nonlinearity(temb), computed once for all the UNet's ResNet blocks: each applies SiLU to the same time
    embedding (22 identical launches per SD1.5 step), so the result for the last tensor seen is kept while it is
    that very tensor (a weak reference, not an id: ids are reused) with the same version counter (no in-place
    change since). Under CUDA-graph capture the blocks then share the one captured SiLU; a flat graph
    (sdkernels.flat) records each block's SiLU, and flat's backend merges them into one (so that the time-embedding
    projections' linear group sees one input). Any other nonlinearity, or a call autograd must record, runs as
    is."""
    # (torch.compile traces neither weak references nor version counters, and fuses the SiLU anyway; an inference
    # tensor has no version counter to check)
    if type(nonlinearity) is not nn.SiLU or nonlinearity.inplace:
        return nonlinearity(temb)
    if torch.compiler.is_compiling():  # (dynamo cannot trace is_inference())
        return nonlinearity(temb)
    if temb.is_inference() or must_run_original(temb):
        return nonlinearity(temb)
    return _kept_silu(temb, nonlinearity)


def _kept_silu(temb: torch.Tensor, silu) -> torch.Tensor:
    ref, version, result = _last_silu
    if ref is not None and ref() is temb and version == temb._version:
        return result
    result = silu(temb)
    _last_silu[:] = [weakref.ref(temb), temb._version, result]
    return result


def conv_without_bias(conv, x):
    """The conv patcher's conv_without_bias, imported on call: its module registers its patcher on import, which
    must come after this module's (the patchers' priority order, and with it the summary's)."""
    from .conv3x3 import conv_without_bias as run
    return run(conv, x)


def _conv_bias_foldable(conv, x) -> bool:
    """Whether the conv can run without its bias for the caller to add it later: a plain nn.Conv2d (no hooks, no
    subclass) with a bias of x's dtype (eager's add would not promote)."""
    if type(conv) is not nn.Conv2d or conv._forward_hooks or conv._forward_pre_hooks:
        return False
    bias = conv.bias  # once: a parameter lookup is a Python call (Module.__getattr__)
    return bias is not None and bias.dtype == x.dtype


def _project_time_embedding(block, hidden_states, temb):
    """(time_emb_proj(temb) as (N, C, 1, 1), whether conv1's bias is in it): the projection and the bias come from
    the model's shared_projections group in one GEMM for all blocks where it has them (linear_groups.project), when
    the bias may join the time embedding at all (_folds_bias_into_temb's conditions)."""
    conv1, time_emb_proj = block.conv1, block.time_emb_proj
    if (block.time_embedding_norm == "default" and _conv_bias_foldable(conv1, hidden_states)
            and temb.dtype == hidden_states.dtype):
        projected = project(time_emb_proj, temb, plus=conv1.bias)
        if projected.dtype == hidden_states.dtype:
            return projected[:, :, None, None], True
    return time_emb_proj(temb)[:, :, None, None], False


def _folds_bias_into_temb(block, hidden_states, temb) -> bool:
    """Whether conv1's bias can be added with the time embedding: "default" time embedding, a foldable bias, the
    time embedding of the activation's dtype."""
    return (temb is not None and block.time_embedding_norm == "default" and temb.dim() == 4
            and temb.dtype == hidden_states.dtype and _conv_bias_foldable(block.conv1, hidden_states))


def _shortcut(block, input_tensor):
    """The block's shortcut branch: its 1x1 conv (or other conv_shortcut) of the input, or the input itself."""
    if block.conv_shortcut is None:
        return input_tensor
    if block.training:
        input_tensor = input_tensor.contiguous()
    return block.conv_shortcut(input_tensor)


def conv3x3_takes(conv, x) -> bool:
    from .conv3x3 import takes  # imported on call, as conv_without_bias
    return takes(conv, x)


def conv_plus_residual(conv, x, residual, scale):
    from .conv3x3 import conv_plus_residual as run
    return run(conv, x, residual, scale)


def _epilogue_takes(conv_out, shortcut) -> bool:
    """Whether add_bias_residual_ can add bias and shortcut into the conv's fresh output (same dtype and shape; the
    same strides, which its kernel needs)."""
    return (conv_out._base is None and shortcut.dtype == conv_out.dtype and shortcut.shape == conv_out.shape
            and shortcut.stride() == conv_out.stride())


def _bands_fit(block) -> bool:
    """The blocks sdkernels.banded.resnet_forward mirrors: no resampling, no scale_shift, no active dropout, 3x3
    same convs and a pointwise shortcut (large VAE decoder blocks are all of these)."""
    return (block.upsample is None and block.downsample is None and block.time_embedding_norm != "scale_shift"
            and not (block.training and block.dropout.p > 0) and banded.is_same_conv3x3(block.conv1)
            and banded.is_same_conv3x3(block.conv2)
            and (block.conv_shortcut is None or banded.is_pointwise_conv(block.conv_shortcut)))


def _add_into_fresh(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh + other (the same bits as other + fresh), written into ``fresh`` (a conv's own output, which nothing
    else holds) where the sum keeps its dtype and shape: one full-size activation less at the block's peak and no
    allocation. Otherwise the out-of-place sum, as eager computes it."""
    broadcasts_into = other.dim() <= fresh.dim() and all(
        o in (1, f) for f, o in zip(reversed(fresh.shape), reversed(other.shape)))
    if fresh._base is None and fresh.dtype == other.dtype and broadcasts_into:  # (plain checks: torch.compile)
        return fresh.add_(other)
    return fresh + other


def _find_resnets(model):
    cls = _resnet_block_class()
    return _named(model, cls) if cls is not None else ()


def _resnet_why_not(block) -> Optional[str]:
    cls = _resnet_block_class()
    reason = why_not_plain(block, cls, "the block", hooks_matter=False)
    if reason:
        return reason
    if frozenset(cls.forward.__code__.co_names) not in _MIRRORED_FORWARD_NAMES:
        import diffusers
        return f"diffusers {diffusers.__version__}'s ResnetBlock2D.forward is not the one this patcher mirrors"
    parts = [(block.norm1, nn.GroupNorm, "norm1"), (block.nonlinearity, nn.SiLU, "nonlinearity")]
    if block.time_embedding_norm != "scale_shift":
        parts.append((block.norm2, nn.GroupNorm, "norm2"))
    for module, part_cls, what in parts:
        # Hooks matter: the fused path reads these modules' parameters instead of calling them.
        reason = why_not_plain(module, part_cls, what, hooks_matter=True)
        if reason:
            return reason
    return None


def _resnet_covers(block):
    # Under scale_shift norm2 stays a module call, so the group_norm patcher may still take it.
    return (block.norm1,) if block.time_embedding_norm == "scale_shift" else (block.norm1, block.norm2)


register(Patcher(
    name="resnet_gn_silu",
    find=_find_resnets,
    why_not=_resnet_why_not,
    apply=lambda block: bind_forward(block, _resnet_forward),
    restore=unbind_forward,
    covers=_resnet_covers,
))


# ---- norm_out_gn_silu: conv_norm_out + conv_act ---------------------------------------------------------------
# The pair is fused by giving conv_norm_out a GroupNorm + SiLU forward and swapping conv_act for an identity on
# its parent. That is safe only where the parent calls conv_act exactly right after conv_norm_out, as diffusers'
# UNet2DConditionModel, UNet2DModel and VAE Encoder/Decoder do (`sample = self.conv_norm_out(sample);
# sample = self.conv_act(sample)`); _why_not_pair_in_source checks this in the parent class's source. conv_act is
# swapped on the parent rather than patched, because diffusers before 0.28 hands every model the same nn.SiLU
# instance from get_activation: patching it would change every block that uses it.

def _norm_then_silu_forward(self, x):
    """conv_norm_out's forward while its parent's conv_act is an identity: GroupNorm and SiLU in one op."""
    if not _op_takes(x) or must_run_original(x, self.weight, self.bias):
        return F.silu(original_forward(self)(x))
    return _fused_norm(self, x, silu=True)


def _find_norm_out_pairs(model):
    for name, m in model.named_modules():
        if m._modules.get("conv_norm_out") is not None and m._modules.get("conv_act") is not None:
            yield name, m


def _norm_out_why_not(parent) -> Optional[str]:
    reason = (why_not_plain(parent.conv_norm_out, nn.GroupNorm, "conv_norm_out", hooks_matter=True)
              or why_not_plain(parent.conv_act, nn.SiLU, "conv_act", hooks_matter=True))
    return reason or _why_not_pair_in_source(type(parent))


def _norm_out_apply(parent) -> None:
    bind_forward(parent.conv_norm_out, _norm_then_silu_forward)
    swap_child(parent, "conv_act", nn.Identity())


def _norm_out_restore(parent) -> None:
    restore_child(parent, "conv_act")
    unbind_forward(parent.conv_norm_out)


def _is_self_attr(node, attr: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name)
            and node.value.id == "self")


def _assigned_call(stmt, attr: str):
    """(variable, call) if stmt is `variable = self.<attr>(...)`, else None."""
    if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)
            and isinstance(stmt.value, ast.Call) and _is_self_attr(stmt.value.func, attr)):
        return stmt.targets[0].id, stmt.value
    return None


def _norm_calls_ending(stmt, variable: str):
    """The conv_norm_out calls after which ``stmt`` ends with `variable = self.conv_norm_out(...)` on every path
    (one assignment, or an if/else whose every branch ends so), or None."""
    found = _assigned_call(stmt, "conv_norm_out")
    if found:
        return [found[1]] if found[0] == variable else None
    if isinstance(stmt, ast.If) and stmt.body and stmt.orelse:
        branches = [_norm_calls_ending(stmt.body[-1], variable), _norm_calls_ending(stmt.orelse[-1], variable)]
        return None if None in branches else branches[0] + branches[1]
    return None


@functools.lru_cache(maxsize=None)
def _why_not_pair_in_source(cls: type) -> Optional[str]:
    """None when, in the source of the class that defines cls.forward, every `self.conv_act` is a statement
    `v = self.conv_act(v)` right after `v = self.conv_norm_out(...)`, every conv_norm_out call is such a one, and
    no method but __init__ and forward names either; otherwise why the pair cannot be fused."""
    owner = next(c for c in cls.__mro__ if "forward" in vars(c))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(owner)))
    except (OSError, TypeError, SyntaxError) as e:
        return f"cannot read {owner.__name__}'s source to check how it calls conv_act ({e})"
    paired = set()  # ids of the Call nodes in verified pairs
    for method in tree.body[0].body:
        if not isinstance(method, ast.FunctionDef) or method.name == "__init__":
            continue
        names = [n for n in ast.walk(method) if _is_self_attr(n, "conv_act") or _is_self_attr(n, "conv_norm_out")]
        if names and method.name != "forward":
            return f"{owner.__name__}.{method.name} uses conv_act or conv_norm_out outside forward"
        if method.name != "forward":
            continue
        for node in ast.walk(method):
            for block in (getattr(node, key, None) for key in ("body", "orelse", "finalbody")):
                if not isinstance(block, list):
                    continue
                for i, stmt in enumerate(block):
                    act = _assigned_call(stmt, "conv_act")
                    if not act:
                        continue
                    variable, call = act
                    norms = _norm_calls_ending(block[i - 1], variable) if i > 0 else None
                    if (norms is None or call.keywords or len(call.args) != 1
                            or not (isinstance(call.args[0], ast.Name) and call.args[0].id == variable)):
                        return f"{owner.__name__}.forward calls conv_act other than right after conv_norm_out"
                    paired.update(id(c) for c in [call] + norms)
        parents = {id(child): node for node in ast.walk(method) for child in ast.iter_child_nodes(node)}
        for name in names:
            parent = parents[id(name)]
            in_pair = isinstance(parent, ast.Call) and parent.func is name and id(parent) in paired
            as_test = isinstance(parent, ast.If) and parent.test is name  # `if self.conv_norm_out:`
            if not (in_pair or (as_test and name.attr == "conv_norm_out")):
                return (f"{owner.__name__}.forward uses self.{name.attr} (line {name.lineno} of the class) "
                        "outside a conv_norm_out -> conv_act pair")
    if not paired:
        return f"{owner.__name__}.forward has no conv_norm_out -> conv_act pair"
    return None


register(Patcher(
    name="norm_out_gn_silu",
    find=_find_norm_out_pairs,
    why_not=_norm_out_why_not,
    apply=_norm_out_apply,
    restore=_norm_out_restore,
    covers=lambda parent: (parent.conv_norm_out,),
))


# ---- group_norm: every other nn.GroupNorm ---------------------------------------------------------------------

def _norm_forward(self, x):
    if not _op_takes(x) or must_run_original(x, self.weight, self.bias):
        return original_forward(self)(x)
    return _fused_norm(self, x, silu=False)


register(Patcher(
    name="group_norm",
    find=lambda model: _named(model, nn.GroupNorm),
    # Hooks do not matter: nn.Module.__call__ still runs them around the replaced forward.
    why_not=lambda norm: why_not_plain(norm, nn.GroupNorm, "the norm", hooks_matter=False),
    apply=lambda norm: bind_forward(norm, _norm_forward),
    restore=unbind_forward,
))
