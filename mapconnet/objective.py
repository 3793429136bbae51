"""The training objective: what one step of each kind computes (docs/DESIGN.md, "Training").

Terms are keyed by the `LossConfig` field that weights them ("reconstruction", "edge",
"mesh_contrastive", "point_contrastive"), so `weighted_total` is a plain dot product and a new term
cannot be logged without a weight.

- supervised step: Y = G(I, P) against the ground truth (a, q): reconstruction + edge, the
  mesh-level contrastive term in its standard form and the point-level term.
- unlabelled step (no ground truth anywhere), three passes summed:
  cross-consistency G(P2, P) must reproduce P (mesh term in its cross form);
  self-consistency Y1 = G(I, P) (contrastive terms only, then detached) and G(P2, Y1) must
  reproduce P again.
"""
from __future__ import annotations

from dataclasses import fields

import torch

from mapconnet.losses import (
    LossConfig,
    align,
    cross_triplets,
    edge,
    mesh_contrastive,
    point_contrastive,
    reconstruction,
    standard_triplets,
)
from mapconnet.model import TransferOutput

TERMS = ("reconstruction", "edge", "mesh_contrastive", "point_contrastive")


def supervised_losses(model, batch: dict, loss_cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Unweighted terms of a supervised step. batch: "identity", "pose", "target" (B, N, 3) and
    "identity_faces" (B, F, 3) int64, as `mapconnet.data` samples stack them."""
    out = model(batch["identity"], batch["pose"])
    return {"reconstruction": reconstruction(out.output, batch["target"], loss_cfg.centre_output),
            "edge": edge(out.output, batch["identity"], batch["identity_faces"]),
            **_contrastive(out, loss_cfg, _config(model).backend, cross=False)}


def unlabelled_losses(model, batch: dict, loss_cfg: LossConfig) -> dict[str, torch.Tensor]:
    """Unweighted terms of an unlabelled step. batch: "identity", "pose", "pose2" (B, N, 3) and
    "pose_faces" (B, F, 3); P = "pose" and P2 = "pose2" show one identity and share a vertex order."""
    identity, pose, pose2, faces = batch["identity"], batch["pose"], batch["pose2"], batch["pose_faces"]
    backend = _config(model).backend
    cc = model(pose2, pose)  # cross-consistency: P2 re-posed like P is P
    first = model(identity, pose)  # self-consistency pass 1: contrastive terms only
    sc = model(pose2, first.output.detach())  # pass 2: P2 re-posed like G(I, P) is P again
    centre = loss_cfg.centre_output
    terms = {"reconstruction": reconstruction(cc.output, pose, centre) + reconstruction(sc.output, pose, centre),
             "edge": edge(cc.output, pose2, faces) + edge(sc.output, pose2, faces)}
    parts = [_contrastive(cc, loss_cfg, backend, cross=True), _contrastive(first, loss_cfg, backend, cross=False),
             _contrastive(sc, loss_cfg, backend, cross=False)]
    for key in ("mesh_contrastive", "point_contrastive"):
        terms[key] = sum(p[key] for p in parts)
    return terms


def step_losses(model, batch: dict, kind: str, loss_cfg: LossConfig) -> dict[str, torch.Tensor]:
    """The terms of a step of `kind`: "labelled" is supervised, every other kind unlabelled."""
    return (supervised_losses if kind == "labelled" else unlabelled_losses)(model, batch, loss_cfg)


def _config(model):
    """The ModelConfig of a model, or of the model inside a DistributedDataParallel wrapper."""
    return getattr(model, "module", model).cfg


def _contrastive(out: TransferOutput, loss_cfg: LossConfig, backend: str, cross: bool) -> dict[str, torch.Tensor]:
    fw, fi, fp = out.warped_features, out.identity_features, out.pose_features
    triplets = cross_triplets(fw, fi, fp) if cross else standard_triplets(fw, fi, align(fp, out.matching))
    return {"mesh_contrastive": mesh_contrastive(*triplets, fw.shape[-1], loss_cfg.margin),
            "point_contrastive": point_contrastive(fw, fi, loss_cfg, backend)}


def weighted_total(terms: dict[str, torch.Tensor], loss_cfg: LossConfig) -> torch.Tensor:
    """sum over terms of LossConfig.<name> * term; a name that is not a LossConfig weight is an error."""
    weights = {f.name for f in fields(LossConfig)} & set(TERMS)
    unknown = set(terms) - weights
    if unknown:
        raise KeyError(f"loss terms {sorted(unknown)} have no weight in LossConfig; expected names from {TERMS}")
    return sum(getattr(loss_cfg, name) * value for name, value in terms.items())
