"""SAM's two-way transformer with every prompt's image tokens kept in low-rank form.

In segment-anything's ``TwoWayTransformer`` the 4,096 image tokens of a tile change per
prompt only through the image-to-token attentions (and the LayerNorms after them). Such
an attention adds to each image token a mix of a few vectors: ``heads x n`` rows (one per
head and prompt token, ``W_o`` times that token's value). So, after each layer, every
prompt's image tokens are

    tokens[j] = scale[j] * (gain * src[j]) + coef[j] @ rows

with ``src`` the tile's image tokens (shared by all prompts), ``gain`` a channel vector
(the product of the LayerNorm weights so far), ``scale`` one number per prompt and
token, and ``rows`` a few dozen per-prompt vectors (the attention values, and the
LayerNorms' weight and bias) mixed by ``coef`` (per prompt, token, row).
:class:`LowRankTokens` holds that form, and computes in it what the transformer needs
of the tokens, without materialising the (prompts, 4,096, 256) tensors:

* LayerNorm: the mean and variance of each token over channels, from the shared
  tokens' sums, their products with the rows (through the out-projection's per-head
  slices, so 16 numbers per head, not 256 channels) and the rows' Gram matrix;
* attention scores against a projection ``W`` of ``tokens + pe``: the shared part
  ``(gain * src) W^T`` and ``pe W^T`` are projected once per tile, the rows once per
  prompt;
* attention-weighted sums of ``W`` times the tokens, likewise.

The products over the 4,096 tokens then have inner sizes of 16 (a head) or the number
of rows (58 and 116 with a box prompt), not 256. The function is exactly the official
one, up to float rounding: the variance is ``E[x^2] - E[x]^2``, so this runs in float32
(:class:`~sam_geo.model.decoder.FactorizedMaskDecoder` uses it for float32 weights only).
Only the image tokens a caller asks for (a prompt's mask window) are ever
materialised (:meth:`LowRankTokens.at`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class TileProducts:
    """A tile's image tokens ``src`` and positional encodings ``pe`` (L, C), with the
    products of them that :class:`LowRankTokens` needs, computed once per tile under a
    key and reused by every prompt batch of that tile."""

    src: torch.Tensor
    pe: torch.Tensor
    inputs: tuple[torch.Tensor, ...] = ()  # what the caller made src and pe from, to recognise them
    _cache: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def get(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


@dataclass
class _HeadRows:
    """Rows ``gain * (W_o[:, head] v[head, token] + b_o / heads)``, one per head and prompt
    token, of an image-to-token attention with out-projection ``out_proj``."""

    values: torch.Tensor  # (b, heads, n, d) the prompt tokens' value projections
    out_proj: nn.Linear
    gain: torch.Tensor  # (C,)
    key: str  # names out_proj and gain for TileProducts

    def rows(self) -> torch.Tensor:
        """(b, heads * n, C)."""
        b, heads, n, d = self.values.shape
        w_o = self.out_proj.weight.reshape(-1, heads, d)  # (C, h, d)
        rows = torch.einsum("bhnd,chd->bhnc", self.values, w_o) + self.out_proj.bias / heads
        return (rows * self.gain).reshape(b, heads * n, -1)

    def dots_with_src(self, tile: TileProducts, src_gain: torch.Tensor, src_key: str) -> torch.Tensor:
        """(b, heads * n, L): each row dotted with each ``src_gain * src[j]``, through the
        out-projection's per-head slices (16 numbers a head, not 256 channels)."""
        b, heads, n, d = self.values.shape
        both = self.gain * src_gain
        # (heads, d + 1, L): the out-projection's per-head slices, then its bias / heads
        through_o = tile.get(("o", self.key, src_key), lambda: torch.cat([
            ((tile.src * both) @ self.out_proj.weight).T.reshape(heads, d, -1),
            (tile.src @ (self.out_proj.bias * both) / heads).expand(heads, 1, -1)], dim=1).contiguous())
        values = torch.cat([self.values, self.values.new_ones(b, heads, n, 1)], dim=3)
        return torch.einsum("bhnd,hdl->bhnl", values, through_o).reshape(b, heads * n, -1)


@dataclass
class _VectorRow:
    """One row shared by all prompts (a LayerNorm's weight or bias, times later gains)."""

    vector: torch.Tensor  # (C,)
    key: str

    def dots_with_src(self, tile: TileProducts, src_gain: torch.Tensor, src_key: str) -> torch.Tensor:
        """(1, 1, L)."""
        return tile.get(("v", self.key, src_key), lambda: (tile.src @ (self.vector * src_gain)).reshape(1, 1, -1))


@dataclass
class LowRankTokens:
    """The image tokens (b, L, C) of ``b`` prompts as ``scale[:, j, None] * (gain *
    src[j]) + coef[:, :, j] @ rows`` (see the module docstring), tokens last:

    * ``scale`` (b or 1, L);
    * ``rows`` (b, r, C), made of ``blocks`` in order (a block's rows are kept with
      their structure, for products with the shared tokens);
    * ``coef`` (b, r, L).
    """

    tile: TileProducts
    gain: torch.Tensor  # (C,)
    gain_key: str
    scale: torch.Tensor
    rows: torch.Tensor
    coef: torch.Tensor
    blocks: list[tuple[int, int, _HeadRows | _VectorRow]] = field(default_factory=list)  # (start, stop, block)

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, coef) with room to grow

    @classmethod
    def of_tile(cls, tile: TileProducts, b: int, capacity: int) -> LowRankTokens:
        """The tile's own tokens for ``b`` prompts (no prompt has changed them yet), with
        room for ``capacity`` rows (the blocks' rows are written in place, not concatenated)."""
        length, channels = tile.src.shape
        rows, coef = tile.src.new_empty(b, capacity, channels), tile.src.new_empty(b, capacity, length)
        tokens = cls(tile, tile.src.new_ones(channels), "", tile.src.new_ones(1, length), rows[:, :0], coef[:, :0])
        tokens._buffers = rows, coef
        return tokens

    @property
    def b(self) -> int:
        return self.rows.shape[0]

    def _append(self, block: _HeadRows | _VectorRow, rows: torch.Tensor, coef: torch.Tensor) -> None:
        start = self.rows.shape[1]
        stop = start + rows.shape[1]
        row_buffer, coef_buffer = self._buffers
        if stop > row_buffer.shape[1]:
            raise ValueError(f"LowRankTokens was made with room for {row_buffer.shape[1]} rows, {stop} are needed")
        row_buffer[:, start:stop] = rows
        coef_buffer[:, start:stop] = coef
        self.blocks.append((start, stop, block))
        self.rows, self.coef = row_buffer[:, :stop], coef_buffer[:, :stop]

    def _shared_projection(self, linear: nn.Linear, of: str, tag: str, heads: int, tokens_last: bool) -> torch.Tensor:
        """``(gain * src) W^T`` (of "src") or ``pe W^T`` (of "pe"), no bias, per head:
        (heads, d, L) with ``tokens_last``, else (heads, L, d)."""
        tile = self.tile

        def compute() -> torch.Tensor:
            x = tile.pe if of == "pe" else tile.src * self.gain
            projected = (x @ linear.weight.T).reshape(x.shape[0], heads, -1)  # (L, h, d)
            if not tokens_last:
                return projected.transpose(0, 1).contiguous()
            projected = projected.permute(1, 2, 0)
            if of == "pe":  # a row of ones: the bias, carried with the query vectors
                projected = torch.cat([projected, projected.new_ones(heads, 1, x.shape[0])], dim=1)
            return projected.contiguous()

        return tile.get((of, tag, self.gain_key if of == "src" else "", tokens_last), compute)

    def plus_head_values(self, values: torch.Tensor, out_proj: nn.Linear, weights: torch.Tensor, key: str) -> None:
        """Add an image-to-token attention's output: ``weights`` (b, heads * n, L), each
        head's softmax over the prompt tokens, applied to ``values`` (b, heads, n, d)
        through ``out_proj``."""
        block = _HeadRows(values, out_proj, torch.ones_like(self.gain), key)
        self._append(block, block.rows(), weights)

    def layer_norm(self, norm: nn.LayerNorm, key: str) -> None:
        """Apply ``norm`` over channels: mean and variance per prompt and token from the
        low-rank form; the new form scales the rows by the norm's weight and the
        coefficients by one over the deviation, and adds the norm's weight and bias as
        two shared rows."""
        tile = self.tile
        channels = tile.src.shape[1]
        gain_src = tile.get(("sum", self.gain_key), lambda: tile.src @ self.gain)
        gain_src_sq = tile.get(("sumsq", self.gain_key), lambda: (tile.src * self.gain).square().sum(dim=1))
        rows, coef, scale = self.rows, self.coef, self.scale
        mean = (scale * gain_src + (rows.sum(dim=2).unsqueeze(1) @ coef).squeeze(1)) / channels
        gram = rows @ rows.transpose(1, 2)  # (b, r, r)
        square = scale.square() * gain_src_sq + 2 * scale * self._coef_dot_src() + ((gram @ coef) * coef).sum(dim=1)
        inv_std = torch.rsqrt((square / channels - mean.square()).clamp_min(0) + norm.eps)  # (b, L)
        weight, bias = norm.weight, norm.bias
        for _, _, block in self.blocks:
            if isinstance(block, _HeadRows):
                block.gain = block.gain * weight
            else:
                block.vector = block.vector * weight
            block.key = f"{block.key}*{key}"
        b, length = inv_std.shape
        self.rows.mul_(weight)
        self.coef.mul_(inv_std.unsqueeze(1))
        self.scale = scale * inv_std
        self.gain = self.gain * weight
        self.gain_key = f"{self.gain_key}*{key}"
        self._append(_VectorRow(weight, f"w{key}"), weight.expand(b, 1, -1), (-mean * inv_std).unsqueeze(1))
        self._append(_VectorRow(bias, f"b{key}"), bias.expand(b, 1, -1), inv_std.new_ones(1, 1, 1).expand(b, 1, length))

    def _coef_dot_src(self) -> torch.Tensor:
        """(b, L): ``coef[:, :, j] @ rows`` dotted with ``gain * src[j]``, block by block."""
        total = self.scale.new_zeros(self.b, self.tile.src.shape[0])
        for start, stop, block in self.blocks:
            dots = block.dots_with_src(self.tile, self.gain, self.gain_key)
            total = total + (self.coef[:, start:stop] * dots).sum(dim=1)
        return total

    def scores(self, linear: nn.Linear, vectors: torch.Tensor, tag: str) -> torch.Tensor:
        """(b, heads, n, L): ``vectors`` (b, heads, n, d) dotted with each head's slice of
        ``linear(tokens[j] + pe[j])`` (bias included)."""
        b, heads, n, d = vectors.shape
        shared = self._shared_projection(linear, "src", tag, heads, tokens_last=True)
        pe = self._shared_projection(linear, "pe", tag, heads, tokens_last=True)  # (h, d + 1, L): bias last
        bias = (vectors * linear.bias.reshape(heads, 1, d)).sum(dim=3, keepdim=True)
        if self.blocks:
            rows_w = (self.rows @ linear.weight.T).reshape(b, -1, heads, d)  # (b, r, h, d)
            through_rows = torch.einsum("brhd,bhnd->bhnr", rows_w, vectors).reshape(b, heads * n, -1)
            out = (through_rows @ self.coef).reshape(b, heads, n, -1)
            out += torch.einsum("bhnd,hdl->bhnl", torch.cat([vectors, bias], dim=3), pe)
        else:
            out = torch.einsum("bhnd,hdl->bhnl", torch.cat([vectors, bias], dim=3), pe)
        scale = self.scale.reshape(-1, 1, 1, self.scale.shape[-1])
        return out.addcmul_(torch.einsum("bhnd,hdl->bhnl", vectors, shared), scale)

    def weighted_sum(self, linear: nn.Linear, weights: torch.Tensor, tag: str) -> torch.Tensor:
        """(b, heads, n, d): per head and query, ``sum_j weights[:, h, i, j] *
        linear(tokens[j])[head h]`` for ``weights`` (b, heads, n, L) that sum to one over
        tokens (so the bias is added once)."""
        b, heads, n, _ = weights.shape
        d = linear.weight.shape[0] // heads
        shared = self._shared_projection(linear, "src", tag, heads, tokens_last=False)
        out = torch.einsum("bhnl,hld->bhnd", weights * self.scale.reshape(-1, 1, 1, self.scale.shape[-1]), shared)
        if self.blocks:
            mixed = weights.reshape(b, heads * n, -1) @ self.coef.transpose(1, 2)  # (b, h*n, r)
            rows_w = (self.rows @ linear.weight.T).reshape(b, -1, heads, d)
            out = out + torch.einsum("bhnr,brhd->bhnd", mixed.reshape(b, heads, n, -1), rows_w)
        return out + linear.bias.reshape(heads, 1, d)

    def at(self, prompt: int, index: torch.Tensor) -> torch.Tensor:
        """Prompt ``prompt``'s tokens at token indices ``index`` (t,), materialised (t, C)."""
        scale = self.scale[min(prompt, self.scale.shape[0] - 1), index]
        shared = self.tile.src[index] * self.gain * scale.unsqueeze(1)
        return shared + self.coef[prompt][:, index].T @ self.rows[prompt]
