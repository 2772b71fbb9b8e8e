"""`infinite-llm generate` from the command line (in-process)."""

from __future__ import annotations

import json

import pytest

from infinite_llm.entrypoints.cli import main
from tests.hf_fixtures import write_tiny_checkpoint

ARGS = ["generate", "--prompt", "Hello", "--max-tokens", "3", "--ignore-eos", "--json"]


def test_generate_on_the_builtin_model_says_its_weights_are_random(capsys):
    assert main(ARGS) == 0
    out, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if "random weights" in line]
    assert len(notes) == 1 and "noise" in notes[0] and "--model" in notes[0]
    assert len(json.loads(out.splitlines()[0])["output_token_ids"]) == 3  # stdout stays pure JSON


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt-cli"), arch="llama", seed=2)


def test_generate_on_a_checkpoint_folder_has_no_note(capsys, checkpoint):
    assert main([*ARGS, "--model", str(checkpoint)]) == 0
    out, err = capsys.readouterr()
    assert "random weights" not in err
    assert len(json.loads(out.splitlines()[0])["output_token_ids"]) == 3
