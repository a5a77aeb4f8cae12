"""Hub repo ids through huggingface_hub's standard cache: only the files minip2p needs.

The cache is huggingface_hub's own (HF_HOME, HF_HUB_CACHE; ~/.cache/huggingface/hub), laid out
as models--owner--name/refs/<branch or tag> (a commit hash) and snapshots/<hash>/<files>. A model
that diffusers or `hf download` put there is used as it is, with no network call, so offline
(HF_HUB_OFFLINE=1) works; otherwise the missing files are fetched into that cache (never into
the package). Gated repos: huggingface_hub reads the token itself (HF_TOKEN, `hf auth login`).
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import MinipError

CONFIGS = ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
           "tokenizer/merges.txt", "unet/config.json", "vae/config.json",
           "text_encoder/config.json"]
OPTIONAL = ["tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json"]  # pad token
WEIGHT_STEMS = ["unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model",
                "text_encoder/model"]
COMMIT = re.compile(r"[0-9a-f]{40}")


def needed(variant: str | None) -> list[str]:
    """The files to fetch: configs, tokenizer tables and the three weights files."""
    v = f".{variant}" if variant else ""
    return CONFIGS + OPTIONAL + [f"{stem}{v}.safetensors" for stem in WEIGHT_STEMS]


def fetch_command(repo_id: str, revision: str | None, variant: str | None) -> str:
    """The `hf` command that fetches exactly those files into the cache."""
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo_id}{rev} " + " ".join(needed(variant))


def complete(folder: Path, variant: str | None) -> bool:
    """Does a snapshot folder hold every required file? (No variant asked: plain or fp16.)"""
    if not all((folder / f).is_file() for f in CONFIGS):
        return False
    kinds = [f".{variant}"] if variant else ["", ".fp16"]
    return all(any((folder / f"{stem}{k}.safetensors").is_file() for k in kinds)
               for stem in WEIGHT_STEMS)


def cached(repo_id: str, revision: str | None) -> tuple[Path | None, Path]:
    """(the snapshot folder of `revision` in the cache or None, the repo's cache folder)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    rev = revision or "main"
    ref = storage / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev if COMMIT.fullmatch(rev) else None
    snap = storage / "snapshots" / commit if commit else None
    return (snap if snap is not None and snap.is_dir() else None), storage


def resolve(repo_id: str, revision: str | None = None, variant: str | None = None) -> Path:
    """A Hub repo id -> a local snapshot folder with the files minip2p needs."""
    from huggingface_hub import constants
    snap, storage = cached(repo_id, revision)
    if snap is not None and complete(snap, variant):
        return snap                                       # cached already: no network at all
    where = f"'{repo_id}'" + (f" at revision '{revision}'" if revision else "")
    if constants.HF_HUB_OFFLINE:
        if storage.is_dir() and snap is None and revision:
            known = sorted(p.name for p in (storage / "refs").glob("*")) if (storage / "refs").is_dir() else []
            raise MinipError(f"revision '{revision}' of '{repo_id}' is not in the Hugging Face "
                             f"cache ({storage}; refs there: {', '.join(known) or 'none'}); "
                             f"offline (HF_HUB_OFFLINE=1), so fetch it online with: "
                             f"{fetch_command(repo_id, revision, variant)}")
        raise MinipError(f"could not download {where} from the Hugging Face Hub: offline "
                         f"(HF_HUB_OFFLINE=1) and not in the cache {constants.HF_HUB_CACHE}; "
                         f"are you offline? Fetch it with: {fetch_command(repo_id, revision, variant)}")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=needed(variant)))
    except RevisionNotFoundError:
        raise MinipError(f"revision '{revision}' does not exist in '{repo_id}' on the Hugging "
                         "Face Hub; give a branch, tag or commit hash of that repo") from None
    except GatedRepoError:
        raise MinipError(f"'{repo_id}' is gated: accept its terms on the Hub, then set HF_TOKEN "
                         "(or run `hf auth login`)") from None
    except RepositoryNotFoundError:
        raise MinipError(f"'{repo_id}' is not a repo on the Hugging Face Hub (or it is private: "
                         "set HF_TOKEN); check the id") from None
    except Exception as e:  # no network, Hub down ...: one line, no traceback
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise MinipError(f"could not download {where} from the Hugging Face Hub "
                         f"({type(e).__name__}: {first[:160]}); are you offline? Fetch it "
                         f"elsewhere with: {fetch_command(repo_id, revision, variant)}") from None
    if not complete(folder, variant):
        what = f"the {variant} variant files" if variant else "diffusers-layout safetensors files"
        raise MinipError(f"{where} on the Hub has no {what} (e.g. {needed(variant)[-3]}); "
                         "is it a Stable Diffusion repo? try without the variant or another repo")
    return folder
