"""Checkpoints: weights-only loading (no code runs), version errors, the shipped pretrained model."""
import os
import pickle

import pytest
import torch

from mapconnet import checkpoint as ckpt
from mapconnet.model import MAPConNet, ModelConfig

TINY = dict(feature_dim=16, encoder_widths=(8, 16), residual_blocks=1, decoder_widths=(16, 8))


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": ckpt.CHECKPOINT_FORMAT, "model": _Exploit(), "model_config": {}}, f)
    with pytest.raises(ValueError, match="cannot read checkpoint .* as a plain tensor file"):
        ckpt.load_model(path)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_round_trip_and_version_errors(tmp_path):
    model = MAPConNet(ModelConfig(**TINY))
    from dataclasses import asdict

    path = ckpt.save(tmp_path / "c.pt", {"model": model.state_dict(), "model_config": asdict(model.cfg), "step": 3})
    loaded = ckpt.load_model(path, backend="torch")
    assert loaded.cfg.backend == "torch" and not loaded.training
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    old = tmp_path / "old.pt"
    torch.save({"format": "mapconnet-checkpoint-v1", "model": {}, "model_config": {}}, old)
    with pytest.raises(ValueError, match="is a mapconnet-checkpoint-v1 checkpoint from another version"):
        ckpt.load(old)
    edited = tmp_path / "edited.pt"
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.out")}
    ckpt.save(edited, {"model": state, "model_config": asdict(model.cfg)})
    with pytest.raises(ValueError, match=r"does not fit its own model config: missing weights \['decoder.out"):
        ckpt.load_model(edited)
    resized = {**model.state_dict(), "theta.weight": torch.zeros(3, 3)}
    ckpt.save(edited, {"model": resized, "model_config": asdict(model.cfg)})
    with pytest.raises(ValueError, match=r"does not fit its own model config \(size mismatch for theta.weight"):
        ckpt.load_model(edited)
    diverged = {**model.state_dict(), "theta.weight": torch.full_like(model.theta.weight, float("nan"))}
    ckpt.save(edited, {"model": diverged, "model_config": asdict(model.cfg)})
    with pytest.raises(ValueError, match=r"has NaN or inf in 1 weight tensors \(theta.weight\): the run .* diverged"):
        ckpt.load_model(edited)


def test_a_checkpoint_from_before_the_decoder_context_loads_without_it(tmp_path):
    """A model config saved before `decoder_neighbours` existed describes a decoder without the
    local context, whatever today's default is."""
    from dataclasses import asdict

    model = MAPConNet(ModelConfig(**TINY, decoder_neighbours=0))
    saved = {k: v for k, v in asdict(model.cfg).items() if k != "decoder_neighbours"}
    path = ckpt.save(tmp_path / "old.pt", {"model": model.state_dict(), "model_config": saved})
    assert ckpt.load_model(path).cfg.decoder_neighbours == 0


def test_export_weights_keeps_no_optimiser(tmp_path):
    from dataclasses import asdict

    model = MAPConNet(ModelConfig(**TINY))
    optimizer = torch.optim.Adam(model.parameters())
    src = ckpt.save(tmp_path / "train.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                             "model_config": asdict(model.cfg), "step": 5, "rng": ckpt.rng_state()})
    dst = ckpt.export_weights(src, tmp_path / "weights.pt", data="stream")
    payload = ckpt.load(dst)
    assert "optimizer" not in payload and "rng" not in payload
    assert payload["step"] == 5 and payload["data"] == "stream"
    ckpt.load_model(dst)


def test_pretrained_names():
    assert ckpt.resolve("runs/x/checkpoint.pt").name == "checkpoint.pt"
    for name, file in ckpt.PRETRAINED.items():
        if not (ckpt.PRETRAINED_DIR / file).is_file():
            with pytest.raises(FileNotFoundError, match=f"checkpoint '{name}': .* does not ship"):
                ckpt.resolve(name)


def shipped(name: str) -> bool:
    return (ckpt.PRETRAINED_DIR / ckpt.PRETRAINED[name]).is_file()


def unseen_rows(name: str, folder) -> dict[str, float]:
    """Mean PMD of a shipped model's output and of its reference rows on the unseen pairs of `folder`."""
    from mapconnet.data import TestPairs, open_dataset
    from mapconnet.evaluation import candidates, pair_metrics

    model = ckpt.load_model(name)
    pairs = TestPairs(open_dataset(folder), "unseen")
    batch = torch.utils.data.default_collate([pairs[i] for i in range(len(pairs))])
    with torch.no_grad():
        return {r: pair_metrics(m, batch["target"], "torch")["pmd"].mean().item()
                for r, m in candidates(model, batch).items()}


@pytest.mark.skipif(not shipped("pretrained"), reason="no pretrained model ships in mapconnet/pretrained yet")
def test_pretrained_model_beats_the_warped_and_identity_rows(tiny_dataset):
    """The shipped model on held-out pairs of a freshly generated set: its output is closer to the
    ground truth than its own warped mesh and than the identity mesh unchanged."""
    rows = unseen_rows("pretrained", tiny_dataset)
    assert rows["model"] < rows["warped"] and rows["model"] < rows["identity"]


@pytest.mark.skipif(not shipped("pretrained-animal"), reason="no animal model ships in mapconnet/pretrained yet")
def test_pretrained_animal_model_beats_the_warped_and_identity_rows(tmp_path):
    """The same for the shipped animal model, on animals of a seed its training set did not use."""
    from mapconnet.data.generate import main as generate
    from mapconnet.transfer import trained_species

    generate(["--out", str(tmp_path / "animals"), "--species", "quadruped", "--identities", "2", "--poses", "2",
              "--test-identities", "2", "--test-poses", "2", "--seed", "7", "--test-pairs", "4"])
    assert trained_species(ckpt.load(ckpt.resolve("pretrained-animal"))) == "quadruped"
    rows = unseen_rows("pretrained-animal", tmp_path / "animals")
    assert rows["model"] < rows["warped"] and rows["model"] < rows["identity"]
