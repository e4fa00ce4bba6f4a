"""Shared fixtures: small and full Next-ViT models with realistic BatchNorm statistics, real photos."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nextvit_deploy.data import normalize, photos
from nextvit_deploy.reference import random_model

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL_DEPTHS = (1, 1, 5, 1)  # every block type, stage 3's 5-block pattern once


def requires(module: str):
    """Skip marker naming the missing optional package."""
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} is not installed (optional dependency)")


def photo_batch(n: int, size=224) -> torch.Tensor:
    return torch.from_numpy(normalize(photos(n, size), MEAN, STD))


@pytest.fixture(scope="session")
def small_model() -> torch.nn.Module:
    """Next-ViT with depths (1, 1, 5, 1), random weights, realistic BatchNorm statistics."""
    return random_model("nextvit_small", seed=3, depths=SMALL_DEPTHS)


@pytest.fixture(scope="session")
def small_backbone() -> torch.nn.Module:
    return random_model("nextvit_small", seed=4, depths=SMALL_DEPTHS, features_only=True)


@pytest.fixture(scope="session")
def s_model() -> torch.nn.Module:
    """Full Next-ViT-S, random weights, realistic BatchNorm statistics (seed 0)."""
    return random_model("nextvit_small", seed=0)


@pytest.fixture(scope="session")
def photos224() -> torch.Tensor:
    return photo_batch(4, 224)


@pytest.fixture(scope="session")
def s_checkpoint(tmp_path_factory, s_model) -> Path:
    """A plain state-dict checkpoint of the Next-ViT-S fixture (our/timm layout)."""
    path = tmp_path_factory.mktemp("ckpt") / "nextvit_small_timm.pth"
    torch.save(s_model.state_dict(), path)
    return path


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def np_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(a).max())


class PicklePayload:
    """Unpickling this runs a shell command that creates ``marker``: a checkpoint must never execute it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# Small-model tests that each took more than ~3.5 s on 2 idle cores (pytest --durations): CI runs them (the
# README's test command runs everything); the fast tier (-m "not slow") leaves them out so that it stays under
# 3 minutes. Full-size tests carry @pytest.mark.slow themselves.
HEAVY = (
    "test_bench.py::test_small_run_measures_every_backend_present",
    "test_bench.py::test_cli_bench_writes_table_files_and_plot",
    "test_bench.py::test_nextvit_rows_do_not_need_timm",
    "test_serve.py::test_errors_before_start_are_one_line",
    "test_trt.py::test_export_trt_without_tensorrt_writes_onnx_and_trtexec",
    "test_fuzz.py::test_fuzz_manifest_fields",
    "test_onnx.py::test_dynamic_batch_runs_at_min_and_max",
    "test_coreml_export.py::test_small_export_verifies_on_linux[tensor-fp32-224]",
    "test_coreml_export.py::test_small_export_verifies_on_linux[image-fp16-224-labels]",
    "test_int8.py::test_static_batch_calibrates_in_full_batches",
    "test_trt_builder.py::test_engine_built_outside_the_tool_is_identified_by_its_onnx_manifest",
    "test_precision.py::test_small_fp16_onnx_export_verifies",
    "test_eval.py::test_cli_max_drop_exceeded_exits_1",
    "test_hub.py::test_export_offline_from_the_cache_records_the_hub_and_verify_rebuilds_it",
    "test_hub.py::test_verify_re_resolves_the_recorded_commit_when_the_path_is_gone",
    "test_coreml_export.py::test_small_export_verifies_on_linux[image-fp32-backbone-odd]",
    "test_coreml_export.py::test_small_export_verifies_on_linux[tensor-fp16-backbone-odd-batch2]",
    # they read the packages of the heavy Core ML cases above (in the full suite they run after them)
    "test_coreml_export.py::test_classifier_evaluator_returns_labels_and_scores",
    "test_coreml_export.py::test_classifier_metadata",
    "test_coreml_export.py::test_linux_uses_the_mil_evaluator_and_refuses_core_ml",
    "test_coreml_export.py::test_odd_resolution_pools_with_ceil_mode",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        node = f"{Path(str(item.fspath)).name}::{item.name}"
        if node in HEAVY or node.split("[")[0] in HEAVY:
            item.add_marker(pytest.mark.slow)
