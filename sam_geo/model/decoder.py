"""SAM's mask decoder rearranged for the CPU: the same function, fewer multiply-adds.

segment-anything's ``MaskDecoder`` copies the tile's image embedding once per prompt and
runs every prompt's 4,096 image tokens through the full projections of its
``TwoWayTransformer``: on a CPU that per-prompt work over the image tokens, not the
image encoder, is the main cost of prompted and automatic segmentation.
:class:`FactorizedMaskDecoder` computes the same logits and IoU predictions from the
same modules and weights, with the algebra reordered so that

* what does not depend on the prompt is computed once per image embedding (the first
  layer's key, value and query projections of the image tokens, when the dense prompt
  is SAM's constant "no mask" embedding, as for point and box prompts) and cached;
* the attentions whose image tokens differ per prompt go through the few (7 or so)
  prompt tokens instead of projecting 4,096 image tokens: with ``W_k``, ``W_v``, ``W_q``,
  ``W_o`` one head's slices of the projection weights and ``x`` the image tokens,

  - token-to-image: ``softmax(q W_k x^T) (x W_v^T + b_v) = softmax((q W_k) x^T) x W_v^T + b_v``
    (the key bias adds one constant per row of scores, which softmax ignores; the rows
    of a softmax sum to one, which carries ``b_v`` out);
  - image-to-token: ``softmax((x W_q^T + b_q) k^T) v W_o^T = softmax(x (W_q^T k^T) + b_q k^T) (v W_o^T)``,

  so a head's products over the image tokens are (4,096 x 256) by (256 x prompt tokens)
  instead of (4,096 x 256) by (256 x 128) projections followed by the attention.

With a box prompt (7 tokens) this is about half the multiply-adds of the official
transformer per prompt. The output upscaling (two transposed convolutions, a channel
LayerNorm and GELUs over each prompt's image tokens) runs channels-last
(:class:`ChannelsLastUpscaling`), and, where the caller keeps a prompt's mask only in
a window of the logits grid (``logits_windows``: a box prompt's mask is kept within
the box grown by half its size), only over that window: every step of the upscaling
is local (a 2 x 2 stride-2 transposed convolution maps one image token to 2 x 2
outputs, the norm and GELUs act per pixel), so the logits inside the window are the
official ones and those outside are set to :data:`OUTSIDE_WINDOW_LOGIT`.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from sam_geo.model.lowrank import LowRankTokens, TileProducts


OUTSIDE_WINDOW_LOGIT = -1000.0
"""Mask logit given to the low-res cells outside a prompt's ``logits_windows`` entry
(certain background)."""


def _token_window(
    window: list[int], origin: tuple[int, int], hw: tuple[int, int], cell: int = 4
) -> tuple[int, int, int, int]:
    """A ``(row0, col0, row1, col1)`` window of logits cells (end-exclusive) rounded out
    to whole image tokens (``cell`` logits cells a side) and clipped to the ``hw``
    (rows, cols) tokens starting at token ``origin``; empty where they do not meet."""
    row0, col0, row1, col1 = window
    o_r, o_c = origin
    h, w = hw
    return (max(o_r, row0 // cell), max(o_c, col0 // cell),
            min(o_r + h, -(-row1 // cell)), min(o_c + w, -(-col1 // cell)))


def _prompt_self_attention(layer: nn.Module, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
    """The first step of segment-anything's ``TwoWayAttentionBlock``: self-attention of
    the prompt tokens (b, n, c), then ``norm1`` (the first layer skips the positional
    encoding and the residual)."""
    if layer.skip_first_layer_pe:
        queries = layer.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + layer.self_attn(q=q, k=q, v=queries)
    return layer.norm1(queries)


class ChannelsLastUpscaling(nn.Module):
    """SAM's ``MaskDecoder.output_upscaling`` (transposed conv, LayerNorm2d, GELU,
    transposed conv, GELU) on channels-last tensors, with the same modules and weights.

    oneDNN's CPU transposed convolutions are about 40 times faster on channels-last
    input (MobileSAM, bf16, 2 cores: 1.5 ms against 58 ms for 4 prompts), and the
    channel LayerNorm becomes a plain ``layer_norm`` over the last dimension of the
    NHWC view (the same mean and variance over channels as ``LayerNorm2d``).
    """

    def __init__(self, upscaling: nn.Sequential) -> None:
        super().__init__()
        self.conv1, self.norm, self.act1, self.conv2, self.act2 = upscaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x.contiguous(memory_format=torch.channels_last))
        nhwc = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.norm.weight, self.norm.bias, self.norm.eps)
        return self.act2(self.conv2(self.act1(nhwc.permute(0, 3, 1, 2))))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, n, heads * d) -> (b, heads, n, d)."""
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).transpose(1, 2)


def _head_weights(linear: nn.Linear, heads: int) -> torch.Tensor:
    """A projection's weight (heads * d, c) as (heads, d, c): one (d, c) slice per head."""
    out_dim, in_dim = linear.weight.shape
    return linear.weight.reshape(heads, out_dim // heads, in_dim)


def token_to_image(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment-anything's ``Attention(q, k, v)`` for few query tokens ``q`` (b, n, c)
    against many image tokens ``k``, ``v`` (b or 1, L, c), without projecting the image
    tokens: the query is carried into image-token space through ``W_k`` and the
    attention-weighted image tokens back through ``W_v``. Returns (b, n, c)."""
    heads = attn.num_heads
    b, n, _ = q.shape
    qh = _heads(attn.q_proj(q), heads)  # (b, h, n, d)
    scale = 1.0 / math.sqrt(qh.shape[-1])
    q_in_image = torch.einsum("bhnd,hdc->bhnc", qh, _head_weights(attn.k_proj, heads))
    scores = (q_in_image.reshape(b, heads * n, -1) * scale) @ k.transpose(1, 2)  # (b, h*n, L)
    weighted = (scores.softmax(dim=-1) @ v).reshape(b, heads, n, -1)  # (b, h, n, c)
    out = torch.einsum("bhnc,hdc->bhnd", weighted, _head_weights(attn.v_proj, heads))
    out = out + attn.v_proj.bias.reshape(heads, 1, -1)
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, -1))


def token_to_image_projected(
    attn: nn.Module, q: torch.Tensor, k_proj: torch.Tensor, v_proj: torch.Tensor
) -> torch.Tensor:
    """``Attention(q, k, v)`` given the image tokens' key and value projections
    ``k_proj``, ``v_proj`` (1, L, internal) computed once for all prompts."""
    heads = attn.num_heads
    b, n, _ = q.shape
    qh = _heads(attn.q_proj(q), heads)
    out = F.scaled_dot_product_attention(qh, _heads(k_proj, heads), _heads(v_proj, heads))
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, -1))


def image_to_token(
    attn: nn.Module,
    image: torch.Tensor | None,
    k: torch.Tensor,
    v: torch.Tensor,
    residual: torch.Tensor,
    image_q_proj: torch.Tensor | None = None,
) -> torch.Tensor:
    """``residual + Attention(image, k, v)`` for many image query tokens ``image``
    (b or 1, L, c) against few prompt tokens ``k``, ``v`` (b, n, c). The image tokens
    are not projected: the prompt keys are carried into image-token space through
    ``W_q`` and the values through ``W_o``, so the products over the image tokens are
    (L, c) by (c, heads * n). ``image_q_proj`` (1, L, internal), when given instead of
    ``image``, is the image tokens' query projection computed once for all prompts.
    Returns (b, L, c)."""
    heads = attn.num_heads
    b, n, _ = k.shape
    kh = _heads(attn.k_proj(k), heads)  # (b, h, n, d)
    vh = _heads(attn.v_proj(v), heads)
    scale = 1.0 / math.sqrt(kh.shape[-1])
    # Scores are laid out (b, h*n, L), image tokens last: the softmax over each head's
    # n tokens then runs along rows of length L, which vectorizes (a softmax over a last
    # dimension of 7 does not).
    if image_q_proj is not None:
        # Block-diagonal keys (b, h*n, h*d): one product gives every head's scores.
        d = kh.shape[-1]
        blocks = kh.new_zeros(b, heads, n, heads, d)
        index = torch.arange(heads, device=kh.device)
        blocks[:, index, :, index, :] = kh.transpose(0, 1) * scale
        scores = blocks.reshape(b, heads * n, heads * d) @ image_q_proj.transpose(1, 2)
    elif image is not None:
        wq = _head_weights(attn.q_proj, heads)  # (h, d, c)
        key_in_image = torch.einsum("bhnd,hdc->bhnc", kh, wq).reshape(b, heads * n, -1) * scale  # (b, h*n, c)
        bias = torch.einsum("bhnd,hd->bhn", kh, attn.q_proj.bias.reshape(heads, -1)).reshape(b, heads * n, 1)
        scores = torch.baddbmm(bias * scale, key_in_image, image.expand(b, -1, -1).transpose(1, 2))
    else:
        raise ValueError("image_to_token needs the image tokens or their query projection")
    weights = scores.reshape(b, heads, n, -1).softmax(dim=2).reshape(b, heads * n, -1).transpose(1, 2)  # (b, L, h*n)
    wo = attn.out_proj.weight.reshape(attn.out_proj.weight.shape[0], heads, -1)  # (c, h, d)
    # Each head's weights sum to one over its n tokens, so adding b_o / heads to every
    # row of the values adds b_o to the output.
    value_in_image = torch.einsum("bhnd,chd->bhnc", vh, wo) + attn.out_proj.bias / heads
    return torch.baddbmm(residual.expand(b, -1, -1), weights, value_in_image.reshape(b, heads * n, -1))


class FactorizedMaskDecoder(nn.Module):
    """A drop-in copy of segment-anything's ``MaskDecoder`` (same call, same outputs)
    that computes its transformer as described in this module's docstring.

    ``decoder`` is copied, not shared: the copy's weights are cast to ``dtype`` (bf16 runs
    outside autocast: autocast would re-cast weights and activations around every layer).
    The image embedding must have batch 1 (one tile, many prompts), as everywhere in
    sam-geo; other calls go to the official code path of the copy.

    ``context`` (image-embedding cells a side; None: the whole grid, the official
    outputs): with ``logits_windows``, each prompt's transformer runs on a square of
    ``context`` cells (or its window rounded up to 4 cells, where larger) centred on its
    window and clamped to the grid, instead of on all of them. SAM's token-to-image
    attention is global, so this is an approximation, not a rearrangement: on 458
    Banepa boxes, 16 cells gave masks at a median IoU of 0.984 with the exact ones
    (0.990 at 48; identical at 64, the whole grid) for a quarter of the decoder time.

    ``low_rank`` (float32 weights; calls with ``logits_windows`` and SAM's one "no mask"
    dense prompt, without ``context``): each prompt's image tokens are kept in the
    low-rank form of :mod:`sam_geo.model.lowrank` and materialised only in its window. The
    same outputs; on CPU about 0.7 times the time of the factorized path per box.
    """

    def __init__(
        self, decoder: nn.Module, dtype: torch.dtype = torch.float32, context: int | None = None,
        low_rank: bool = True,
    ) -> None:
        super().__init__()
        self.decoder = copy.deepcopy(decoder).to(dtype).eval()
        self.upscaling = ChannelsLastUpscaling(self.decoder.output_upscaling)
        if context is not None and context < 1:
            raise ValueError(f"context must be a positive number of image-embedding cells, got {context}")
        self.context = context
        # The low-rank path computes LayerNorm variances as E[x^2] - E[x]^2: float32 only.
        # (A float32 twin for bf16 weights measured no faster than their factorized path:
        # 11.4 against 11.3 ms per box, 4 per call, median of 6, 2 AMD EPYC cores.)
        self.low_rank = low_rank and dtype == torch.float32
        self._shared: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None
        self._tile: TileProducts | None = None

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        logits_windows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res mask logits (b, k, 256, 256) and IoU predictions (b, k): ``k`` 3 with
        ``multimask_output`` (SAM's masks 1-3), else 1 (mask 0), as the official decoder.

        ``logits_windows`` (b, 4) int, optional: per prompt ``(row0, col0, row1, col1)``
        cells of the low-res logits grid (end-exclusive; rounded out to whole image
        tokens, 4 cells) that are computed; the rest is :data:`OUTSIDE_WINDOW_LOGIT`.
        """
        # Inputs in this copy's dtype; SAM's one "no mask" dense embedding, expanded over
        # the prompts, is cast once and expanded again (a cast of the expanded view would
        # copy it per prompt, and the paths below recognise it by its zero batch stride).
        dtype = self.decoder.iou_token.weight.dtype
        dense = dense_prompt_embeddings
        shared_dense = dense.shape[0] == 1 or dense.stride(0) == 0
        dense_prompt_embeddings = dense[:1].to(dtype).expand_as(dense) if shared_dense else dense.to(dtype)
        image_embeddings, image_pe = image_embeddings.to(dtype), image_pe.to(dtype)
        sparse_prompt_embeddings = sparse_prompt_embeddings.to(dtype)
        if (self.low_rank and not self.context and logits_windows is not None and shared_dense
                and image_embeddings.shape[0] == 1):
            return self._predict_low_rank(image_embeddings, image_pe, sparse_prompt_embeddings,
                                          dense_prompt_embeddings[:1], logits_windows, multimask_output)
        if image_embeddings.shape[0] != 1:
            return self.decoder(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings,
                                multimask_output)
        if logits_windows is not None and self.context:
            masks, iou = self._predict_in_context(image_embeddings, image_pe, sparse_prompt_embeddings,
                                                  dense_prompt_embeddings, logits_windows)
        else:
            masks, iou = self._predict(image_embeddings, image_pe, sparse_prompt_embeddings,
                                       dense_prompt_embeddings, logits_windows)
        keep = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, keep], iou[:, keep]

    def _predict_low_rank(
        self,
        image: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        logits_windows: torch.Tensor,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer with the image tokens in low-rank form (:mod:`sam_geo.model.lowrank`),
        the final attention for the output tokens used only: (masks, iou) as
        :meth:`forward` returns them. ``dense`` is the one dense prompt embedding of all
        prompts (1, c, h, w)."""
        d = self.decoder
        transformer = d.transformer
        b = sparse.shape[0]
        _, c, h, w = image.shape
        tokens = self._prompt_tokens(sparse)
        tile = self._tile_products(image, dense, image_pe)
        heads = transformer.layers[0].cross_attn_image_to_token.num_heads
        image_tokens = LowRankTokens.of_tile(tile, b, len(transformer.layers) * (heads * tokens.shape[1] + 2))
        queries = tokens
        for index, layer in enumerate(transformer.layers):
            queries = self._low_rank_block(layer, index, queries, tokens, image_tokens)
        # Final token-to-image attention: each query token attends on its own, so only
        # the IoU token and the mask tokens returned are computed.
        used = list(range(2, 1 + d.num_mask_tokens)) if multimask else [1]
        subset = [0] + used
        queries, query_pe = queries[:, subset], tokens[:, subset]
        attn = transformer.final_attn_token_to_image
        attn_out = self._low_rank_token_to_image(attn, queries + query_pe, image_tokens, "final")
        queries = transformer.norm_final_attn(queries + attn_out)
        hyper_in = torch.stack(
            [d.output_hypernetworks_mlps[m - 1](queries[:, k + 1, :]) for k, m in enumerate(used)], dim=1
        )
        iou = d.iou_prediction_head(queries[:, 0, :])
        iou = iou[:, 1:] if multimask else iou[:, :1]
        masks = self._low_rank_masks(image_tokens, hyper_in, logits_windows, (h, w))
        return masks, iou

    def _tile_products(self, image: torch.Tensor, dense: torch.Tensor, image_pe: torch.Tensor) -> TileProducts:
        """The :class:`TileProducts` of the image embedding plus the dense prompt (each
        (1, c, h, w)), kept while the same tensors come back (most calls: a tile's
        prompts come in several batches)."""
        kept = self._tile
        if kept is not None and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(kept.inputs, (image, dense, image_pe))
        ):
            return kept
        src = (image + dense).flatten(2)[0].T.contiguous()  # (L, c), tokens in row-major pixel order
        self._tile = TileProducts(src, image_pe.flatten(2)[0].T.contiguous(), inputs=(image, dense, image_pe))
        return self._tile

    @staticmethod
    def _low_rank_token_to_image(
        attn: nn.Module, q: torch.Tensor, image_tokens: LowRankTokens, tag: str
    ) -> torch.Tensor:
        """``Attention(q, tokens + pe, tokens)`` for prompt queries ``q`` (b, n, c) against
        image tokens in low-rank form. Returns (b, n, c)."""
        heads = attn.num_heads
        b, n, _ = q.shape
        qh = _heads(attn.q_proj(q), heads)
        scores = image_tokens.scores(attn.k_proj, qh / math.sqrt(qh.shape[-1]), f"{tag}k")
        out = image_tokens.weighted_sum(attn.v_proj, scores.softmax(dim=3), f"{tag}v")
        return attn.out_proj(out.transpose(1, 2).reshape(b, n, -1))

    def _low_rank_block(
        self, layer: nn.Module, index: int, queries: torch.Tensor, query_pe: torch.Tensor,
        image_tokens: LowRankTokens,
    ) -> torch.Tensor:
        """segment-anything's ``TwoWayAttentionBlock.forward`` with the image tokens in
        low-rank form (updated in place); returns the new prompt queries."""
        queries = _prompt_self_attention(layer, queries, query_pe)
        attn_out = self._low_rank_token_to_image(
            layer.cross_attn_token_to_image, queries + query_pe, image_tokens, f"t2i{index}")
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))

        attn = layer.cross_attn_image_to_token
        heads = attn.num_heads
        b, n, _ = queries.shape
        kh = _heads(attn.k_proj(queries + query_pe), heads)
        vh = _heads(attn.v_proj(queries), heads)
        scores = image_tokens.scores(attn.q_proj, kh / math.sqrt(kh.shape[-1]), f"i2t{index}q")
        weights = scores.softmax(dim=2).reshape(b, heads * n, -1)
        image_tokens.plus_head_values(vh, attn.out_proj, weights, f"i2t{index}o")
        image_tokens.layer_norm(layer.norm4, f"n4.{index}")
        return queries

    def _low_rank_masks(
        self,
        image_tokens: LowRankTokens,
        hyper_in: torch.Tensor,
        logits_windows: torch.Tensor,
        grid: tuple[int, int],
    ) -> torch.Tensor:
        """Mask logits (b, masks, 4h, 4w) from image tokens in low-rank form: each
        prompt's tokens are materialised in its logits window only (see
        :meth:`_masks_in_windows`); ``grid`` is the image-token grid's (rows, cols)."""
        h, w = grid
        b = hyper_in.shape[0]
        cell = 4
        out = hyper_in.new_full((b, hyper_in.shape[1], cell * h, cell * w), OUTSIDE_WINDOW_LOGIT)
        for i, window in enumerate(logits_windows.tolist()):
            row0, col0, row1, col1 = _token_window(window, (0, 0), (h, w))
            if row1 <= row0 or col1 <= col0:
                continue
            index = (torch.arange(row0, row1)[:, None] * w + torch.arange(col0, col1)[None, :]).flatten()
            tokens = image_tokens.at(i, index).reshape(1, row1 - row0, col1 - col0, -1).permute(0, 3, 1, 2)
            out[i, :, cell * row0 : cell * row1, cell * col0 : cell * col1] = self._masks(tokens, hyper_in[i : i + 1])[0]
        return out

    def _predict(
        self,
        image: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        logits_windows: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        transformer = self.decoder.transformer
        b = sparse.shape[0]
        _, c, h, w = image.shape
        tokens, src = self._tokens_and_source(image, sparse, dense)
        # (1 or b, L, c), token rows in row-major pixel order
        src = src.flatten(2).transpose(1, 2).contiguous()
        pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        queries, keys = tokens, src
        for index, layer in enumerate(transformer.layers):
            shared = self._shared_projections(layer, src, pe) if index == 0 and src.shape[0] == 1 else None
            queries, keys = self._block(layer, queries, keys, tokens, pe, shared)
        hyper_in, iou = self._outputs(queries, keys, tokens, pe)
        image_tokens = keys.expand(b, -1, -1).reshape(b, h, w, c).permute(0, 3, 1, 2)  # channels-last view
        if logits_windows is None:
            masks = self._masks(image_tokens, hyper_in)
        else:
            masks = self._masks_in_windows(image_tokens, hyper_in, logits_windows)
        return masks, iou

    def _prompt_tokens(self, sparse: torch.Tensor) -> torch.Tensor:
        """(b, n, c): SAM's output tokens (IoU, then masks) followed by the sparse prompt."""
        d = self.decoder
        output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
        return torch.cat((output_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse), dim=1)

    def _tokens_and_source(
        self, image: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt tokens (b, n, c) (SAM's output tokens, then the sparse prompt) and
        the image tokens plus dense prompt (1 or b, c, h, w). SAM's dense prompt for "no
        mask" is one embedding expanded over batch and space: then every prompt starts
        from the same image tokens, kept once."""
        tokens = self._prompt_tokens(sparse)
        if dense.shape[0] == 1 or dense.stride(0) == 0:
            dense = dense[:1]
        return tokens, image + dense

    def _outputs(
        self, queries: torch.Tensor, keys: torch.Tensor, tokens: torch.Tensor, pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """After the transformer's layers: its final token-to-image attention, then the
        hypernetwork outputs (b, masks, 32) and IoU predictions (b, masks)."""
        d = self.decoder
        transformer = d.transformer
        attn_out = token_to_image(transformer.final_attn_token_to_image, queries + tokens, keys + pe, keys)
        queries = transformer.norm_final_attn(queries + attn_out)
        mask_tokens_out = queries[:, 1 : 1 + d.num_mask_tokens, :]
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(d.output_hypernetworks_mlps)], dim=1
        )
        return hyper_in, d.iou_prediction_head(queries[:, 0, :])

    def _predict_in_context(
        self,
        image: torch.Tensor,
        image_pe: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        logits_windows: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_predict` with each prompt's transformer restricted to a square of
        image tokens around its logits window: ``context`` tokens a side, or the window
        rounded up to a multiple of 4 tokens where it is larger, clamped to the grid."""
        d = self.decoder
        b = sparse.shape[0]
        _, c, h, w = image.shape
        cell = 4
        tokens, src = self._tokens_and_source(image, sparse, dense)
        src = src.permute(0, 2, 3, 1)  # (1 or b, h, w, c)
        pe = image_pe.permute(0, 2, 3, 1)  # (1, h, w, c)
        shared_full = None
        if src.shape[0] == 1:
            layer = self.decoder.transformer.layers[0]
            shared_full = [p.reshape(1, h, w, -1) for p in self._shared_projections(
                layer, src.reshape(1, h * w, c).contiguous(), pe.reshape(1, h * w, c).contiguous())]
        windows = logits_windows.tolist()
        origins, sides = [], []
        for window in windows:
            t_r0, t_c0, t_r1, t_c1 = _token_window(window, (0, 0), (h, w))
            side = max(self.context, -(-max(t_r1 - t_r0, t_c1 - t_c0, 1) // 4) * 4)
            side_r, side_c = min(side, h), min(side, w)
            o_r = min(max(0, (t_r0 + t_r1 - side_r) // 2), h - side_r)
            o_c = min(max(0, (t_c0 + t_c1 - side_c) // 2), w - side_c)
            origins.append((o_r, o_c))
            sides.append((side_r, side_c))
        n_masks = d.num_mask_tokens
        masks = image.new_full((b, n_masks, cell * h, cell * w), OUTSIDE_WINDOW_LOGIT)
        iou = image.new_zeros((b, n_masks))
        for side_r, side_c in sorted(set(sides)):
            rows = [i for i in range(b) if sides[i] == (side_r, side_c)]

            def crop(x: torch.Tensor) -> torch.Tensor:
                parts = [x[min(i, x.shape[0] - 1), origins[i][0] : origins[i][0] + side_r,
                           origins[i][1] : origins[i][1] + side_c] for i in rows]
                return torch.stack(parts).reshape(len(rows), side_r * side_c, -1)

            shared = None if shared_full is None else tuple(crop(p) for p in shared_full)
            group_masks, group_iou = self._transform_and_predict(
                tokens[rows], crop(src), crop(pe), shared, (side_r, side_c),
                [(windows[i], origins[i]) for i in rows], (cell * h, cell * w))
            masks[rows] = group_masks
            iou[rows] = group_iou
        return masks, iou

    def _transform_and_predict(
        self,
        tokens: torch.Tensor,
        src: torch.Tensor,
        pe: torch.Tensor,
        shared: tuple[torch.Tensor, ...] | None,
        hw: tuple[int, int],
        windows: list[tuple[list[int], tuple[int, int]]],
        full: tuple[int, int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer and outputs for prompts that share one crop size ``hw``
        (image-token rows, cols): ``src``, ``pe`` and ``shared`` are each prompt's crop
        (b, rows * cols, ...); ``windows`` pairs each prompt's logits window with its
        crop's origin (token row, col); ``full`` is the whole logits grid (rows, cols)."""
        transformer = self.decoder.transformer
        b = tokens.shape[0]
        h, w = hw
        c = src.shape[-1]
        queries, keys = tokens, src
        for index, layer in enumerate(transformer.layers):
            queries, keys = self._block(layer, queries, keys, tokens, pe, shared if index == 0 else None)
        hyper_in, iou = self._outputs(queries, keys, tokens, pe)
        image_tokens = keys.reshape(b, h, w, c).permute(0, 3, 1, 2)
        return self._masks_in_windows(image_tokens, hyper_in, [wd for wd, _ in windows],
                                      [o for _, o in windows], full), iou

    def _masks(self, image_tokens: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
        """Mask logits (b, masks, 4h, 4w): the hypernetwork outputs (b, masks, 32)
        against the upscaled image tokens (b, c, h, w)."""
        upscaled = self.upscaling(image_tokens)
        b, c, h, w = upscaled.shape
        return (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)

    def _masks_in_windows(
        self,
        image_tokens: torch.Tensor,
        hyper_in: torch.Tensor,
        logits_windows: torch.Tensor | list[list[int]],
        origins: list[tuple[int, int]] | None = None,
        full: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """:meth:`_masks` computed only inside each prompt's window of the logits grid.

        ``image_tokens`` (b, c, h, w) may be a crop per prompt whose first token sits at
        ``origins[i]`` (row, col) of the image-token grid; ``full`` is then the logits
        grid's (rows, cols). Without them the tokens are the whole grid."""
        b, _, h, w = image_tokens.shape
        cell = 4  # logits cells per image token along each axis (two stride-2 upscalings)
        rows, cols = full or (cell * h, cell * w)
        out = image_tokens.new_full((b, hyper_in.shape[1], rows, cols), OUTSIDE_WINDOW_LOGIT)
        windows = logits_windows.tolist() if isinstance(logits_windows, torch.Tensor) else logits_windows
        for i, window in enumerate(windows):
            o_r, o_c = origins[i] if origins is not None else (0, 0)
            t_row0, t_col0, t_row1, t_col1 = _token_window(window, (o_r, o_c), (h, w))
            if t_row1 <= t_row0 or t_col1 <= t_col0:
                continue
            window = image_tokens[i : i + 1, :, t_row0 - o_r : t_row1 - o_r, t_col0 - o_c : t_col1 - o_c]
            out[i, :, cell * t_row0 : cell * t_row1, cell * t_col0 : cell * t_col1] = self._masks(
                window, hyper_in[i : i + 1]
            )[0]
        return out

    def _shared_projections(self, layer: nn.Module, src: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The first layer's image-token projections (key and value of token-to-image,
        query of image-to-token), computed once per image embedding and dense prompt:
        the last ones are kept and reused while the same image tokens come back."""
        if self._shared is not None and self._shared[0].shape == src.shape and torch.equal(self._shared[0], src):
            return self._shared[1]
        with_pe = src + pe
        projections = (
            layer.cross_attn_token_to_image.k_proj(with_pe),
            layer.cross_attn_token_to_image.v_proj(src),
            layer.cross_attn_image_to_token.q_proj(with_pe),
        )
        self._shared = (src.clone(), projections)
        return projections

    @staticmethod
    def _block(
        layer: nn.Module,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        shared: tuple[torch.Tensor, ...] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """segment-anything's ``TwoWayAttentionBlock.forward``, step for step."""
        queries = _prompt_self_attention(layer, queries, query_pe)

        q = queries + query_pe
        keys_with_pe = None if shared is not None else keys + key_pe
        if shared is not None:
            attn_out = token_to_image_projected(layer.cross_attn_token_to_image, q, shared[0], shared[1])
        else:
            attn_out = token_to_image(layer.cross_attn_token_to_image, q, keys_with_pe, keys)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))

        q = queries + query_pe
        image_q_proj = shared[2] if shared is not None else None
        keys = image_to_token(layer.cross_attn_image_to_token, keys_with_pe, q, queries, keys, image_q_proj)
        return queries, layer.norm4(keys)
