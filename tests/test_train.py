"""train.py: every mode for one step, exact resume, torch vs chunked convergence, errors."""
import csv

import pytest
import torch

import trimesh

import train
from mapconnet.losses import LossConfig
from mapconnet.model import MAPConNet, ModelConfig

TINY = dict(feature_dim=16, encoder_widths=(8, 16), residual_blocks=1, decoder_widths=(16, 8))


def _run(tiny_dataset, out, backend="chunked", **kw):
    cfg = train.TrainConfig(data=str(tiny_dataset), out=str(out), val_every=100, val_pairs=1,
                            checkpoint_every=100, **kw)
    return train.main(cfg, ModelConfig(**TINY, backend=backend))


@pytest.mark.parametrize("mode", [dict(), dict(percentage=0, use_unlabelled=True),
                                  dict(percentage=50, use_unlabelled=True)], ids=["supervised", "unsupervised", "semi"])
def test_one_step_per_mode(tiny_dataset, tmp_path, mode):
    steps = 6 if mode.get("percentage") == 50 else 1  # the semi-supervised cycle has 6 kinds of step
    result = _run(tiny_dataset, tmp_path, max_steps=steps, **mode)
    kinds = [row["kind"] for row in result["history"]]
    if not mode:
        assert kinds == ["labelled"]
    elif mode["percentage"] == 0:
        assert kinds == ["unlabelled"]
    else:
        assert kinds[0] == "labelled" and "unlabelled" in kinds and kinds.count("labelled") == 3
    for row in result["history"]:
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("total", "rec", "edge", "mesh", "point"))
    for name in ("checkpoint.pt", "losses.csv", "val.csv", "losses.png"):
        assert (tmp_path / name).exists()


def test_resume_equals_uninterrupted(tiny_dataset, tmp_path):
    straight = _run(tiny_dataset, tmp_path / "a", max_steps=4, batch_size=1)["history"]
    first = _run(tiny_dataset, tmp_path / "b", max_steps=4, batch_size=1, stop_after=2)["history"]  # "interrupted"
    rest = _run(tiny_dataset, tmp_path / "b", max_steps=4, batch_size=1, resume=True)["history"]
    assert [r["step"] for r in first + rest] == [0, 1, 2, 3]
    assert [r["total"] for r in first + rest] == [r["total"] for r in straight]
    with open(tmp_path / "b" / "losses.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 1, 2, 3]


def _sphere_batches(steps, dtype=torch.float64):
    """Vertex-aligned training triplets on a 162-vertex sphere randomly stretched per mesh."""
    sphere = trimesh.creation.icosphere(subdivisions=2)
    v = torch.as_tensor(sphere.vertices, dtype=dtype)
    faces = torch.as_tensor(sphere.faces, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    stretch = lambda: v * (0.5 + torch.rand(3, generator=gen, dtype=dtype))  # noqa: E731
    for _ in range(steps):
        yield {"identity": stretch()[None], "pose": stretch()[None], "target": stretch()[None],
               "identity_faces": faces[None]}


def _curve(backend, steps=20):
    """Losses of `steps` supervised steps of train.py's step function, in float64 so that the only
    difference between backends is rounding (fp32 would let hard-matching flips amplify it)."""
    torch.manual_seed(0)
    model = MAPConNet(ModelConfig(**TINY, backend=backend)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.0, 0.9), eps=1e-3)
    loss_cfg, curve = LossConfig(), []
    for batch in _sphere_batches(steps):
        total = train.weighted_total(train.supervised_losses(model, batch, loss_cfg, backend), loss_cfg)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        curve.append(total.item())
    return torch.tensor(curve, dtype=torch.float64)


def test_chunked_and_dense_training_curves_agree():
    dense, chunked = _curve("torch"), _curve("chunked")
    torch.testing.assert_close(chunked, dense, rtol=1e-9, atol=1e-9)
    assert len(set(dense.tolist())) == len(dense)  # the model does change step to step


def test_errors(tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="--percentage 0 leaves data unlabelled but --use-unlabelled is off"):
        _run(tiny_dataset, tmp_path, max_steps=1, percentage=0)
    with pytest.raises(FileNotFoundError, match="dataset folder .* does not exist"):
        train.main(train.TrainConfig(data=str(tmp_path / "missing"), out=str(tmp_path), max_steps=1))
    _run(tiny_dataset, tmp_path / "r", max_steps=1)
    with pytest.raises(ValueError, match="was trained with model config"):
        train.main(train.TrainConfig(data=str(tiny_dataset), out=str(tmp_path / "r"), max_steps=2, resume=True),
                   ModelConfig(**{**TINY, "feature_dim": 8}))
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        ModelConfig(backend="gpu")
    with pytest.raises(ValueError, match="--bf16 autocast is for CUDA"):
        _run(tiny_dataset, tmp_path, max_steps=1, bf16=True)
