"""Hugging Face hub model IDs (`ORG/NAME[@REVISION]`) -> a local snapshot folder, through huggingface_hub.

Only the files `llmx convert` reads are fetched: config.json, the top-level safetensors shards and their
index, the tokenizer files, generation config, chat template and a ModelOpt hf_quant_config.json (plus the
tokenizer's .py files when remote code is trusted; no weights for `--dummy-weights`). Pickled weights (*.bin,
*.pt) are never downloaded; a repository without safetensors is refused. huggingface_hub's own settings apply
unchanged: HF_HOME / HF_HUB_CACHE (where the cache lives), HF_TOKEN (gated and private repositories),
HF_HUB_OFFLINE (use the cache only). Files land in huggingface_hub's cache (models--ORG--NAME/{blobs,refs,
snapshots}), so a second conversion, or transformers, reuses them.

A local path that exists always wins over a hub ID of the same spelling.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmx.common.errors import LlmxError
from llmx.common.progress import Progress
from llmx.formats.tokenizer_files import TOKENIZER_FILES

# ORG/NAME, optionally @REVISION (a branch, tag or commit; refs/pr/N holds a slash).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>\S+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# Files of a model repository that convert reads, besides the tokenizer files (formats.tokenizer_files).
_CONFIG_FILES = ("config.json", "hf_quant_config.json")
_WEIGHT_FILES = ("*.safetensors", "model.safetensors.index.json")


@dataclass(frozen=True)
class HubModel:
    """A model repository at one commit, and the snapshot folder holding its files."""

    repo_id: str
    revision: str | None  # as requested (branch, tag, commit); None: the default branch
    commit: str  # the commit the revision resolved to
    path: Path

    def provenance(self) -> dict[str, Any]:
        """What a checkpoint's provenance records of its source: the repository and the exact commit."""
        return {"hub": {"repo_id": self.repo_id, "revision": self.revision, "commit": self.commit}}


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """(repo_id, revision or None) when `spec` is spelled like a hub model ID, else None."""
    match = _HUB_ID.fullmatch(spec)
    if match is None or spec.startswith(("./", "../", "~")):
        return None
    return match["repo"], match["revision"]


def resolve_model_source(spec: str | Path, *, trust_remote_code: bool = False, weights: bool = True,
                         progress: Progress | None = None) -> tuple[Path, HubModel | None]:
    """(local folder, hub repository or None) for a model folder or a hub ID.

    An existing local path is returned as is (with its hub identity when it is a snapshot folder of the hub
    cache); a spec spelled ORG/NAME[@REVISION] that is not a local path is fetched from the hub (or found in
    its cache); anything else is returned as a path for the caller's own "does not exist" message.
    weights: False fetches the config and tokenizer only (`convert --dummy-weights`).
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path, snapshot_identity(path)
    ref = parse_hub_id(str(spec))
    if ref is None:
        return path, None
    hub = download_model(ref[0], ref[1], trust_remote_code=trust_remote_code, weights=weights, progress=progress)
    return hub.path, hub


def snapshot_identity(path: Path) -> HubModel | None:
    """The repository and commit of a folder `<cache>/models--ORG--NAME/snapshots/<commit>`, else None."""
    resolved = path.absolute()
    if not _COMMIT.fullmatch(resolved.name) or resolved.parent.name != "snapshots":
        return None
    kind, _, rest = resolved.parent.parent.name.partition("--")
    if kind != "models" or not rest:
        return None
    return HubModel(repo_id=rest.replace("--", "/"), revision=None, commit=resolved.name, path=path)


def model_file_patterns(trust_remote_code: bool, weights: bool = True) -> list[str]:
    """allow_patterns for snapshot_download: the files convert reads, never pickled weights."""
    return [*_CONFIG_FILES, *(_WEIGHT_FILES if weights else ()), *TOKENIZER_FILES,
            *(("*.py",) if trust_remote_code else ())]


def download_model(repo_id: str, revision: str | None, *, trust_remote_code: bool = False, weights: bool = True,
                   progress: Progress | None = None) -> HubModel:
    """Fetch (or find in the cache) the files convert needs of `repo_id` at `revision` (without the weights
    when `weights` is False)."""
    label = repo_id + (f"@{revision}" if revision else "")
    folder = Path(fetch_snapshot(repo_id, revision, repo_type="model", allow_patterns=model_file_patterns(
        trust_remote_code, weights), label=label, what="model", progress=progress))
    commit = folder.name
    if weights and not any(folder.glob("*.safetensors")):
        raise LlmxError(f"hub model {label} (commit {commit[:12]}) publishes no safetensors weights; llmx never "
                        "loads pickled *.bin/*.pt weights (loading them can run code), so pick a repository or "
                        "revision with *.safetensors files.")
    return HubModel(repo_id=repo_id, revision=revision, commit=commit, path=folder)


def fetch_snapshot(repo_id: str, revision: str | None, *, repo_type: str, allow_patterns: list[str], label: str,
                   what: str, instead: str = "pass a local folder", progress: Progress | None = None) -> str:
    """snapshot_download of the top-level files matching `allow_patterns`, its failures as one LlmxError.

    what: "model" or "dataset", for the messages; instead: what the user can do without the hub. Files in
    subfolders are left out unless a pattern names the folder (a dataset's data/ shards).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    subfolders = any("/" in p for p in allow_patterns)
    try:
        return snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns,
                                 ignore_patterns=None if subfolders else ["*/*"],
                                 tqdm_class=progress_tqdm(progress, f"download {label}") if progress else None)
    except GatedRepoError:
        raise LlmxError(f"hub {what} {label} is gated: accept its terms on https://huggingface.co/"
                        f"{'datasets/' if repo_type == 'dataset' else ''}{repo_id} and set HF_TOKEN (or run "
                        "`hf auth login`) with an account that has access.") from None
    except RevisionNotFoundError:
        raise LlmxError(f"hub {what} {repo_id} has no revision {revision!r}; pass a branch, tag or commit it "
                        "has.") from None
    except RepositoryNotFoundError:
        raise LlmxError(f"{label} is neither a local path nor a {what} on the Hugging Face hub (a private "
                        "repository also needs HF_TOKEN); check the spelling.") from None
    except LocalEntryNotFoundError as exc:
        raise LlmxError(_unreachable_message(label, what, instead, exc)) from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "an error")
        raise LlmxError(f"the Hugging Face hub answered {status} for {what} {label}; retry later, or "
                        f"{instead}.") from None
    except (OSError, ConnectionError) as exc:
        raise LlmxError(f"could not download hub {what} {label} ({type(exc).__name__}: {_first_line(exc)}); "
                        f"check the network, or {instead}.") from None


def _unreachable_message(label: str, what: str, instead: str, exc: Exception) -> str:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return (f"hub {what} {label} is not in the hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
                f"set; download it once with network access (unset HF_HUB_OFFLINE), or {instead}.")
    detail = _first_line(exc).removeprefix("Got: ")
    return (f"{label} is not a local path, and as a hub {what} it is not in the hub cache ({constants.HF_HUB_CACHE}) "
            f"and the hub could not be reached ({detail}); check the network, or {instead}.")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


def progress_tqdm(progress: Progress, stage: str) -> type:
    """A tqdm class for huggingface_hub that draws nothing and reports the downloaded bytes to `progress`.

    huggingface_hub makes bars for the bytes written (the file sizes, reported as `stage`), the bytes received
    (which dedup and compression make smaller: not reported) and the files fetched ("`stage` files").
    """
    from tqdm.auto import tqdm

    class _Reporting(tqdm):
        def __init__(self, *args: Any, **kwargs: Any):
            unit, desc = kwargs.get("unit"), str(kwargs.get("desc") or "")
            self._stage = None if desc.startswith("Downloading bytes") else (
                stage if unit == "B" else f"{stage} files")
            self._done = int(kwargs.get("initial") or 0)
            kwargs["disable"] = True  # llmx draws progress itself (cli._console.stage_callback)
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            if self._stage is not None:
                progress(self._stage, self._done, int(self.total or 0))
            return super().update(n)

    return _Reporting
