"""MAPConNet: encoder, streaming Sinkhorn correspondence and ElaIN decoder (docs/DESIGN.md section 4).

Tensors are channel-last, (B, N, C). Every layer acts per vertex (linear = 1x1 convolution) and
every normalisation pools over all vertices, so the model is equivariant to vertex order: permuting
the identity mesh's vertices permutes the output the same way, and the pose mesh's order does not
matter at all. The correspondence never builds an N_I x N_P matrix unless backend "torch" is asked for.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.checkpoint import checkpoint

import kernels
from mapconnet.cli import POSITIVE, at_least, check_ranges

DECODER_OUTPUTS = ("residual", "absolute")


@dataclass
class ModelConfig:
    feature_dim: int = 256  # encoder output F; the first half is the identity code, the second the pose code
    encoder_widths: tuple[int, int] = (64, 128)  # the two layers before the feature layer
    # Local shape context: the first encoder layer also reads the offsets to each vertex's k nearest
    # vertices of the same mesh (max over the neighbours, an EdgeConv); 0 = the published per-vertex layer.
    # Off by default: with encoder_global (k = 16) it cut the training loss 7% per step from scratch
    # but cost 33% more time per step on 2 cores; the shipped model has both, grown over a trained
    # model (README "Deviations from the paper").
    encoder_neighbours: int = 0
    # Whole-body context: the max over all vertices of the second layer, through a linear map
    # (fc_global, zero-initialised), is added to every vertex's second-layer features before their
    # LeakyReLU, so each vertex is rectified against what the whole body looks like (a raised arm,
    # a kicked leg). It must meet the features before a nonlinearity: a per-channel constant added
    # after it is cancelled by the feature layer's instance norm. False = the published encoder.
    # Grown over a trained model it did not help, and the shipped model is without it (README "Deviations").
    encoder_global: bool = False
    residual_blocks: int = 4
    # The published widths are (1024, 512, 256); 4x narrower stages cost 7x fewer decoder FLOPs
    # and keep a 2-core training step under 1.5 s (README "Deviations from the paper").
    decoder_widths: tuple[int, ...] = (256, 128, 64)
    # "residual": Y = W + D(.) with D's last layer zero-initialised, so an untrained model returns the
    # warped mesh; "absolute": the published Y = 2 * tanh(D(.)) (kept for the ablation).
    decoder_output: str = "residual"
    # The decoder reads [W, identity xyz] per vertex (both in identity vertex order) instead of W alone.
    decoder_sees_identity: bool = True
    # Local surface context for the decoder: each vertex also reads the offsets to its k nearest
    # vertices of the identity mesh, in W and in the identity (max over the neighbours, an EdgeConv
    # through a zero-initialised projection, so adding it leaves a model's function unchanged). The
    # per-vertex decoder cannot see W's local shape (a limb's direction, a patch the correspondence
    # collapsed); this shows it. 0 = the published per-vertex decoder. k = 8 cut the full-list
    # unseen PMD 15.40 -> 13.99 in 1,300 steps from the same weights (README "Deviations").
    decoder_neighbours: int = 8
    # Message passing inside the decoder: after each of its first `decoder_hops` stages every vertex
    # also reads the max over the same k identity neighbours of IN(hop_in(h_j) - hop_in(h_i)), through a
    # zero-initialised projection (so adding it leaves a model's function unchanged). Each hop widens
    # what a vertex sees by one ring of neighbours: a vertex the correspondence sent astray can be
    # pulled back by its neighbours' warped positions. Needs decoder_neighbours >= 1.
    decoder_hops: int = 0
    eps: float = 0.03  # Sinkhorn entropic regularisation (logits C / eps)
    iters: int = 5  # Sinkhorn iterations
    backend: str = "auto"  # kernels backend: auto, torch, chunked, keops, triton
    # Recompute each decoder stage in the backward (memory for time; in training mode the recompute
    # advances the spectral norms' power iteration once more, like a second forward would).
    checkpoint_decoder: bool = False
    init_gain: float = 0.02  # Xavier-normal gain of every linear weight

    def __post_init__(self):
        self.encoder_widths = tuple(self.encoder_widths)
        self.decoder_widths = tuple(self.decoder_widths)
        if self.feature_dim < 2 or self.feature_dim % 2:
            raise ValueError(f"feature_dim must be even and >= 2 (identity and pose halves), got {self.feature_dim}")
        if not self.decoder_widths:
            raise ValueError("decoder_widths must name at least one stage")
        widths = (lambda w: all(c >= 1 for c in w)), "widths >= 1"
        check_ranges(self, {"encoder_widths": widths, "decoder_widths": widths, "residual_blocks": at_least(0),
                            "encoder_neighbours": at_least(0), "decoder_neighbours": at_least(0),
                            "decoder_hops": at_least(0), "eps": POSITIVE, "iters": at_least(1),
                            "init_gain": POSITIVE})
        if self.decoder_hops > len(self.decoder_widths):
            raise ValueError(f"--decoder-hops must be at most the number of decoder stages "
                             f"({len(self.decoder_widths)}), got {self.decoder_hops}")
        if self.decoder_hops and not self.decoder_neighbours:
            raise ValueError("--decoder-hops needs the decoder's neighbours (--decoder-neighbours >= 1), got 0")
        if self.decoder_output not in DECODER_OUTPUTS:
            raise ValueError(f"decoder_output must be one of {DECODER_OUTPUTS}, got {self.decoder_output!r}")
        if self.backend != "auto" and self.backend not in kernels.dispatch.SOFTMAX_BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {kernels.dispatch.SOFTMAX_BACKENDS}, "
                             f"got {self.backend!r}")


@dataclass
class TransferOutput:
    output: torch.Tensor  # (B, N_I, 3) the identity mesh re-posed, identity vertex order
    warped: torch.Tensor  # (B, N_I, 3) the pose mesh's vertices warped into identity order
    identity_features: torch.Tensor  # (B, N_I, F) E(identity mesh)
    pose_features: torch.Tensor  # (B, N_P, F) E(pose mesh)
    warped_features: torch.Tensor  # (B, N_I, F) E(warped mesh)
    matching: torch.Tensor  # (B, N_I) int64: pose vertex matched to each identity vertex (no grad)


def instance_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample, per-channel normalisation over vertices. x (B, N, C)."""
    mean = x.mean(dim=1, keepdim=True)
    var = x.var(dim=1, unbiased=False, keepdim=True)
    return (x - mean) * torch.rsqrt(var + eps)


# Layers that an instance norm follows have no bias: the norm subtracts the per-channel mean, so a
# bias would cancel exactly and its gradient would be rounding noise, which Adam turns into random
# lr-sized steps (and which makes 1- and N-process training differ). Checkpoints written while these
# layers had biases carry them; `mapconnet.checkpoint.load` drops them (names matching CANCELLED_BIAS).
CANCELLED_BIAS = re.compile(r"encoder\.(fc1|fc_offsets|fc2|fc3|blocks\.\d+\.fc[12])\.bias|decoder\.local\.bias")


def normalised_linear(c_in: int, c_out: int) -> nn.Linear:
    """A linear map whose output goes through an instance norm: no bias (see CANCELLED_BIAS)."""
    return nn.Linear(c_in, c_out, bias=False)


class ResidualBlock(nn.Module):
    """h <- PReLU(h + IN(linear(PReLU(IN(linear(h))))))."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1, self.fc2 = normalised_linear(width, width), normalised_linear(width, width)
        self.act1, self.act2 = nn.PReLU(), nn.PReLU()

    def forward(self, h):
        return self.act2(h + instance_norm(self.fc2(self.act1(instance_norm(self.fc1(h))))))


@torch.compiler.disable
@torch.no_grad()
def nearest_vertices(x: torch.Tensor, k: int, rows: int = 2048) -> torch.Tensor:
    """Indices (B, N, k) of the k nearest vertices of x (B, N, 3) within the same mesh, nearest
    (the vertex itself) first. Computed `rows` vertices at a time: memory B * rows * N, never N x N."""
    k = min(k, x.shape[1])
    return torch.cat([torch.cdist(x[:, s:s + rows], x).topk(k, dim=-1, largest=False).indices
                      for s in range(0, x.shape[1], rows)], dim=1)


def neighbour_offsets(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x_j - x_i (B, N, k, C) for the neighbours idx (B, N, k) of every vertex of x (B, N, C)."""
    B, N, k = idx.shape
    x_j = x.gather(1, idx.reshape(B, N * k, 1).expand(-1, -1, x.shape[-1])).reshape(B, N, k, -1)
    return x_j - x.unsqueeze(2)


class Encoder(nn.Module):
    """Per-vertex features (B, N, F) of a mesh (B, N, 3)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        w1, w2 = cfg.encoder_widths
        self.neighbours, self.global_context = cfg.encoder_neighbours, cfg.encoder_global
        self.fc1 = normalised_linear(3, w1)
        if self.neighbours:
            self.fc_offsets = normalised_linear(3, w1)  # its own map and norm: offsets are ~100x smaller than x
        self.fc2 = normalised_linear(w1, w2)
        if self.global_context:
            self.fc_global = nn.Linear(w2, w2, bias=False)  # zero at start (MAPConNet.reset_parameters)
        self.fc3 = normalised_linear(w2, cfg.feature_dim)
        self.blocks = nn.ModuleList(ResidualBlock(cfg.feature_dim) for _ in range(cfg.residual_blocks))

    def first_layer(self, x):
        """fc1, plus with `encoder_neighbours` max over neighbours j of IN(fc_offsets(x_j - x_i))."""
        h = instance_norm(self.fc1(x))
        if not self.neighbours:
            return h
        offsets = neighbour_offsets(x, nearest_vertices(x, self.neighbours))  # (B, N, k, 3)
        B, N, k, _ = offsets.shape
        offsets = instance_norm(self.fc_offsets(offsets.reshape(B, N * k, 3)))
        return (h.unsqueeze(2) + offsets.reshape(B, N, k, -1)).amax(dim=2)

    def forward(self, x):
        h = self.first_layer(x)
        h = instance_norm(self.fc2(F.leaky_relu(h, 0.2)))
        if self.global_context:
            h = h + self.fc_global(h.amax(dim=1, keepdim=True))  # (B, 1, w2) broadcast over the vertices
        h = F.normalize(instance_norm(self.fc3(F.leaky_relu(h, 0.2))), dim=-1)
        for block in self.blocks:
            h = block(h)
        return h


LOCAL_WIDTH = 64  # channels of the decoder's local context (and of each hop) before its projection


class ElaIN(nn.Module):
    """Elastic instance normalisation of x (B, N, C) conditioned on an identity code z (B, N, Z).

    The scale and shift blend the code's prediction and x's own statistics with a learned
    per-channel weight w computed from the code's mean and x's mean:
    gamma = w * g(z') + (1 - w) * sigma_x, beta = w * b(z') + (1 - w) * mu_x.
    """

    def __init__(self, width: int, code_dim: int):
        super().__init__()
        self.code = nn.Linear(code_dim, width)
        self.blend = nn.Linear(2 * width, width)
        self.gamma, self.beta = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x, z):
        zc = self.code(z)  # (B, N, C)
        mu = x.mean(dim=1, keepdim=True)  # (B, 1, C)
        sigma = torch.sqrt(x.var(dim=1, unbiased=False, keepdim=True) + 1e-5)
        w = self.blend(torch.cat([zc.mean(dim=1, keepdim=True), mu], dim=-1))  # (B, 1, C)
        gamma = w * self.gamma(zc) + (1 - w) * sigma
        beta = w * self.beta(zc) + (1 - w) * mu
        return (x - mu) / sigma * (1 + gamma) + beta


class ElaINResBlock(nn.Module):
    """shortcut = SN(lrelu(ElaIN_s(x))); residual = SN(lrelu(ElaIN_1(SN(lrelu(ElaIN_0(x)))))); sum."""

    def __init__(self, width: int, code_dim: int):
        super().__init__()
        self.norm_s, self.norm_0, self.norm_1 = (ElaIN(width, code_dim) for _ in range(3))
        self.fc_s, self.fc_0, self.fc_1 = (spectral_norm(nn.Linear(width, width)) for _ in range(3))

    def forward(self, x, z):
        shortcut = self.fc_s(F.leaky_relu(self.norm_s(x, z), 0.2))
        h = self.fc_0(F.leaky_relu(self.norm_0(x, z), 0.2))
        return shortcut + self.fc_1(F.leaky_relu(self.norm_1(h, z), 0.2))


class Decoder(nn.Module):
    """Refines the warped mesh W (B, N, 3) into Y (B, N, 3) conditioned on the identity code.

    Residual form (default): Y = W + D(.); `out` starts at zero (see MAPConNet.reset_parameters),
    so the untrained decoder passes W through and training only has to learn the correction.
    Absolute form (published): Y = 2 * tanh(D(.)), which starts metres from any body.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        code_dim = cfg.feature_dim // 2
        widths = cfg.decoder_widths
        self.residual = cfg.decoder_output == "residual"
        self.sees_identity = cfg.decoder_sees_identity
        self.lift = nn.Linear(6 if self.sees_identity else 3, widths[0])
        self.neighbours = cfg.decoder_neighbours
        if self.neighbours:
            self.local = normalised_linear(6, LOCAL_WIDTH)  # [W_j - W_i, I_j - I_i] per neighbour
            self.local_out = nn.Linear(LOCAL_WIDTH, widths[0])  # zero-initialised (MAPConNet.reset_parameters)
        self.stages = nn.ModuleList(nn.Linear(c_in, c) for c_in, c in zip((widths[0],) + widths[:-1], widths))
        self.blocks = nn.ModuleList(ElaINResBlock(c, code_dim) for c in widths)
        hopped = widths[:cfg.decoder_hops]
        self.hop_in = nn.ModuleList(normalised_linear(c, LOCAL_WIDTH) for c in hopped)
        self.hop_out = nn.ModuleList(nn.Linear(LOCAL_WIDTH, c) for c in hopped)  # zero-initialised
        self.out = nn.Linear(widths[-1], 3)

    def forward(self, warped, code, identity=None, checkpoint_stages: bool = False):
        """warped (B, N, 3), code (B, N, F/2), identity (B, N, 3) in the same vertex order (read
        only with `decoder_sees_identity`) -> Y (B, N, 3). With `checkpoint_stages` each stage's
        activations (about 40 (B, N, C) tensors per stage) are recomputed in the backward, so
        only one stage's live at a time."""
        h = self.lift(torch.cat([warped, identity], dim=-1) if self.sees_identity else warped)
        idx = None
        if self.neighbours:
            # Neighbours come from the identity mesh: a surface, unlike W, where the correspondence
            # may have collapsed a patch. (B, N, k), the vertex itself left out.
            idx = nearest_vertices(identity, self.neighbours + 1)[..., 1:]
            # [W_j - W_i, I_j - I_i]: centimetre offsets of metre coordinates, so subtracted before the
            # map (mapping first would cancel digits, and make 1- and N-process training differ)
            local = edge_max(self.local(neighbour_offsets(torch.cat([warped, identity], dim=-1), idx)))
            h = h + self.local_out(F.leaky_relu(local, 0.2))
        for s, (stage, block) in enumerate(zip(self.stages, self.blocks)):
            run = lambda h, s=s, stage=stage, block=block: self.hop(s, block(stage(h), code), idx)  # noqa: E731
            h = checkpoint(run, h, use_reentrant=False) if checkpoint_stages else run(h)
        return warped + self.out(h) if self.residual else 2 * torch.tanh(self.out(h))

    def hop(self, s, h, idx):
        """h (B, N, C) after stage s, plus (for the first `decoder_hops` stages) its neighbours' message."""
        if s >= len(self.hop_in):
            return h
        # hop_in has no bias, so hop_in(h_j - h_i) = hop_in(h)_j - hop_in(h)_i: the map runs once per
        # vertex, not per edge (features and their differences are of one size, so no digits are lost)
        message = edge_max(neighbour_offsets(self.hop_in[s](h), idx))
        return h + self.hop_out[s](F.leaky_relu(message, 0.2))


def edge_max(edges: torch.Tensor) -> torch.Tensor:
    """(B, N, k, C) per-edge values -> (B, N, C): max over the k neighbours of the instance norm over
    all edges (the edge values are differences, far smaller than the values they came from)."""
    B, N, k, C = edges.shape
    return instance_norm(edges.reshape(B, N * k, C)).reshape(B, N, k, C).amax(dim=2)


class MAPConNet(nn.Module):
    """G(identity mesh, pose mesh) -> the identity re-posed, with the features the losses need."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg or ModelConfig()
        F_dim = self.cfg.feature_dim
        self.encoder = Encoder(self.cfg)
        self.theta, self.phi = nn.Linear(F_dim, F_dim), nn.Linear(F_dim, F_dim)
        self.decoder = Decoder(self.cfg)
        self.reset_parameters()

    def reset_parameters(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                spectral = hasattr(module, "parametrizations")
                weight = module.parametrizations.weight.original if spectral else module.weight
                nn.init.xavier_normal_(weight, gain=self.cfg.init_gain)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.decoder.residual:  # the untrained model returns the warped mesh exactly
            nn.init.zeros_(self.decoder.out.weight)
        if self.decoder.neighbours:  # the local context starts silent: adding it changes no function
            nn.init.zeros_(self.decoder.local_out.weight)
        for out in self.decoder.hop_out:  # so do the hops
            nn.init.zeros_(out.weight)
        if self.encoder.global_context:  # and the encoder's whole-body context
            nn.init.zeros_(self.encoder.fc_global.weight)

    def correspond(self, identity_features, pose_features, pose_vertices):
        """Warp the pose mesh into identity order; returns (W (B, N_I, 3), matching (B, N_I))."""
        q = F.normalize(self.theta(identity_features), dim=-1)
        k = F.normalize(self.phi(pose_features), dim=-1)
        warped, log_b = kernels.sinkhorn_correspondence(q, k, pose_vertices, eps=self.cfg.eps, iters=self.cfg.iters,
                                                        backend=self.cfg.backend, return_bias=True)
        matching = kernels.softmax_argmax(q, k, scale=1 / self.cfg.eps, bias=log_b, backend=self.cfg.backend)
        return warped, matching

    def forward(self, identity: torch.Tensor, pose: torch.Tensor) -> TransferOutput:
        """identity (B, N_I, 3), pose (B, N_P, 3) -> TransferOutput (N_I != N_P allowed)."""
        if identity.dim() != 3 or pose.dim() != 3 or identity.shape[-1] != 3 or pose.shape[-1] != 3:
            raise ValueError(f"identity and pose must be (B, N, 3) meshes, got {tuple(identity.shape)} "
                             f"and {tuple(pose.shape)}")
        if identity.shape[0] != pose.shape[0]:
            raise ValueError(f"identity and pose batch sizes differ: {identity.shape[0]} vs {pose.shape[0]}")
        f_identity, f_pose = self.encoder(identity), self.encoder(pose)
        warped, matching = self.correspond(f_identity, f_pose, pose)
        code = f_identity[..., : self.cfg.feature_dim // 2]
        output = self.decoder(warped, code, identity,
                              checkpoint_stages=self.cfg.checkpoint_decoder and torch.is_grad_enabled())
        return TransferOutput(output, warped, f_identity, f_pose, self.encoder(warped), matching)
