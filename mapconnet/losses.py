"""MAPConNet's losses (docs/DESIGN.md section 5). Weights live in LossConfig, not in the functions."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kernels
from mapconnet.cli import POSITIVE, at_least, check_ranges


@dataclass
class LossConfig:
    reconstruction: float = 1000.0
    edge: float = 0.5
    mesh_contrastive: float = 1.0
    point_contrastive: float = 1.0
    margin: float = 1.0  # of the mesh-level triplet
    point_form: str = "infonce"  # "infonce" (every other vertex a negative) or "triplet" (published)
    tau: float = 0.07  # InfoNCE temperature
    # The reconstruction compares the output moved to its own bounding-box centre with the target
    # (every training mesh is bounding-box centred), which is the error evaluation measures: PMD
    # centres both meshes. False: the raw output, as published; then a few stray extreme vertices
    # move the output's box and evaluation's re-centring adds their shift to every vertex.
    centre_output: bool = True

    def __post_init__(self):
        if self.point_form not in ("infonce", "triplet"):
            raise ValueError(f"point_form must be 'infonce' or 'triplet', got {self.point_form!r}")
        check_ranges(self, {**{w: at_least(0) for w in ("reconstruction", "edge", "mesh_contrastive",
                                                          "point_contrastive", "margin")}, "tau": POSITIVE})


def centred(x: torch.Tensor) -> torch.Tensor:
    """(B, V, 3) meshes moved so that each bounding-box centre is at the origin."""
    return x - (x.amax(dim=1, keepdim=True) + x.amin(dim=1, keepdim=True)) / 2


def reconstruction(output: torch.Tensor, target: torch.Tensor, centre: bool = False) -> torch.Tensor:
    """Mean over batch, vertices and coordinates of (Y - Y_gt)^2 (unweighted). Inputs (B, N, 3);
    with `centre` Y is first moved to its bounding-box centre (LossConfig.centre_output)."""
    return F.mse_loss(centred(output) if centre else output, target)


def edge(output: torch.Tensor, reference: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Mean over faces and their three edges of | |Y_u - Y_v| / |X_u - X_v| - 1 | (unweighted).

    Args: output Y (B, N, 3); reference X (B, N, 3), the pass's identity mesh; faces (B, F, 3) or
    (F, 3) int64 indexing the N vertices (per sample after shuffling). One gather for the whole
    batch and all 3F edges; degenerate reference edges are clamped to length 1e-12.
    """
    B = output.shape[0]
    if faces.dim() == 2:
        faces = faces.expand(B, -1, -1)
    u = faces.reshape(B, -1)  # (B, 3F): corners 0, 1, 2 of every face
    v = faces.roll(-1, dims=-1).reshape(B, -1)  # (B, 3F): corners 1, 2, 0, so (u, v) are the edges

    def lengths(x):
        gather = lambda idx: x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
        return (gather(u) - gather(v)).norm(dim=-1)  # (B, 3F)

    return (lengths(output) / lengths(reference).clamp_min(1e-12) - 1).abs().mean()


def triplet_margin(anchor, positive, negative, margin: float) -> torch.Tensor:
    """mean_b relu(mean_i |A_i - P_i| - mean_i |A_i - N_i| + margin), |.| per vertex. Inputs (B, N, C)."""
    d_pos = (anchor - positive).norm(dim=-1).mean(dim=1)
    d_neg = (anchor - negative).norm(dim=-1).mean(dim=1)
    return F.relu(d_pos - d_neg + margin).mean()


def mesh_contrastive(identity_triplet, pose_triplet, feature_dim: int, margin: float) -> torch.Tensor:
    """Triplet margin on the identity-code channels plus the same on the pose-code channels.

    identity_triplet, pose_triplet: (anchor, positive, negative) vertex-aligned features (B, N, F).
    """
    half = feature_dim // 2
    ident = triplet_margin(*(t[..., :half] for t in identity_triplet), margin)
    pose = triplet_margin(*(t[..., half:] for t in pose_triplet), margin)
    return ident + pose


def standard_triplets(warped_f, identity_f, pose_f_aligned):
    """Standard form: identity channels (F_W, F_I, F_P'); pose channels (F_W, F_P', F_I)."""
    return (warped_f, identity_f, pose_f_aligned), (warped_f, pose_f_aligned, identity_f)


def cross_triplets(warped_f, identity_f, pose_f):
    """Cross-consistency form (shared vertex order): identity (F_P, F_I, F_W); pose (F_P, F_W, F_I)."""
    return (pose_f, identity_f, warped_f), (pose_f, warped_f, identity_f)


def point_contrastive(warped_f, identity_f, cfg: LossConfig, backend: str = "auto",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Vertex i of the warped mesh must match vertex i of the identity mesh. Inputs (B, N, F).

    "infonce": InfoNCE over all vertices on unit-normalised features (streaming, no N x N matrix);
    "triplet": relu(|W_i - I_i| - |W_i - I_j| + 1) with one random other vertex j per i.
    """
    if cfg.point_form == "infonce":
        return kernels.info_nce(F.normalize(warped_f, dim=-1), F.normalize(identity_f, dim=-1), tau=cfg.tau,
                                backend=backend)
    B, N, _ = warped_f.shape
    shift = torch.randint(1, max(N, 2), (B, N), generator=generator, device=warped_f.device)
    other = (torch.arange(N, device=warped_f.device) + shift) % N  # never i itself when N > 1
    negative = identity_f.gather(1, other.unsqueeze(-1).expand_as(identity_f))
    d_pos = (warped_f - identity_f).norm(dim=-1)
    d_neg = (warped_f - negative).norm(dim=-1)
    return F.relu(d_pos - d_neg + 1.0).mean()


def align(features: torch.Tensor, matching: torch.Tensor) -> torch.Tensor:
    """Re-order pose features (B, N_P, F) into identity order with matching (B, N_I) -> (B, N_I, F)."""
    return features.gather(1, matching.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
