"""Hub repo ids through huggingface_hub's standard cache: only the files minip2p needs.

The cache is huggingface_hub's own (HF_HOME, HF_HUB_CACHE; ~/.cache/huggingface/hub), laid out
as models--owner--name/refs/<branch or tag> (a commit hash) and snapshots/<hash>/<files>. A model
that diffusers or `hf download` put there is used as it is, with no network call, so offline
(HF_HUB_OFFLINE=1) works; otherwise the missing files are fetched into that cache (never into
the package). Gated repos: huggingface_hub reads the token itself (HF_TOKEN, `hf auth login`).
A snapshot is complete with its tokenizer in either layout the folder loader reads (vocab.json and
merges.txt, or only tokenizer.json). Errors stay short: one `hf download` command with patterns.
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import MinipError

CONFIGS = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
           "vae/config.json", "text_encoder/config.json"]
# a tokenizer folder in either layout ClipTokenizer.from_dir reads: the two BPE tables, or only
# tokenizer.json (what transformers >= 5 saves); the pad token comes from the optional files
TOKENIZER_LAYOUTS = (["tokenizer/vocab.json", "tokenizer/merges.txt"], ["tokenizer/tokenizer.json"])
OPTIONAL = ["tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json"]
WEIGHT_STEMS = ["unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model",
                "text_encoder/model"]
COMMIT = re.compile(r"[0-9a-f]{40}")
OFFLINE = "offline (HF_HUB_OFFLINE=1)"


def needed(variant: str | None) -> list[str]:
    """The files to fetch: configs, the tokenizer in either layout (the Hub client skips those a
    repo lacks) and the three weights files."""
    v = f".{variant}" if variant else ""
    tokenizer = [f for layout in TOKENIZER_LAYOUTS for f in layout]
    return CONFIGS + tokenizer + OPTIONAL + [f"{stem}{v}.safetensors" for stem in WEIGHT_STEMS]


def fetch_command(repo_id: str, revision: str | None, variant: str | None) -> str:
    """A short `hf` command that fetches what minip2p reads into the cache (the configs and
    tokenizer files, and the weights: every *model.safetensors, so also a safety checker's)."""
    rev = f" --revision {revision}" if revision else ""
    v = f".{variant}" if variant else ""
    return (f"hf download {repo_id}{rev} --include '*.json' --include '*.txt' "
            f"--include '*model{v}.safetensors'")


def complete(folder: Path, variant: str | None) -> bool:
    """Does a snapshot folder hold every required file (the tokenizer in either layout)? No
    variant asked: plain or fp16 weights."""
    if not all((folder / f).is_file() for f in CONFIGS):
        return False
    if not any(all((folder / f).is_file() for f in layout) for layout in TOKENIZER_LAYOUTS):
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
    fetch = fetch_command(repo_id, revision, variant)
    if constants.HF_HUB_OFFLINE:
        if storage.is_dir() and snap is None and revision:
            refs = storage / "refs"
            known = sorted(p.name for p in refs.glob("*")) if refs.is_dir() else []
            raise MinipError(f"revision '{revision}' is not in the HF cache (refs: "
                             f"{', '.join(known) or 'none'}); offline, so fetch it: {fetch}")
        what = "the cached model is incomplete" if snap is not None else \
            "the model is not in the Hugging Face cache"             # the command names the repo
        raise MinipError(f"{what}, {OFFLINE}; fetch it: {fetch}")
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
        raise MinipError(f"could not reach the Hugging Face Hub ({type(e).__name__}: "
                         f"{first[:40]}); offline? fetch it elsewhere: {fetch}") from None
    if not complete(folder, variant):
        what = f"the {variant} variant files" if variant else "diffusers-layout safetensors files"
        raise MinipError(f"{where} on the Hub has no {what} (e.g. {WEIGHT_STEMS[0]}"
                         f"{'.' + variant if variant else ''}.safetensors); is it a Stable "
                         "Diffusion repo? try without the variant or another repo")
    return folder
