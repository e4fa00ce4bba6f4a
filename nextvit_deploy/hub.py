"""Weights by name: ``hf-hub:ORG/NAME[@REVISION]`` resolved through ``huggingface_hub`` and its normal cache.

``model.safetensors`` is preferred (no pickle at all), ``pytorch_model.bin`` is the fallback (read with
``torch.load(weights_only=True)`` like any other checkpoint). ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` are
honoured by ``huggingface_hub`` itself. The resolved commit (the snapshot folder the file sits in) and the
file name go into the manifest, so ``verify``/``eval`` fetch exactly the same bytes again, checked by sha256.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BadInput, CheckpointMismatch

__all__ = ["HUB_PREFIX", "WEIGHT_FILES", "HubFile", "is_hub_spec", "parse_hub_spec", "resolve_hub_file", "rebuild_path"]

HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class HubFile:
    path: Path  # the file in the local cache (snapshots/<commit>/<filename>)
    repo_id: str
    revision: str  # the commit the file was resolved at
    filename: str

    def record(self) -> dict[str, str]:
        return {"repo_id": self.repo_id, "revision": self.revision, "filename": self.filename}


def is_hub_spec(value: Any) -> bool:
    return value is not None and str(value).startswith(HUB_PREFIX)


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf-hub:timm/nextvit_small.bd_in1k@main`` -> (``timm/nextvit_small.bd_in1k``, ``main``)."""
    body = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    repo, _, revision = body.partition("@")
    if not _REPO.match(repo) or (_ and not revision):
        raise BadInput(f"--checkpoint {spec!r} is not a hub name: write hf-hub:ORG/NAME or hf-hub:ORG/NAME@REVISION, "
                       "e.g. hf-hub:timm/nextvit_small.bd_in1k")
    return repo, revision or None


def _offline_line(repo: str, revision: str | None, filename: str) -> str:
    rev = revision or "main"
    return (f"hf-hub:{repo} is not in the local Hugging Face cache and the hub cannot be reached (offline or "
            f"HF_HUB_OFFLINE=1): download https://huggingface.co/{repo}/resolve/{rev}/{filename} on a connected "
            f"machine and pass the file with --checkpoint PATH")


def resolve_hub_file(spec: str | None = None, *, repo_id: str | None = None, revision: str | None = None,
                     filename: str | None = None) -> HubFile:
    """Find (downloading if allowed) the weights of a hub repo; ``filename`` pins one file (manifest rebuilds).

    Raises:
        BadInput: malformed name, repo/revision/file not on the hub, or offline without a cached copy.
    """
    from ._deps import require

    hub = require("huggingface_hub", purpose="hf-hub: checkpoints")
    from huggingface_hub import errors as hub_errors

    if spec is not None:
        repo_id, revision = parse_hub_spec(spec)
    assert repo_id is not None
    candidates = (filename,) if filename else WEIGHT_FILES
    offline = False
    for name in candidates:
        try:
            local = Path(hub.hf_hub_download(repo_id, name, revision=revision))
        except hub_errors.LocalEntryNotFoundError:
            offline = True
            continue
        except hub_errors.EntryNotFoundError:
            continue
        except hub_errors.RepositoryNotFoundError:
            raise BadInput(f"hf-hub:{repo_id} is not a repository on the Hugging Face hub (or it is private: run "
                           "huggingface-cli login): check the name, e.g. hf-hub:timm/nextvit_small.bd_in1k") from None
        except hub_errors.RevisionNotFoundError:
            raise BadInput(f"hf-hub:{repo_id} has no revision {revision!r}: pass a branch, tag or commit that "
                           "exists, or drop @REVISION") from None
        except (hub_errors.HfHubHTTPError, OSError) as exc:
            raise BadInput(f"hf-hub:{repo_id} could not be fetched ({type(exc).__name__}): retry, or download "
                           f"{name} from https://huggingface.co/{repo_id} and pass it with --checkpoint PATH") from None
        return HubFile(path=local, repo_id=repo_id, revision=local.parent.name, filename=name)
    if offline:
        raise BadInput(_offline_line(repo_id, revision, candidates[0]))
    raise BadInput(f"hf-hub:{repo_id} holds none of {', '.join(candidates)}: pass a repo with Next-ViT weights, or a "
                   "local file with --checkpoint PATH")


def rebuild_path(hub: dict[str, Any], *, recorded: str | None, sha256: str | None, artifact: str) -> Path:
    """The local file of a manifest's hub record (re-resolved at the recorded commit), checked by sha256."""
    from .artifact import sha256_path

    if recorded and Path(recorded).is_file() and (not sha256 or sha256_path(recorded) == sha256):
        return Path(recorded)
    found = resolve_hub_file(repo_id=str(hub["repo_id"]), revision=str(hub["revision"]), filename=str(hub["filename"]))
    if sha256 and sha256_path(found.path) != sha256:
        raise CheckpointMismatch(f"hf-hub:{hub['repo_id']}@{hub['revision']} {hub['filename']} differs from the file "
                                 f"{artifact} was exported from (sha256): re-export")
    return found.path
