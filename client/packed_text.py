"""DP-SGD's clipped gradient sum for the fastText-style model in one pass, over one flat parameter.

The model (`common.models.FastText`) is h_i = mean of the embedding rows of
example i's buckets, z_i = W h_i + b. With g_i = softmax(z_i) - onehot(y_i)
(d loss_i / d z_i) and u_i = W^T g_i (d loss_i / d h_i), example i's gradient is

  head:       g_i h_i^T and g_i, squared norm ||g_i||^2 (||h_i||^2 + 1);
  embedding:  row r gets (c_ir / n_i) u_i, where c_ir counts bucket r among the
              example's n_i features, so its squared norm is
              ||u_i||^2 * sum_r c_ir^2 / n_i^2.

The embedding's per-example gradient is sparse (the rows of its bag) and its
norm is a property of the bag (the repeat counts) times one d-vector's norm:
no per-example gradient is ever formed, where Opacus's `hooks` EmbeddingBag
sampler builds a dense (batch x buckets x dim) tensor, which is why it is
about a hundred times slower than plain training on this model. The clipped
sum is then one index_add of the scaled u_i into the bag rows plus one
matrix product for the head. (Opacus's sampler also assigns with `+=` on
fancy indices, so a bucket repeated in a bag counts once there; the counts
here are right, checked against per-example autograd in the tests.)

The weights are one flat `nn.Parameter` in `state_dict` (wire) order, as in
`client.packed_mlp`, so Opacus's optimizer adds noise and steps one tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from common.models import FastText
from common.text import PAD

__all__ = ["PackedFastText"]

_NORM_EPSILON = 1e-6
"""Opacus's clip factor is max_norm / (norm + 1e-6), capped at 1: the same formula here."""

_MINUS_ONE = torch.tensor([[-1.0]])


class PackedFastText(nn.Module):
    """A FastText model's weights as one flat Parameter, with a one-pass DP-SGD clipped gradient."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not self.accepts(model):
            raise TypeError(
                f"{type(model).__name__} is not a plain FastText model (EmbeddingBag mean, "
                "linear head, all weights trainable); train it through Opacus's hooks instead"
            )
        assert isinstance(model, FastText)
        self.buckets, self.dim = model.embedding.weight.shape
        self.classes = model.head.weight.shape[0]
        weights = [t.detach().reshape(-1).to(torch.float32) for t in model.state_dict().values()]
        self.flat = nn.Parameter(torch.cat(weights))
        flat = self.flat.detach()
        # Views into the flat weights: optimizers update a Parameter in place, so they stay current.
        e_end = self.buckets * self.dim
        w_end = e_end + self.classes * self.dim
        self._embedding = flat[:e_end].view(self.buckets, self.dim)
        self._weight = flat[e_end:w_end].view(self.classes, self.dim)
        self._bias = flat[w_end:]
        self._e_end, self._w_end = e_end, w_end

    @staticmethod
    def accepts(model: nn.Module) -> bool:
        """True when the model is a FastText whose state_dict is exactly its three weights."""
        if not isinstance(model, FastText):
            return False
        bag = model.embedding
        if bag.mode != "mean" or bag.max_norm is not None or bag.padding_idx is not None:
            return False
        params = [bag.weight, model.head.weight, model.head.bias]
        state = list(model.state_dict().values())
        if len(state) != len(params) or any(
            s.data_ptr() != p.data_ptr() for s, p in zip(state, params, strict=True)
        ):
            return False
        return all(p.requires_grad for p in params)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (no autograd to the weights: training goes through clipped_gradient_sum)."""
        ids, offsets = FastText.bags(x)
        h = nn.functional.embedding_bag(ids, self._embedding, offsets, mode="mean")
        return nn.functional.linear(h, self._weight, self._bias)

    def bag_norms(self, x: torch.Tensor) -> torch.Tensor:
        """sqrt(sum_r c_ir^2) / n_i per example: ||d h_i / d embedding|| per unit of ||u_i||."""
        return self._bags(x)[3]

    def _bags(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, offsets, owner example of each id, bag norm factor, 1 / n_i) of a padded batch."""
        n = x.shape[0]
        mask = x != PAD
        lengths = mask.sum(dim=1)
        ids = x.masked_select(mask)  # x[mask] costs twice as much (nonzero, then index)
        offsets = torch.cumsum(lengths, 0) - lengths
        owners = torch.repeat_interleave(torch.arange(n), lengths)
        # (example, bucket) pairs as one int64 key; their counts are the c_ir.
        keys, counts = torch.unique(owners * self.buckets + ids, return_counts=True)
        squares = torch.zeros(n, dtype=torch.float32)
        squares.index_add_(0, keys // self.buckets, counts.to(torch.float32).square())
        inverse = 1.0 / lengths.clamp(min=1).to(torch.float32)
        return ids, offsets, owners, squares.sqrt_().mul_(inverse), inverse

    def clipped_gradient_sum(
        self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
    ) -> torch.Tensor:
        """sum_i clip(grad of cross_entropy(model(x_i), y_i), max_grad_norm), flat."""
        return self.add_clipped_gradient_sum(x, y, max_grad_norm, torch.zeros_like(self.flat))

    @torch.no_grad()
    def add_clipped_gradient_sum(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        max_grad_norm: float,
        out: torch.Tensor,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """out += scale * sum_i clip(grad of cross_entropy(model(x_i), y_i), max_grad_norm).

        What Opacus's DPOptimizer accumulates into `summed_grad` before noise:
        each example's whole gradient scaled by min(1, C / (||g_i|| + 1e-6)).
        The backward pass is written out (softmax minus one-hot, the head's
        transposed product, the bag's scatter), so no autograd graph is built.
        """
        if x.dim() != 2:
            raise ValueError(f"fasttext takes a padded batch of bucket ids, got {tuple(x.shape)}")
        n = x.shape[0]
        if n == 0:  # Poisson sampling draws empty batches; they still get noise
            return out
        ids, offsets, owners, bag_norm, inverse = self._bags(x)
        h = nn.functional.embedding_bag(ids, self._embedding, offsets, mode="mean")
        g = torch.softmax(nn.functional.linear(h, self._weight, self._bias), dim=1)
        g.scatter_add_(
            1, y.unsqueeze(1), _MINUS_ONE.expand(n, 1)
        )  # d(sum of cross-entropies)/d logits
        u = torch.mm(g, self._weight)  # d loss_i / d h_i
        squared = torch.linalg.vecdot(g, g) * (torch.linalg.vecdot(h, h) + 1.0)
        squared.addcmul_(torch.linalg.vecdot(u, u), bag_norm.square())
        factor = (max_grad_norm / (squared.sqrt_() + _NORM_EPSILON)).clamp_(max=1.0)
        factor.mul_(scale)
        clipped = g * factor.unsqueeze(1)
        out[self._e_end : self._w_end].view(self.classes, self.dim).addmm_(clipped.t(), h)
        out[self._w_end :].add_(clipped.sum(0))
        # Each feature of example i adds (factor_i / n_i) u_i to its bucket's row (repeats add up).
        scaled = u * (factor * inverse).unsqueeze(1)
        # index_select, not scaled[owners]: advanced indexing is several times slower here.
        rows = scaled.index_select(0, owners)
        out[: self._e_end].view(self.buckets, self.dim).index_add_(0, ids, rows)
        return out
