"""A diffusers attention processor that runs sdkernels::flash_attention where AttnProcessor2_0 runs SDPA.

``SdkernelsAttnProcessor`` mirrors diffusers' ``AttnProcessor2_0`` (0.42.1) step for step: spatial_norm, 4-D
inputs, attention_mask through ``attn.prepare_attention_mask``, group_norm, norm_cross, norm_q / norm_k,
to_out (projection and dropout), residual_connection and rescale_output_factor. Projections are called as modules
(through ``linear_groups.project``: one GEMM for the layers that share an input, where the projection patchers
grouped them; the module itself otherwise), so LoRA-wrapped layers keep working. Without norm_q / norm_k the op reads q, k and v in
their (B, tokens, heads * head_dim) projection layout and writes that layout, so no transpose is ever made.

Like AttnProcessor2_0 it scales scores by head_dim ** -0.5 (diffusers installs AttnProcessor2_0 only where
``attn.scale`` is that). Where autograd must record the attention or autocast is on, it calls SDPA exactly as
AttnProcessor2_0 does (our op has no backward).

Where SDPA was measured faster for an input signature (sdkernels.tuning), the op runs it, with the host cost of a
remembered selection (sdkernels.dispatch) and AttnProcessor2_0's own output handling (no copy).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear_groups import project
from .ops.attention import flash_attention
from .patch import must_run_original




def _deprecated_scale_argument(args, kwargs) -> None:
    if len(args) > 0 or kwargs.get("scale", None) is not None:
        from diffusers.utils import deprecate
        deprecate("scale", "1.0.0", "The `scale` argument is deprecated and will be ignored. Please remove it, as "
                  "passing it will raise an error in the future. `scale` should directly be passed while calling "
                  "the underlying pipeline component i.e., via `cross_attention_kwargs`.")


class SdkernelsAttnProcessor:
    """AttnProcessor2_0 with sdkernels::flash_attention in place of F.scaled_dot_product_attention."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args,
                 **kwargs) -> torch.Tensor:
        _deprecated_scale_argument(args, kwargs)

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            # (batch, heads, 1 or query length, key length): broadcast by the op, as by SDPA
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = project(attn.to_q, hidden_states)

        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        key = project(attn.to_k, encoder_hidden_states)
        value = project(attn.to_v, encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        if attn.norm_q is None and attn.norm_k is None and not must_run_original(query, key, value):
            hidden_states = self._attention(query, key, value, attention_mask, attn.heads, head_dim)
        else:
            hidden_states = self._per_head_attention(attn, query, key, value, attention_mask, batch_size, head_dim)
        hidden_states = hidden_states.to(query.dtype)

        # linear proj
        hidden_states = attn.to_out[0](hidden_states)
        # dropout
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)

        if attn.residual_connection:
            hidden_states = hidden_states + residual

        if attn.rescale_output_factor != 1.0:  # x / 1.0 is x, bit for bit: no pass over the output for it
            hidden_states = hidden_states / attn.rescale_output_factor

        return hidden_states

    @staticmethod
    def _attention(query, key, value, attention_mask, heads, head_dim):
        """sdkernels::flash_attention on the (B, tokens, heads * head_dim) projections (which runs SDPA where that was
        measured faster, as AttnProcessor2_0 would)."""
        return flash_attention(query, key, value, head_dim ** -0.5, attention_mask, heads=heads)

    @staticmethod
    def _per_head_attention(attn, query, key, value, attention_mask, batch_size, head_dim):
        """The (B, heads, tokens, head_dim) path: for norm_q / norm_k, which normalize per head, and for SDPA."""
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if must_run_original(query, key, value):
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                 is_causal=False)
        else:
            out = flash_attention(query, key, value, head_dim ** -0.5, attention_mask)
        return out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)

