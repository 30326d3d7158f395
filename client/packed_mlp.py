"""DP-SGD's clipped gradient sum for an MLP in one backward pass, over one flat parameter.

For a Linear layer z = a W^T + b on 2-D inputs, example i's gradient is the
outer product g_i a_i^T (and g_i for the bias), with g_i = d loss_i / d z_i.
So its squared norm is ||g_i||^2 (||a_i||^2 + 1) without ever forming it
(Goodfellow, 2015; the "ghost norm" of Li et al., ICLR 2022), and the clipped
sum sum_i c_i g_i a_i^T is one matrix product (c * G)^T A. One backward pass
to the layers' outputs thus gives DP-SGD everything it needs: no per-example
gradient tensors (Opacus "hooks") and no second backward pass (Opacus
"ghost"); this is the book-keeping trick of Bu et al. (ICML 2023).

The weights live in one flat `nn.Parameter` in `state_dict` order (the wire
order of `common.tensors`), so Opacus's optimizer adds noise, scales and
steps one tensor instead of one per weight and bias, and the update is just
`flat - global`. Per-example independence is what makes the per-example
gradient an outer product, so only Linear layers and element-wise
activations are accepted; anything else trains through Opacus's hooks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from common.models import MLP

__all__ = ["PackedMLP"]

_Backward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_BACKWARD: dict[type[nn.Module], _Backward] = {
    # The parameter-free layers accepted: each acts on each element alone, hence on each
    # example alone. (gradient w.r.t. the output, the output) -> gradient w.r.t. the input,
    # by the same aten kernels autograd runs for these layers.
    nn.ReLU: lambda g, out: torch.ops.aten.threshold_backward(g, out, 0),
    nn.Tanh: lambda g, out: torch.ops.aten.tanh_backward(g, out),
    nn.Sigmoid: lambda g, out: torch.ops.aten.sigmoid_backward(g, out),
    nn.Identity: lambda g, out: g,
}

_NORM_EPSILON = 1e-6
"""Opacus's clip factor is max_norm / (norm + 1e-6), capped at 1: the same formula here."""

_MINUS_ONE = torch.tensor(-1.0)


class PackedMLP(nn.Module):
    """An MLP's weights as one flat Parameter, with a one-pass DP-SGD clipped gradient."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        layers = self.layers_of(model)
        if layers is None:
            raise TypeError(
                f"{type(model).__name__} is not an MLP of Linear layers and element-wise "
                "activations; train it through Opacus's hooks instead"
            )
        weights = [t.detach().reshape(-1).to(torch.float32) for t in model.state_dict().values()]
        self.flat = nn.Parameter(torch.cat(weights))
        # (offset, out, in, has_bias) for a Linear layer, or the activation module itself.
        self._plan: list[tuple[int, int, int, bool] | nn.Module] = []
        offset = 0
        for layer in layers:
            if isinstance(layer, nn.Linear):
                out_features, in_features = layer.weight.shape
                bias = layer.bias is not None
                self._plan.append((offset, out_features, in_features, bias))
                offset += out_features * in_features + (out_features if bias else 0)
            else:
                self._plan.append(layer)
        assert offset == self.flat.numel()
        self._linear_specs = [s for s in self._plan if not isinstance(s, nn.Module)]
        # Views into the flat weights: optimizers update a Parameter in place, so they stay current.
        self._views = [self._linear(spec) for spec in self._linear_specs]
        self._arange = torch.arange(256)

    @staticmethod
    def layers_of(model: nn.Module) -> list[nn.Module] | None:
        """The layers in order when the model qualifies (state_dict = Linear weights only)."""
        if not isinstance(model, MLP):
            return None
        layers = list(model.net)
        if not all(type(m) in _BACKWARD or isinstance(m, nn.Linear) for m in layers):
            return None
        linear_params = [p for m in layers if isinstance(m, nn.Linear) for p in m.parameters()]
        state = list(model.state_dict().values())
        # Same tensors in the same order: the flat vector is the wire vector.
        if len(state) != len(linear_params) or any(
            s.data_ptr() != p.data_ptr() for s, p in zip(state, linear_params, strict=True)
        ):
            return None
        if not all(p.requires_grad for p in linear_params):
            return None
        return layers

    def _linear(self, spec: tuple[int, int, int, bool]) -> tuple[torch.Tensor, torch.Tensor | None]:
        offset, out_features, in_features, bias = spec
        flat = self.flat.detach()
        end = offset + out_features * in_features
        weight = flat[offset:end].view(out_features, in_features)
        return weight, (flat[end : end + out_features] if bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (no autograd to the weights: training goes through clipped_gradient_sum)."""
        h = x
        views = iter(self._views)
        for step in self._plan:
            h = step(h) if isinstance(step, nn.Module) else nn.functional.linear(h, *next(views))
        return h

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

        DP-SGD adds the sum to the step's noise, already drawn into out, and
        divides by the expected batch: the scale goes on the batch's small
        per-example factors instead of a pass over every weight.

        What Opacus's DPOptimizer accumulates into `summed_grad` before noise:
        each example's whole gradient scaled by min(1, C / (||g_i|| + 1e-6)).
        The backward pass is written out (softmax minus one-hot, then each
        layer's transposed product and the activation's own aten backward), so
        no autograd graph is built: that graph costs more than the arithmetic
        at a device's batch sizes.
        """
        if x.dim() != 2:
            raise ValueError(
                f"PackedMLP takes a batch of feature vectors, got shape {tuple(x.shape)}"
            )
        n = x.shape[0]
        if n == 0:  # Poisson sampling draws empty batches; they still get noise
            return out
        inputs: list[torch.Tensor] = []  # each Linear's input
        outputs: list[torch.Tensor] = []  # each activation's output
        h = x
        for step in self._plan:
            if isinstance(step, nn.Module):
                h = step(h)
                outputs.append(h)
            else:
                inputs.append(h)
                h = nn.functional.linear(h, *self._views[len(inputs) - 1])
        # d(sum of cross-entropies)/d logits = softmax - one_hot(y)
        g = torch.softmax(h, dim=1)
        g.index_put_((self._rows(n), y), _MINUS_ONE, accumulate=True)
        grads: list[torch.Tensor] = [g] * len(inputs)
        layer, activation = len(inputs) - 1, len(outputs) - 1
        for step in reversed(self._plan):
            if isinstance(step, nn.Module):
                g = _BACKWARD[type(step)](g, outputs[activation])
                activation -= 1
            else:
                grads[layer] = g
                if layer == 0:
                    break
                g = torch.mm(g, self._views[layer][0])
                layer -= 1
        squared = torch.zeros(n)
        for g, a, (_, _, _, bias) in zip(grads, inputs, self._linear_specs, strict=True):
            input_sq = torch.linalg.vecdot(a, a)
            if bias:
                input_sq += 1.0
            squared.addcmul_(torch.linalg.vecdot(g, g), input_sq)
        factor = (max_grad_norm / (squared.sqrt_() + _NORM_EPSILON)).clamp_(max=1.0)
        factor.mul_(scale)
        for g, a, (offset, out_features, in_features, bias) in zip(
            grads, inputs, self._linear_specs, strict=True
        ):
            clipped = g * factor.unsqueeze(1)
            end = offset + out_features * in_features
            out[offset:end].view(out_features, in_features).addmm_(clipped.t(), a)
            if bias:
                out[end : end + out_features].add_(clipped.sum(0))
        return out

    def _rows(self, n: int) -> torch.Tensor:
        if self._arange.numel() < n:
            self._arange = torch.arange(max(n, 2 * self._arange.numel()))
        return self._arange[:n]
