"""The Triton Python-backend model that ``nextvit-deploy serve`` loads: the artifact on the project's runner.

``serve`` copies this file as ``<model>/1/model.py`` and passes everything through the config's
``parameters`` (artifact path, mode, where the serving interpreter finds its packages). Two modes:

* ``tensor``: input named like the artifact's input, float32 ``[N, 3, H, W]`` (already normalised).
* ``preprocess``: the ``image`` input below, decoded and preprocessed, returned as the normalised
  tensor (no runner): the first step of the ensemble ``triton-repo --image-input`` writes.
* ``image``: input ``image``, UINT8 ``[1, L]``: the bytes of one encoded image file (JPEG/PNG/...),
  ragged-batched (requests of different lengths share a batch), decoded and
  preprocessed here exactly as ``verify``/``eval`` do (:func:`nextvit_deploy.data.preprocess_pil`, then
  :func:`~nextvit_deploy.data.normalize` with the manifest's mean/std).

Triton's dynamic batcher hands ``execute`` several requests at once; they run as one batch through the
runner (zero-padded up to a static batch, or the artifact's minimum batch) and are split back. A
request that cannot be served (an undecodable image) gets its own error response; the others in the
batch still get their outputs. Shapes and dtypes are checked by Triton before a request gets here.

Under NumPy 2, tensors cross the stub boundary through DLPack (``np.from_dlpack`` in,
``Tensor.from_dlpack`` of a ``torch.from_numpy`` view out): the
stub shipped with Triton 2.51 was built against NumPy 1, and under NumPy 2 its ``pb_utils.Tensor(name,
ndarray)`` path returns empty data and ``as_numpy()`` of a BYTES tensor crashes the stub. The DLPack
path is independent of NumPy's C layout, which is also why encoded images arrive as UINT8, not BYTES.
"""
from __future__ import annotations

import json
import site
import sys
from typing import Any

# triton_python_backend_utils exists only inside Triton's Python-backend stub, so it is imported lazily
# (this module must stay importable everywhere; tests/test_imports.py imports every module).


def _pb():
    import triton_python_backend_utils as pb_utils

    return pb_utils


def _params(model_config: dict[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


class TritonPythonModel:
    """Triton's Python-backend entry point (``initialize`` / ``execute`` / ``finalize``)."""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        p = _params(config)
        for d in json.loads(p.get("sys_path", "[]")):  # the serving interpreter's packages (venv, editable)
            if d not in sys.path:
                sys.path.append(d)
        for d in json.loads(p.get("site_dirs", "[]")):
            site.addsitedir(d)  # runs .pth files: editable installs live there
        import numpy as np

        self.np = np
        self.mode = p.get("mode", "tensor")
        self.output_names = [o["name"] for o in config["output"]]
        if self.mode == "preprocess":  # no runner: decode + preprocess only (ensemble step of triton-repo)
            self.runner: Any = None
            self.input_dtype = p.get("dtype", "float32")
            self.size = (int(p["height"]), int(p["width"]))
            self.crop_pct = float(p["crop_pct"])
            self.mean, self.std = json.loads(p["mean"]), json.loads(p["std"])
            return
        from nextvit_deploy.artifact import Artifact
        from nextvit_deploy.serve.server import open_artifact_runner

        self.artifact = Artifact.load(p["artifact"])
        threads = int(p["threads"]) if p.get("threads") else None
        self.runner = open_artifact_runner(self.artifact, threads=threads)
        self.runner.__enter__()
        spec = self.runner.inputs()[0]
        self.input_name, self.input_dtype = spec.name, spec.dtype
        lo, _, hi = self.artifact.batch
        self.min_batch = lo
        self.static_batch = None if self.artifact.dynamic_batch else lo
        pre = self.artifact.preprocessing
        self.size = self.artifact.image_size
        self.crop_pct = float(pre.get("crop_pct", 0.95))
        self.mean, self.std = pre.get("mean", (0.485, 0.456, 0.406)), pre.get("std", (0.229, 0.224, 0.225))

    def _out_tensor(self, name: str, array: Any) -> Any:
        """A response tensor. Under NumPy 2 through torch's DLPack: the stub (built against NumPy 1) returns
        empty data for ``Tensor(name, ndarray)`` and releases NumPy's own DLPack capsule twice."""
        pb = _pb()
        if int(self.np.__version__.split(".")[0]) < 2:
            return pb.Tensor(name, array)
        import torch

        return pb.Tensor.from_dlpack(name, torch.from_numpy(array))

    # requests -> arrays -------------------------------------------------------------------------------
    def _tensor_of(self, request) -> Any:
        t = _pb().get_input_tensor_by_name(request, self.input_name)
        return self.np.array(self.np.from_dlpack(t), dtype=self.input_dtype, copy=True)

    def _images_of(self, request) -> Any:
        import io

        from PIL import Image, UnidentifiedImageError

        from nextvit_deploy.data import normalize, preprocess_pil

        rows = self.np.from_dlpack(_pb().get_input_tensor_by_name(request, "image"))
        chw = []
        for i, row in enumerate(rows.reshape(rows.shape[0], -1)):
            data = row.tobytes()
            try:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    chw.append(preprocess_pil(im, self.size, crop_pct=self.crop_pct))
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
                raise ValueError(f"image {i} of the request cannot be decoded ({type(exc).__name__}): "
                                 "send JPEG/PNG/BMP/WebP bytes") from None
        return normalize(self.np.stack(chw), self.mean, self.std).astype(self.input_dtype)

    def _run(self, batch: Any) -> dict[str, Any]:
        np = self.np
        n = batch.shape[0]
        target = self.static_batch or max(n, self.min_batch)
        if target > n:  # static-batch (or min-batch) artifacts: zero-pad, then drop the padding
            batch = np.concatenate([batch, np.zeros((target - n, *batch.shape[1:]), batch.dtype)])
        outs = self.runner.infer({self.input_name: batch})
        return {k: np.ascontiguousarray(v[:n], dtype=np.float32) for k, v in outs.items()}

    def execute(self, requests: list) -> list:
        pb = _pb()
        np = self.np
        arrays: list = []
        errors: dict[int, str] = {}
        for i, r in enumerate(requests):
            try:
                arrays.append(self._images_of(r) if self.mode in ("image", "preprocess") else self._tensor_of(r))
            except Exception as exc:  # this request alone fails
                errors[i] = str(exc)
                arrays.append(None)
        good = [a for a in arrays if a is not None]
        outs: dict[str, Any] = {}
        if good and self.mode == "preprocess":
            outs = {self.output_names[0]: np.ascontiguousarray(np.concatenate(good), dtype=self.input_dtype)}
        elif good:
            try:
                outs = self._run(np.concatenate(good))
            except Exception as exc:  # the runner failed: every request of this batch gets the error
                return [pb.InferenceResponse(error=pb.TritonError(f"inference failed: {exc}")) for _ in requests]
        responses, start = [], 0
        for i, a in enumerate(arrays):
            if a is None:
                responses.append(pb.InferenceResponse(error=pb.TritonError(errors[i])))
                continue
            n = a.shape[0]
            tensors = [self._out_tensor(name, np.ascontiguousarray(outs[name][start:start + n]))
                       for name in self.output_names]
            responses.append(pb.InferenceResponse(output_tensors=tensors))
            start += n
        return responses

    def finalize(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.__exit__(None, None, None)
