"""evaluate.py: metrics by hand, an end-to-end run on a tiny trained checkpoint, errors."""
import csv
import json

import numpy as np
import pytest
import torch
import trimesh

from mapconnet import evaluation as evaluate
from mapconnet import training as train
from mapconnet.checkpoint import load_model
from mapconnet.data import TestPairs, open_dataset
from mapconnet.model import ModelConfig

TINY = dict(feature_dim=16, encoder_widths=(8, 16), residual_blocks=1, decoder_widths=(16, 8), backend="chunked")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main(train.TrainConfig(data=str(tiny_dataset), out=str(out), max_steps=2, val_every=2, val_pairs=2,
                                 compile=False),
               ModelConfig(**TINY))
    return out / "checkpoint.pt"


def test_metrics_by_hand():
    target = torch.tensor([[[0.0, 0, 0], [2, 0, 0]]])
    shifted = target + torch.tensor([1.0, 1, 1])  # centring removes a translation
    m = evaluate.pair_metrics(shifted, target, "torch")
    assert m["pmd"].item() == 0 and m["cd"].item() == 0
    stretched = torch.tensor([[[0.0, 0, 0], [4, 0, 0]]])  # centred: (-2, 2) against (-1, 1)
    m = evaluate.pair_metrics(stretched, target, "kdtree")
    assert m["pmd"].item() == pytest.approx(2 / 6)  # (1 + 1) over 2 vertices x 3 coordinates
    assert m["cd"].item() == pytest.approx(2.0)  # 1 each way


def test_perfect_warp_is_the_pose_mesh_in_identity_order(tiny_dataset):
    """The reference row: the stored pose mesh (b, q) put into the identity mesh's vertex order."""
    dataset = open_dataset(tiny_dataset)
    pairs = TestPairs(dataset, "unseen")
    batch = torch.utils.data.default_collate([pairs[0], pairs[1]])
    warp = evaluate.perfect_warp(batch)
    for i in range(2):
        a, p, b, q = dataset.test_lists["unseen"][i]
        expected = dataset.mesh(b, q)[batch["identity_perm"][i].numpy()]
        np.testing.assert_array_equal(warp[i].numpy(), expected)
    # same person in the target's pose: the perfect warp of a pair whose pose mesh shows the
    # identity's own person is the target itself
    a, p, _, q = dataset.test_lists["unseen"][0]
    item = pairs._item(np.random.default_rng(0), a, p, a, q)
    same = evaluate.perfect_warp(torch.utils.data.default_collate([item]))
    np.testing.assert_array_equal(same[0].numpy(), item["target"].numpy())


def test_evaluate_end_to_end(tiny_dataset, tiny_checkpoint, tmp_path):
    cfg = evaluate.EvalConfig(checkpoint=str(tiny_checkpoint), data=str(tiny_dataset), out=str(tmp_path / "a"),
                              save_outputs=True, pictures=1, batch_size=4)
    metrics = evaluate.main(cfg)
    again = evaluate.main(evaluate.EvalConfig(**{**cfg.__dict__, "out": str(tmp_path / "b"), "save_outputs": False}))
    dataset = open_dataset(tiny_dataset)
    for name in ("unseen", "seen"):
        assert metrics[name]["pairs"] == len(dataset.test_lists[name])
        assert metrics[name]["pmd"] > 0 and metrics[name]["cd"] > 0
        assert metrics[name]["pmd"] == again[name]["pmd"]  # deterministic
        assert metrics[name]["pmd_x1e4"] == pytest.approx(metrics[name]["pmd"] * 1e4)
    on_disk = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert on_disk["unseen"]["pmd"] == metrics["unseen"]["pmd"] and len(on_disk["checkpoint_sha256"]) == 64
    with open(tmp_path / "a" / "pairs.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:8] == ["list", "pair", "identity", "identity_pose", "pose_identity", "pose", "pmd", "cd"]
    assert len(rows) == sum(len(dataset.test_lists[n]) for n in ("unseen", "seen"))
    pmd_unseen = np.mean([float(r["pmd"]) for r in rows if r["list"] == "unseen"])
    assert pmd_unseen == pytest.approx(metrics["unseen"]["pmd"])
    assert "identity mesh unchanged" in (tmp_path / "a" / "results.md").read_text()
    assert "perfect warp" in (tmp_path / "a" / "results.md").read_text()
    for name in ("unseen", "seen"):  # a warp that knows the true correspondence beats keeping the identity
        refs = metrics[name]["references"]
        assert refs["perfect_warp"]["pmd"] < refs["identity"]["pmd"]
    for png in [tmp_path / "a" / "pmd_hist_unseen.png", tmp_path / "a" / "pairs" / "unseen_0.png"]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The saved output is in the identity mesh's original vertex order: it equals the model run
    # on unshuffled meshes (the model is equivariant to vertex order).
    model = load_model(tiny_checkpoint)
    a, p, b, q = dataset.test_lists["unseen"][0]
    with torch.no_grad():
        direct = model(torch.from_numpy(dataset.mesh(a, p))[None], torch.from_numpy(dataset.mesh(b, q))[None])
    saved = trimesh.load(tmp_path / "a" / "outputs" / "unseen_0_output.ply", process=False)
    assert np.array_equal(np.asarray(saved.faces), dataset.faces)
    np.testing.assert_allclose(np.asarray(saved.vertices), direct.output[0].numpy(), atol=1e-4)
    warped = trimesh.load(tmp_path / "a" / "outputs" / "unseen_0_warped.ply", process=False)
    np.testing.assert_allclose(np.asarray(warped.vertices), direct.warped[0].numpy(), atol=1e-4)


def test_evaluate_errors(tiny_dataset, tiny_checkpoint, tmp_path):
    base = dict(checkpoint=str(tiny_checkpoint), data=str(tiny_dataset), out=str(tmp_path))
    with pytest.raises(ValueError, match="--list must be unseen, seen or all"):
        evaluate.main(evaluate.EvalConfig(**base, list="test"))
    with pytest.raises(FileNotFoundError, match="checkpoint .* does not exist"):
        evaluate.main(evaluate.EvalConfig(**{**base, "checkpoint": str(tmp_path / "none.pt")}))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="is not a mapconnet checkpoint"):
        evaluate.main(evaluate.EvalConfig(**{**base, "checkpoint": str(foreign)}))
    with pytest.raises(FileNotFoundError, match="dataset folder .* does not exist"):
        evaluate.main(evaluate.EvalConfig(**{**base, "data": str(tmp_path / "nodata")}))


@pytest.mark.parametrize("argv, message", [(["--max-pairs", "-3"], "--max-pairs must be >= 0, got -3"),
                                           (["--pictures", "-1"], "--pictures must be >= 0, got -1"),
                                           (["--list", "both"], "--list must be unseen, seen or all")])
def test_options_are_checked_when_parsed(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        evaluate.cli(["--out", str(tmp_path / "eval"), *argv])
    assert done.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_transfer_check_backends_agree(tiny_dataset, tiny_checkpoint, tmp_path):
    """bench.transfer_check evaluates one checkpoint per resolution and backend; torch (dense) and
    chunked (streamed) give the same PMD to 1e-5 relative."""
    from bench import transfer_check

    (tmp_path / "set-lite").symlink_to(tiny_dataset, target_is_directory=True)
    summary = transfer_check.main(["--checkpoint", str(tiny_checkpoint), "--data-prefix", str(tmp_path / "set"),
                                   "--pairs", "2", "--out", str(tmp_path / "check")])
    assert set(summary["results"]) == {"lite/torch", "lite/chunked"}  # smpl and full: no dataset, skipped
    assert summary["backend_spread"]["lite"] < 1e-5
    assert (tmp_path / "check" / "transfer-check.json").is_file()
