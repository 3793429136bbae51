"""Losses on hand-made cases with known values."""
import math

import pytest
import torch

from mapconnet import losses
from mapconnet.losses import LossConfig


def test_reconstruction():
    y, gt = torch.zeros(2, 4, 3), torch.zeros(2, 4, 3)
    gt[0, 0, 0] = 2.0  # one squared error of 4 over 2 * 4 * 3 entries
    assert losses.reconstruction(y, gt).item() == pytest.approx(4 / 24)


def test_centred_reconstruction_is_the_evaluated_error():
    """With centre=True the output is moved to its bounding-box centre first (targets are centred):
    a shifted copy of the target costs nothing, and one stray vertex costs its own error plus the
    shift it gives the box, on every vertex (what evaluation's re-centring does)."""
    gt = torch.tensor([[[-1.0, 0, 0], [0, 0, 0], [1, 0, 0]]])
    assert losses.reconstruction(gt + 0.3, gt, centre=True).item() == pytest.approx(0, abs=1e-12)
    assert losses.reconstruction(gt + 0.3, gt).item() == pytest.approx(0.09)
    stray = gt.clone()
    stray[0, 2, 0] = 2.0  # box [-1, 2]: centre 0.5, so x becomes [-1.5, -0.5, 1.5]
    assert losses.reconstruction(stray, gt, centre=True).item() == pytest.approx((0.25 + 0.25 + 0.25) / 9)


def test_edge_on_a_scaled_triangle():
    x = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]])
    faces = torch.tensor([[0, 1, 2]])
    assert losses.edge(x, x, faces).item() == 0
    assert losses.edge(2 * x, x, faces).item() == pytest.approx(1.0)  # every edge doubled: |2 - 1|
    y = x.clone()
    y[0, 1, 0] = 3.0  # edge 0-1: 3/1; edge 1-2: sqrt(10)/sqrt(2); edge 2-0 unchanged
    expected = (2 + abs(math.sqrt(5) - 1) + 0) / 3
    assert losses.edge(y, x, faces.expand(1, -1, -1)).item() == pytest.approx(expected, rel=1e-6)
    batch = torch.cat([x, 2 * x])  # vectorised over the batch: mean of 0 and 1
    assert losses.edge(batch, torch.cat([x, x]), faces).item() == pytest.approx(0.5)


def test_triplet_margin():
    a = torch.zeros(1, 2, 4)
    p = torch.zeros(1, 2, 4)
    n = torch.zeros(1, 2, 4)
    p[..., 0] = 0.5  # d_pos = 0.5
    n[..., 0] = 3.0  # d_neg = 3 -> relu(0.5 - 3 + 1) = 0
    assert losses.triplet_margin(a, p, n, 1.0).item() == 0
    n[..., 0] = 1.0  # relu(0.5 - 1 + 1) = 0.5
    assert losses.triplet_margin(a, p, n, 1.0).item() == pytest.approx(0.5)


def test_mesh_contrastive_uses_the_right_channels():
    F = 4
    w, i, p = torch.zeros(1, 3, F), torch.zeros(1, 3, F), torch.zeros(1, 3, F)
    p[..., :2] = 2.0  # the pose mesh differs only in its identity code
    # standard form, identity channels (W, I, P'): relu(0 - 2 sqrt 2 + 1) = 0;
    # pose channels (W, P', I): all zero there, relu(0 - 0 + 1) = 1
    value = losses.mesh_contrastive(*losses.standard_triplets(w, i, p), F, 1.0)
    assert value.item() == pytest.approx(1.0)
    # cross form, identity channels (P, I, W): relu(2 sqrt 2 - 2 sqrt 2 + 1) = 1; pose channels: relu(1) = 1
    assert losses.mesh_contrastive(*losses.cross_triplets(w, i, p), F, 1.0).item() == pytest.approx(2.0)


def test_point_contrastive_infonce_and_triplet():
    torch.manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(1, 20, 8), dim=-1)
    cfg = LossConfig(tau=0.05)
    perfect = losses.point_contrastive(f, f, cfg, backend="torch")
    shuffled = losses.point_contrastive(f, f[:, torch.randperm(20)], cfg, backend="torch")
    assert perfect < shuffled
    logits = f[0] @ f[0].T / 0.05
    expected = (torch.logsumexp(logits, -1) - logits.diagonal()).mean()
    torch.testing.assert_close(perfect, expected)
    tri = losses.point_contrastive(f, f, LossConfig(point_form="triplet"))
    assert 0 <= tri.item() <= 1.0  # d_pos = 0: relu(1 - d_neg) <= 1
    with pytest.raises(ValueError, match="point_form must be"):
        LossConfig(point_form="nce")


def test_align_gathers_pose_features():
    f = torch.arange(12.0).reshape(1, 4, 3)
    matching = torch.tensor([[3, 0, 0]])
    assert torch.equal(losses.align(f, matching)[0], f[0, [3, 0, 0]])


def test_edge_with_per_sample_faces_follows_the_shuffle():
    """Each sample's faces index its own shuffled vertices: shuffling a mesh and re-indexing its
    faces leaves the loss unchanged."""
    torch.manual_seed(0)
    x, y = torch.randn(1, 6, 3), torch.randn(1, 6, 3)
    faces = torch.tensor([[0, 1, 2], [2, 3, 4], [4, 5, 0], [1, 3, 5]])
    perm = torch.randperm(6)  # shuffled = original[perm]
    inverse = torch.argsort(perm)
    shuffled_faces = inverse[faces]
    ys, xs = torch.cat([y, y[:, perm]]), torch.cat([x, x[:, perm]])
    per_sample = torch.stack([faces, shuffled_faces])
    torch.testing.assert_close(losses.edge(ys, xs, per_sample), losses.edge(y, x, faces))


def test_point_triplet_known_value():
    """Two vertices, so the random negative is always the other one."""
    w = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])
    i = torch.tensor([[[0.0, 0.0], [3.0, 0.0]]])
    # vertex 0: d_pos 0, d_neg |(0,0) - (3,0)| = 3 -> 0; vertex 1: d_pos 2, d_neg |(1,0) - (0,0)| = 1 -> 2
    value = losses.point_contrastive(w, i, LossConfig(point_form="triplet"))
    assert value.item() == pytest.approx(1.0)


def test_weighted_total_is_keyed_by_loss_config_names():
    from mapconnet.objective import weighted_total

    terms = {"reconstruction": torch.tensor(1.0), "edge": torch.tensor(2.0), "mesh_contrastive": torch.tensor(3.0),
             "point_contrastive": torch.tensor(4.0)}
    assert weighted_total(terms, LossConfig()).item() == pytest.approx(1000 + 1 + 3 + 4)
    cfg = LossConfig(reconstruction=1, edge=0, mesh_contrastive=2, point_contrastive=0)
    assert weighted_total(terms, cfg).item() == pytest.approx(1 + 6)
    with pytest.raises(KeyError, match=r"loss terms \['rec'\] have no weight in LossConfig"):
        weighted_total({"rec": torch.tensor(1.0)}, cfg)
