"""An instance on another host resolves the model itself and refuses files that differ from the
driver's (no reliance on the driver's cache)."""

from __future__ import annotations

import shutil

import pytest

from infinite_llm.model.files import fingerprint, resolve_on_this_host
from infinite_llm.model.loader import resolve_model_path
from tests.hf_fixtures import write_tiny_checkpoint


def test_same_files_resolve(tmp_path):
    write_tiny_checkpoint(tmp_path, arch="llama", seed=3)
    assert resolve_on_this_host(str(tmp_path), fingerprint(tmp_path)) == tmp_path


def test_default_model_is_rebuilt_identically_on_a_fresh_host(tmp_path, monkeypatch):
    driver = fingerprint(resolve_model_path("default"))
    monkeypatch.setenv("INFINITE_LLM_CACHE", str(tmp_path / "fresh-host-cache"))  # an empty cache
    folder = resolve_on_this_host("default", driver)
    assert str(folder).startswith(str(tmp_path))


def test_missing_or_different_files_are_refused_with_the_reason(tmp_path):
    write_tiny_checkpoint(tmp_path / "a", arch="llama", seed=3)
    expected = fingerprint(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="same path"):
        resolve_on_this_host(str(tmp_path / "missing"), expected)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    config = tmp_path / "b" / "config.json"
    config.write_text(config.read_text().replace('"rms_norm_eps"', '"rms_norm_eps_x"'))
    with pytest.raises(RuntimeError, match="differ from the driver's"):
        resolve_on_this_host(str(tmp_path / "b"), expected)
