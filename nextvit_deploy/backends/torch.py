"""TorchRunner: runs an ``nn.Module`` (the PyTorch reference) behind the Runner contract."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .base import Availability, Runner, TensorSpec

__all__ = ["TorchRunner", "availability"]


class TorchRunner(Runner):
    """Run ``model`` on ``device`` with ``torch.inference_mode``.

    Args:
        model: the module; its outputs (a tensor or a list of tensors) are named by ``output_names``.
        input_name: name of the single image input. Defaults to ``"input"``.
        output_names: names given to the outputs in order. Defaults to ``("logits",)``.
        image_size: (height, width) the feed must have. Defaults to any.
        dtype: compute dtype (``torch.float16`` for half precision on a GPU). Defaults to float32.
    """

    def __init__(self, model: nn.Module, *, input_name: str = "input",
                 output_names: Sequence[str] = ("logits",), image_size: tuple[int, int] | None = None,
                 device: str = "cpu", dtype: torch.dtype = torch.float32, name: str = "TorchRunner"):
        super().__init__()
        self.model = model
        self.input_name = input_name
        self.output_names = tuple(output_names)
        self.image_size = image_size
        self.device = device
        self.dtype = dtype
        self.name = name

    def _activate_impl(self) -> None:
        self.model = self.model.to(self.device, self.dtype).eval()

    def _inputs_impl(self) -> list[TensorSpec]:
        h, w = self.image_size if self.image_size else (None, None)
        return [TensorSpec(self.input_name, "float32", (None, 3, h, w))]

    def _infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(feed[self.input_name])).to(self.device, self.dtype)
        with torch.inference_mode():
            out = self.model(x)
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        if len(outs) != len(self.output_names):
            raise RuntimeError(f"model returned {len(outs)} outputs, expected {len(self.output_names)}")
        return {n: o.float().cpu().numpy() for n, o in zip(self.output_names, outs)}


def availability(precision: str = "fp32", *, graphs: bool = False) -> Availability:
    """torch eager (``graphs=False``) or torch with CUDA graphs (``name`` ``torch-cudagraph``) here."""
    cuda = torch.cuda.is_available()
    name = "torch-cudagraph" if graphs else "torch"
    device = f"cuda:0 ({torch.cuda.get_device_name(0)})" if cuda else "cpu"
    if graphs and not cuda:
        return Availability(name, False, "needs a CUDA GPU (this machine has none)", torch.__version__)
    if precision == "fp16" and not cuda:
        return Availability(name, False, "fp16 on a CPU is emulated, not a deployment setting: use --precision fp32",
                            torch.__version__, device)
    return Availability(name, True, "", torch.__version__, device)
