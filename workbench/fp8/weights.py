"""Weight-only 8-bit inference: FP8 or INT8 weights dequantised on the fly, and what the 8 bits cost.

For serving, only memory matters: ``quantize_weights_`` replaces each ``nn.Linear`` by a
``QuantizedLinear`` holding FP8 weights with 128x128-block scales (DeepSeek's checkpoint layout:
``weight`` in float8_e4m3fn and ``weight_scale_inv``) or INT8 weights with one scale per output row,
and dequantises them in ``forward``. ``weight_bytes`` measures what a model's state dict holds.
``top1_agreement`` measures what the 8 bits cost: how often two models pick the same next token, and
both models' loss on the same batches.

Where it simplifies
-------------------
* Weight-only inference (``quantize_weights_``) replaces ``nn.Linear`` layers only, so the routed
  experts keep FP32 weights there; the FP8 *checkpoint* functions quantise them too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from workbench.fp8.formats import DEFAULT_SKIP, FORMATS, WEIGHT_BLOCK, _format, _quantize, dequantize
from workbench.fp8.linear import _replace_linears


# Weight-only 8-bit inference ----------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored in 8 bits and dequantised on the fly in ``forward``.

    fmt ``"e4m3"``/``"e5m2"``: FP8 with one scale per 128x128 block (DeepSeek's checkpoint layout,
    ``weight`` + ``weight_scale_inv``); ``"int8"``: INT8 with one scale per output row.
    """

    def __init__(self, weight_q: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None, fmt: str):
        super().__init__()
        self.fmt = fmt
        self.block = self.block_for(fmt, weight_q.shape[1])
        self.out_features, self.in_features = weight_q.shape
        self.register_buffer("weight", weight_q)  # (N, K) 8-bit
        self.register_buffer("weight_scale_inv", weight_scale_inv)  # (N/128, K/128) or (N, 1) float32
        self.register_buffer("bias", bias)

    @staticmethod
    def block_for(fmt: str, in_features: int) -> tuple[int, int]:
        return (1, in_features) if fmt == "int8" else WEIGHT_BLOCK

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "e4m3") -> QuantizedLinear:
        _format(fmt)
        with torch.no_grad():
            w = linear.weight.detach()  # (N, K)
            if not torch.isfinite(w).all():
                raise ValueError("the layer's weight has NaN or inf values; it cannot be quantised")
            q, s = _quantize(w, cls.block_for(fmt, w.shape[1]), FORMATS[fmt])
            bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(q, s, bias, fmt)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale_inv, self.block, dtype)  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def quantize_weights_(model: nn.Module, fmt: str = "e4m3", skip: Iterable[str] = DEFAULT_SKIP) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``model`` (except the ``skip``ped ones, see ``convert_to_fp8``)
    by a ``QuantizedLinear`` in ``fmt`` (``"e4m3"``, ``"e5m2"`` or ``"int8"``), in place, for inference.

    Returns ``model``. Compare ``weight_bytes`` before and after to see the memory saved.
    """
    _format(fmt)
    _replace_linears(model, tuple(skip), lambda lin: QuantizedLinear.from_linear(lin, fmt), "quantize_weights_")
    return model


def weight_bytes(module: nn.Module | Mapping[str, torch.Tensor], other_dtype: torch.dtype | None = None) -> int:
    """Bytes of every tensor in ``module.state_dict()`` (what a checkpoint holds), shared storage
    (tied weights) counted once. ``module`` may also be a state dict itself (an FP8 checkpoint's tensors).

    other_dtype: count every floating-point tensor wider than eight bits as if stored in this dtype, except
        the 8-bit formats' scales (names ending in ``scale_inv``, float32 as DeepSeek keeps them).
        ``torch.bfloat16`` gives what a BF16 deployment holds: the BF16 baseline for an unquantised model, and
        for a quantised one its 8-bit weights plus the layers left in BF16 (embedding, head, norms, router).
    """
    if other_dtype is not None and not (isinstance(other_dtype, torch.dtype) and other_dtype.is_floating_point):
        raise ValueError(
            f"other_dtype must be a floating-point torch dtype such as torch.bfloat16, got {other_dtype!r}"
        )
    state = module.state_dict(keep_vars=True) if isinstance(module, nn.Module) else module
    seen: set[tuple[int, int]] = set()
    total = 0
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.nbytes)
        if key in seen:
            continue
        seen.add(key)
        recast = (
            other_dtype is not None
            and tensor.is_floating_point()
            and tensor.element_size() > 1
            and not name.endswith("scale_inv")
        )
        total += tensor.numel() * other_dtype.itemsize if recast else tensor.nbytes
    return total


@torch.no_grad()
def top1_agreement(model_a: nn.Module, model_b: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """How often ``model_b`` predicts the same next token as ``model_a``, and both models' loss.

    batches: token ids (B, T) (or tuples whose first item is them, as ``TokenDataset.eval_batches``
        yields), moved to each model's device. A model returns logits (B, T, V) or an object with
        ``.logits`` (``workbench.Model``).
    Returns ``agreement`` (fraction of positions whose argmax agrees), ``loss_a`` and ``loss_b`` (mean
    next-token cross-entropy), ``loss_change`` (``loss_b - loss_a``), ``rel_loss_change``
    (``loss_change / loss_a``) and ``tokens`` (positions compared). Put the models in eval mode first.
    """
    agree = positions = 0
    loss_sums, loss_tokens = [0.0, 0.0], 0
    for batch in batches:
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(
                f"each batch must hold token ids of shape (batch, seq_len >= 2), got {getattr(ids, 'shape', ids)!r}"
            )
        preds = []
        for i, model in enumerate((model_a, model_b)):
            x = ids.to(_device_of(model))
            out = model(x)
            logits = (out.logits if hasattr(out, "logits") else out).float()  # (B, T, V)
            preds.append(logits.argmax(-1).cpu())  # (B, T)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            loss_sums[i] += float(loss)
        agree += int((preds[0] == preds[1]).sum())
        positions += ids.numel()
        loss_tokens += ids.shape[0] * (ids.shape[1] - 1)
    if positions == 0:
        raise ValueError("batches is empty: pass at least one (batch, seq_len) tensor of token ids")
    loss_a, loss_b = loss_sums[0] / loss_tokens, loss_sums[1] / loss_tokens
    return {
        "agreement": agree / positions,
        "loss_a": loss_a,
        "loss_b": loss_b,
        "loss_change": loss_b - loss_a,
        "rel_loss_change": (loss_b - loss_a) / loss_a,
        "tokens": positions,
    }


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")
