"""Every study in studies/ runs: one short trial of each through `dlsearch train`, as a user would start
(the custom_* studies run end to end in test_custom.py).

(That every file validates is in test_spec; the long runs of the reference studies are in BENCHMARKS.md
and the issues' notes.) The transfer study runs from scratch here: its source is a study's registered
model, which tests/test_transfer.py builds and fine-tunes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dlsearch.cli.commands import main

REPO = Path(__file__).resolve().parents[1]
# The bring-your-own-code studies run end to end in test_custom.py (custom_cnn.yaml's loader is slow).
STUDIES = sorted(p.name for p in (REPO / "studies").glob("*.yaml") if not p.name.startswith("custom_"))
# A thousand samples and two epochs: the study's own settings, made quick.
QUICK = ["--set", "train.epochs=2", "--set", "data.subset=1000", "--set", "train.device=cpu"]
EXTRA = {"digits_transfer.yaml": ["--set", "model.init_from=null"]}


@pytest.fixture(autouse=True)
def one_thread():
    # Small sequence-model steps are many tiny ops: with a second process about (Ray's agents after an
    # earlier test), two intra-op threads mostly wait for each other. A trial under Ray gets its CPUs' worth.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", STUDIES)
def test_every_study_trains_one_quick_trial(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (REPO.parent / "shared" / "data" / "mnist").is_dir():
        pytest.skip("no MNIST copy at ../shared/data")
    monkeypatch.chdir(REPO)  # relative data paths resolve against where dlsearch runs
    monkeypatch.setenv("DLSEARCH_DATA_DIR", str(REPO.parent / "shared" / "data"))
    args = ["train", f"studies/{name}", *QUICK, *EXTRA.get(name, []), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["state"] == "COMPLETE" and summary["epochs_run"] == 2
    assert summary["test_accuracy"] > 0.25, summary  # learning: chance is 10% on the 10-class tasks
