"""Shared test set-up: seeds, the Triton interpreter on CPU-only machines, a tiny anny dataset."""
import os

import torch

# Triton decides between compiled and interpreted kernels when `kernels._triton_*` is imported, so
# the switch must be set before any test imports kernels. On a GPU machine the kernels compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A real anny dataset at the `lite` resolution: 3 train identities x 4 train poses,
    2 test identities x 2 test poses. Returns its folder (a pathlib.Path)."""
    from mapconnet.data.generate import main as generate

    out = tmp_path_factory.mktemp("data") / "tiny"
    generate(["--out", str(out), "--identities", "3", "--poses", "4", "--test-identities", "2",
              "--test-poses", "2", "--seed", "0", "--resolution", "lite", "--test-pairs", "6"])
    return out


@pytest.fixture(scope="session")
def animal_dataset(tmp_path_factory):
    """A real quadruped dataset (`mapconnet.data.quadruped`, 3,889 vertices): 3 train identities x
    3 train poses, 2 test identities x 2 test poses, families in turn. Returns its folder."""
    from mapconnet.data.generate import main as generate

    out = tmp_path_factory.mktemp("data") / "animals"
    generate(["--out", str(out), "--species", "quadruped", "--identities", "3", "--poses", "3",
              "--test-identities", "2", "--test-poses", "2", "--seed", "0", "--test-pairs", "4"])
    return out
