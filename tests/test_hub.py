"""hf-hub: checkpoints through huggingface_hub's real resolver, from a local cache in its own layout (no network).

The cache is written as huggingface_hub writes it: ``models--ORG--NAME/blobs/<etag>``,
``snapshots/<commit>/<file>`` (a symlink to the blob) and ``refs/main`` (the commit). Each case runs in a
child process with ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` set, because huggingface_hub reads both when
it is imported.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nextvit_deploy.errors import BadInput
from nextvit_deploy.hub import parse_hub_spec
from nextvit_deploy.reference import random_model

ROOT = Path(__file__).resolve().parents[1]
DEPTHS = (1, 1, 5, 1)
REPO = "acme/nextvit_tiny.test"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_cache(cache: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """A cache entry exactly as huggingface_hub lays it out after a download."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True)
    (folder / "snapshots" / commit).mkdir(parents=True)
    (folder / "refs").mkdir()
    for name, data in files.items():
        etag = hashlib.sha256(data).hexdigest()
        (folder / "blobs" / etag).write_bytes(data)
        os.symlink(Path("..") / ".." / "blobs" / etag, folder / "snapshots" / commit / name)
    (folder / "refs" / "main").write_text(commit)
    return folder


def child(code: str, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "typings"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, bytes]:
    from safetensors.torch import save

    model = random_model("nextvit_small", seed=11, depths=DEPTHS, num_classes=5)
    data = save({k: v.contiguous() for k, v in model.state_dict().items()})
    cache = tmp_path_factory.mktemp("hub") / "cache"
    write_hub_cache(cache, REPO, {"model.safetensors": data, "config.json": b"{}"})
    return cache, data


EXPORT_THEN_VERIFY = """
import json, sys
from pathlib import Path
from nextvit_deploy.export import ExportRequest, export
from nextvit_deploy.verify import verify
art = export(ExportRequest(image_size=(64, 64), out_dir=Path(sys.argv[1]), depths=(1, 1, 5, 1), simplify=False,
                           checkpoint=Path(sys.argv[2])))
report = verify(art.path)
print(json.dumps({"manifest": json.loads(art.manifest.read_text()), "passed": bool(report)}))
"""


def test_export_offline_from_the_cache_records_the_hub_and_verify_rebuilds_it(weights, tmp_path):
    cache, data = weights
    proc = child(EXPORT_THEN_VERIFY, cache, str(tmp_path / "out"), f"hf-hub:{REPO}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    m = result["manifest"]
    assert m["checkpoint_hub"] == {"repo_id": REPO, "revision": COMMIT, "filename": "model.safetensors"}
    assert m["checkpoint_sha256"] == hashlib.sha256(data).hexdigest() and m["num_classes"] == 5
    assert m["seed"] is None and result["passed"]
    # pinned revision: the same commit by hash
    proc = child(EXPORT_THEN_VERIFY, cache, str(tmp_path / "out2"), f"hf-hub:{REPO}@{COMMIT}")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_verify_re_resolves_the_recorded_commit_when_the_path_is_gone(weights, tmp_path):
    cache, _ = weights
    proc = child(EXPORT_THEN_VERIFY, cache, str(tmp_path / "out"), f"hf-hub:{REPO}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest_file = next((tmp_path / "out").glob("*.manifest.json"))
    m = json.loads(manifest_file.read_text())
    m["checkpoint"] = str(tmp_path / "moved" / "model.safetensors")  # e.g. exported on another machine
    manifest_file.write_text(json.dumps(m))
    code = "import sys; from nextvit_deploy.verify import verify; sys.exit(0 if verify(sys.argv[1]) else 1)"
    proc = child(code, cache, str(next((tmp_path / "out").glob("*.onnx"))))
    assert proc.returncode == 0, proc.stderr[-2000:]


CLI = "from nextvit_deploy.cli import main; main()"


def test_offline_without_a_cached_copy_is_one_line_exit_2(tmp_path):
    out = tmp_path / "out"
    proc = child(CLI, tmp_path / "empty-cache", "export", "--checkpoint", "hf-hub:timm/nextvit_small.bd_in1k",
                 "-o", str(out))
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "is not in the local Hugging Face cache" in lines[0]
    assert "https://huggingface.co/timm/nextvit_small.bd_in1k/resolve/main/model.safetensors" in lines[0]
    assert "--checkpoint PATH" in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_bin_fallback_and_missing_revision(tmp_path):
    model = random_model("nextvit_small", seed=12, depths=DEPTHS, num_classes=3)
    pth = tmp_path / "w.bin"
    torch.save(model.state_dict(), pth)
    cache = tmp_path / "cache"
    write_hub_cache(cache, REPO, {"pytorch_model.bin": pth.read_bytes()})
    code = ("import sys; from nextvit_deploy.hub import resolve_hub_file; f = resolve_hub_file(sys.argv[1]); "
            "print(f.filename, f.revision, f.path.read_bytes() == open(sys.argv[2], 'rb').read())")
    proc = child(code, cache, f"hf-hub:{REPO}", str(pth))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["pytorch_model.bin", COMMIT, "True"]
    proc = child(code, cache, f"hf-hub:{REPO}@v9", str(pth))  # a revision the cache has never seen
    assert proc.returncode == 1 and "BadInput" in proc.stderr and "--checkpoint PATH" in proc.stderr


@pytest.mark.parametrize("spec", ["hf-hub:", "hf-hub:nextvit_small", "hf-hub:timm/x@", "hf-hub:a/b/c"])
def test_malformed_names(spec):
    with pytest.raises(BadInput, match="is not a hub name: write hf-hub:ORG/NAME"):
        parse_hub_spec(spec)
    assert parse_hub_spec("hf-hub:timm/nextvit_small.bd_in1k@main") == ("timm/nextvit_small.bd_in1k", "main")


def test_plain_safetensors_checkpoint_loads(tmp_path):
    from safetensors.torch import save_file

    from nextvit_model import create_model

    model = random_model("nextvit_small", seed=13, depths=DEPTHS, num_classes=7)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = create_model("nextvit_small", checkpoint=path, depths=DEPTHS, num_classes=7).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    from nextvit_model import CheckpointError

    with pytest.raises(CheckpointError, match="is corrupt or not a safetensors file"):
        create_model("nextvit_small", checkpoint=path, depths=DEPTHS)
