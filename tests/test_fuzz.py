"""The short version of ``bench/fuzz.py``: a few inputs per target (the same strategies and rules as the full run in
docs/reliability.md), each ending in an accepted input, a counted skip or a clear error naming the file, record or
option; no library traceback, no hang, no half-written output."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import fuzz  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

# inputs per target: 15, fewer where one input builds the CLI, decodes a 49 Mpx bomb or loads a model
INPUTS = {"config_yaml": 2, "cli_options": 2, "checkpoint": 3, "pretrained": 6, "image": 10, "tar_shards": 10}


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tokenizer_path, autoencoder_ckpt):
    return fuzz.make_assets(tmp_path_factory.mktemp("fuzz"), tokenizer_path, autoencoder_ckpt)


@pytest.mark.parametrize("target", fuzz.TARGETS, ids=lambda t: t.name)
def test_every_input_is_accepted_skipped_or_refused_by_name(target, assets):
    n = INPUTS.get(target.name, 15)
    tally = fuzz.run_target(target, assets, n, limit=30, seed=0, out=None, progress=False)
    assert tally.inputs == n
    assert not tally.failures and tally.outcomes["hang"] == 0, tally.failures
