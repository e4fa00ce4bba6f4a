"""Serving with NVIDIA Triton Inference Server.

* :mod:`.repo`: a standard Triton model repository for ONNX and TensorRT artifacts (``triton-repo``).
* :mod:`.server`: ``serve``, which runs an artifact through the project's own runner inside a real
  ``tritonserver`` (the binary shipped in the ``nvidia-pytriton`` wheel), with Triton's dynamic batcher.
* :mod:`.backend_model`: the Python-backend model that ``serve`` loads into that server.

Nothing here imports tritonclient or pytriton at import time.
"""
