"""SAM's mask decoder with its image-side attention reassociated: the same function, fewer operations.

SAM's two-way transformer attends between ``T`` prompt tokens (5 output tokens plus the clicks and
box corners, usually 6 to 10) and ``N`` image tokens (4096 for a 64x64 embedding). Computed as
written, each of its five cross-attentions projects all ``N`` image tokens through a 256 -> 128
matrix (queries, keys, values or the output), ten such projections per prompt. Attention is linear
in those projections, so each product can be taken in the other order through the ``T`` tokens:

- tokens attending to the image: ``softmax(Q_h (X W_k,h)^T)`` is ``softmax((Q_h W_k,h) X^T)``
  (the key bias adds a constant per row, which softmax ignores), and ``P_h (X W_v,h^T + b_v,h)`` is
  ``(P_h X) W_v,h^T + b_v,h`` (rows of ``P_h`` sum to one);
- the image attending to tokens: ``(X W_q,h^T + b_q,h) K_h^T`` is ``X (W_q,h^T K_h^T) + b_q,h K_h^T``,
  and the output projection folds into the tiny value matrix first: ``sum_h P_h (V_h W_o,h^T)``.

Every image-side product then has an inner or outer size of ``8 T`` (8 heads) instead of 128:
about half the arithmetic for a box, where the decoder spends most of its time on a CPU. The
result equals segment-anything's ``MaskDecoder`` up to float rounding (tested against it).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def tokens_to_image(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM ``Attention(q, k, v)`` for few queries ``(1, T, C)`` over many keys ``(1, N, C)``."""
    heads = attn.num_heads
    c = attn.internal_dim // heads
    t, dim = q.shape[1], q.shape[2]
    qh = attn.q_proj(q).reshape(1, t, heads, c).transpose(1, 2)  # (1, H, T, c)
    g = qh @ attn.k_proj.weight.reshape(heads, c, dim)  # (1, H, T, C): queries in key-input space
    scores = g.reshape(1, heads * t, dim) @ k.transpose(1, 2) / math.sqrt(c)  # (1, H*T, N)
    pooled = torch.softmax(scores, dim=-1) @ v  # (1, H*T, C)
    wv = attn.v_proj.weight.reshape(heads, c, dim).transpose(1, 2)  # (H, C, c)
    out = pooled.reshape(1, heads, t, dim) @ wv + attn.v_proj.bias.reshape(heads, 1, c)  # (1, H, T, c)
    return attn.out_proj(out.transpose(1, 2).reshape(1, t, heads * c))


def image_to_tokens(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SAM ``Attention(q, k, v)`` for many queries ``(1, N, C)`` over few keys ``(1, T, C)``."""
    heads = attn.num_heads
    c = attn.internal_dim // heads
    t, dim = k.shape[1], k.shape[2]
    kh = attn.k_proj(k).reshape(1, t, heads, c).transpose(1, 2)  # (1, H, T, c)
    wq = attn.q_proj.weight.reshape(heads, c, dim).transpose(1, 2)  # (H, C, c)
    m = (wq @ kh.transpose(2, 3)).permute(0, 2, 1, 3).reshape(1, dim, heads * t)  # (1, C, H*T)
    bias = (attn.q_proj.bias.reshape(1, heads, 1, c) @ kh.transpose(2, 3)).reshape(1, 1, heads * t)
    scores = (q @ m + bias) / math.sqrt(c)  # (1, N, H*T)
    n = q.shape[1]
    probs = torch.softmax(scores.reshape(1, n, heads, t), dim=-1).reshape(1, n, heads * t)
    vh = attn.v_proj(v).reshape(1, t, heads, c).transpose(1, 2)  # (1, H, T, c)
    wo = attn.out_proj.weight.reshape(dim, heads, c).permute(1, 2, 0)  # (H, c, C)
    u = (vh @ wo).reshape(1, heads * t, dim)  # values through the output projection, per head
    return probs @ u + attn.out_proj.bias


def _block(layer: nn.Module, queries: torch.Tensor, keys: torch.Tensor, query_pe: torch.Tensor,
           key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's ``TwoWayAttentionBlock`` with the two cross-attentions reassociated."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    queries = layer.norm1(queries)
    k = keys + key_pe
    queries = layer.norm2(queries + tokens_to_image(layer.cross_attn_token_to_image, queries + query_pe, k, keys))
    queries = layer.norm3(queries + layer.mlp(queries))
    keys = layer.norm4(keys + image_to_tokens(layer.cross_attn_image_to_token, k, queries + query_pe, queries))
    return queries, keys


def predict_masks(decoder: nn.Module, image_embeddings: torch.Tensor, image_pe: torch.Tensor,
                  sparse: torch.Tensor, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``MaskDecoder.predict_masks`` for one image: all mask logits ``(1, M, 4h, 4w)`` and IoUs ``(1, M)``."""
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)[None]
    tokens = torch.cat([tokens, sparse], dim=1)
    src = image_embeddings + dense
    _, dim, h, w = src.shape
    keys = src.flatten(2).transpose(1, 2)
    pos = image_pe.flatten(2).transpose(1, 2)
    transformer = decoder.transformer
    queries = tokens
    for layer in transformer.layers:
        queries, keys = _block(layer, queries, keys, tokens, pos)
    queries = queries + tokens_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + pos, keys)
    queries = transformer.norm_final_attn(queries)
    hyper = torch.stack([mlp(queries[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)
    return upscale_masks(decoder.output_upscaling, keys, h, w, hyper), decoder.iou_prediction_head(queries[:, 0])


def upscale_masks(upscaling: nn.Module, keys: torch.Tensor, h: int, w: int, hyper: torch.Tensor) -> torch.Tensor:
    """SAM's ``output_upscaling`` and mask product, computed per image token (no channel-first image).

    Both transposed convolutions have kernel 2 and stride 2, so every image token maps alone to its
    own 4x4 block of output pixels through a small per-token network (linear, layer norm, GELU,
    linear, GELU, then the dot product with each mask's hypernetwork vector). Computed that way on
    the ``(N, C)`` tokens the transformer returns, only the final masks are rearranged into images.

    Args:
        upscaling: ``Sequential(ConvTranspose2d, LayerNorm2d, GELU, ConvTranspose2d, GELU)``.
        keys: ``(1, h*w, C)`` image tokens.
        h: token rows.
        w: token columns.
        hyper: ``(1, M, C/8)`` mask vectors.

    Returns:
        ``(1, M, 4h, 4w)`` mask logits.
    """
    up1, norm, act1, up2, act2 = upscaling
    c1, c2 = up1.out_channels, up2.out_channels
    x = keys @ up1.weight.permute(0, 2, 3, 1).reshape(keys.shape[2], 4 * c1)  # (1, N, 4*c1): (a, b, channel)
    x = x.reshape(1, h * w, 4, c1) + up1.bias
    x = act1(torch.nn.functional.layer_norm(x, (c1,), norm.weight, norm.bias, norm.eps))
    x = x @ up2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)  # (1, N, 4, 4*c2): (a2, b2, channel)
    x = act2(x.reshape(1, h * w, 4, 4, c2) + up2.bias)
    m = hyper.shape[1]
    masks = x @ hyper.transpose(1, 2)[:, None, None]  # (1, N, 4, 4, M)
    masks = masks.reshape(1, h, w, 2, 2, 2, 2, m).permute(0, 7, 1, 3, 5, 2, 4, 6)  # (1, M, y, a, a2, x, b, b2)
    return masks.reshape(1, m, 4 * h, 4 * w)
