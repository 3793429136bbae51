"""An unlimited stream of fresh anny bodies: training samples with no dataset on disk.

    train.py --data stream --val-data data/published-lite    # every step draws new people and poses

Item g of a stream is a function of (seed, g) only, like the samples of a dataset folder, so
DataLoader workers agree and `--resume` continues exactly. Each item draws two identities (the
generator's phenotype sampler, BMI-checked) and two or three poses (the anatomical pose sampler),
poses them with anny, maps them to the stream's resolution, centres and shuffles them exactly as
`mapconnet.data.datasets` does. Unlike the generator, poses are not checked for self-intersection
(that test costs 25-85 ms per mesh); the pose ranges keep most of them collision-free.

`species="quadruped"` streams animals of `mapconnet.data.quadruped` instead, at its one resolution
`smal` (3,889 vertices): each item draws two identities (each from a random family) and poses
that pass the model's capsule self-intersection test on both (cheap, so they are checked).
"""
from __future__ import annotations

from functools import cached_property

import numpy as np
import torch

from . import anny_body, quadruped
from .datasets import bbox_centred, shuffled_item
from .resolution import RESOLUTIONS, apply_map, resolution_map

STREAM_KINDS = ("labelled", "unlabelled")
CANDIDATES = 3  # phenotypes drawn per item for the two people (the BMI check rejects a few)
ANIMAL_POSE_TRIES = 100  # candidate poses per animal pose; the last is kept if none passes (never seen)
STREAM_RESOLUTIONS = {"human": "lite", "quadruped": quadruped.RESOLUTION}  # the default of each species


class BodyStream(torch.utils.data.Dataset):
    """Samples of fresh anny bodies at one resolution; index g may be any integer >= 0.

    kind "labelled": identity a in pose p, pose mesh b in pose q and the ground truth a in pose q
    (the SupervisedPairs layout). kind "unlabelled": identity (a, p), pose (b, q) and P2 = (b, r),
    no ground truth (the UnlabelledTriplets layout). a and b are different people; p, q, r are
    different poses. Items carry the tensors of the dataset items (docs in mapconnet.data.datasets)
    without grid indices.
    """

    def __init__(self, kind: str = "labelled", resolution: str = "lite", seed: int = 0, species: str = "human"):
        if kind not in STREAM_KINDS:
            raise ValueError(f"stream kind must be one of {STREAM_KINDS}, got {kind!r}")
        quadruped.check_species(species, "stream species")
        if species == "quadruped" and resolution != quadruped.RESOLUTION:
            raise ValueError(f"a quadruped stream has one resolution, {quadruped.RESOLUTION!r} (the template's own "
                             f"{quadruped.NUM_VERTICES:,} vertices), got {resolution!r}")
        if species == "human" and resolution not in RESOLUTIONS:
            raise ValueError(f"stream resolution must be one of {sorted(RESOLUTIONS)}, got {resolution!r}")
        self.kind, self.resolution, self.seed, self.species = kind, resolution, int(seed), species

    def __getstate__(self):  # DataLoader workers rebuild the anny model instead of pickling it
        return {k: v for k, v in self.__dict__.items() if k not in ("_model", "_sampler", "_map")}

    @cached_property
    def _model(self):
        return quadruped.load_model() if self.species == "quadruped" else anny_body.load_model()

    @cached_property
    def _sampler(self):
        return anny_body.PoseSampler(self._model)

    @cached_property
    def _map(self):
        """(W, faces) of the stream's resolution (W None at `full` and for quadrupeds)."""
        model = self._model
        if self.species == "quadruped":
            return None, model.faces
        neutral = np.full((1, len(anny_body.PHENOTYPES)), 0.5, dtype=np.float32)
        rest = anny_body.posed_vertices(model, neutral, np.eye(4, dtype=np.float32)[None, None].repeat(104, 1))
        tag = f"anny{anny_body.anny_version()}-{anny_body.TOPOLOGY}"
        return resolution_map(self.resolution, rest[0].astype(np.float64), model.faces.numpy().astype(np.int64), tag)

    @property
    def faces(self) -> np.ndarray:
        """(F, 3) int64 faces of the stream's resolution (unshuffled)."""
        return self._map[1]

    @property
    def num_vertices(self) -> int:
        return int(self.faces.max()) + 1

    def set_epoch(self, epoch: int) -> None:
        """A stream has no epochs (every index is fresh); kept for the samples' common interface."""

    def __getitem__(self, g: int) -> dict:
        return self.__getitems__([g])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """Items of global indices `indices` (DataLoader's batched fetch): one anny call for every
        candidate identity's rest mesh (the BMI check) and one for every posed mesh of the batch."""
        if any(int(g) < 0 for g in indices):
            raise IndexError(f"stream indices must be >= 0, got {list(indices)}")
        labelled = self.kind == "labelled"
        rngs = [np.random.default_rng([self.seed, 0x5EED, int(g)]) for g in indices]
        if self.species == "quadruped":
            return [self._animal_item(rng, labelled) for rng in rngs]
        people = self._people(rngs)  # (2, 6) per item: persons a and b
        poses = [np.stack([self._sampler.sample(rng) for _ in range(2 if labelled else 3)]) for rng in rngs]
        # (phenotype, pose) of every mesh: a in p (and q, the ground truth); b in q (and r, P2),
        # with poses[i] = (q, p) or (q, p, r)
        order = [(0, 1), (0, 0), (1, 0)] if labelled else [(0, 1), (1, 0), (1, 2)]
        phenotypes = np.stack([pp[who] for pp in people for who, _ in order])
        pose_params = np.stack([pz[which] for pz in poses for _, which in order])
        W, faces = self._map
        meshes = bbox_centred(apply_map(W, anny_body.posed_vertices(self._model, phenotypes, pose_params)))
        items = []
        for i, rng in enumerate(rngs):
            identity, first, second = meshes[3 * i: 3 * i + 3]
            if labelled:  # identity (a, p), pose (b, q), target (a, q)
                items.append(shuffled_item(rng, faces, identity, second, target=first))
            else:  # identity (a, p), pose (b, q), P2 (b, r)
                items.append(shuffled_item(rng, faces, identity, first, extra_pose_meshes={"pose2": second}))
        return items

    def _animal_item(self, rng: np.random.Generator, labelled: bool) -> dict:
        """One item of two animals a, b (families drawn at random) in poses that pass the
        self-intersection test on both; the same layout as the human items."""
        model, families = self._model, list(quadruped.FAMILIES)
        shapes = quadruped.sample_identities([families[i] for i in rng.integers(len(families), size=2)], rng)
        sampler = quadruped.PoseSampler()
        poses = []
        for _ in range(2 if labelled else 3):  # q, p (and r)
            for _ in range(ANIMAL_POSE_TRIES):
                pose = sampler.sample(rng)
                if not model.collisions(shapes, pose[None]).any():
                    break
            poses.append(pose)
        meshes = model.posed_vertices(shapes, np.stack(poses))  # (2, 2 or 3, V, 3)
        faces = model.faces
        if labelled:  # identity (a, p), pose (b, q), target (a, q)
            identity, pose, target = bbox_centred(np.stack([meshes[0, 1], meshes[1, 0], meshes[0, 0]]))
            return shuffled_item(rng, faces, identity, pose, target=target)
        identity, pose, pose2 = bbox_centred(np.stack([meshes[0, 1], meshes[1, 0], meshes[1, 2]]))
        return shuffled_item(rng, faces, identity, pose, extra_pose_meshes={"pose2": pose2})

    def _people(self, rngs) -> list[np.ndarray]:
        """Two phenotypes (2, 6) per item: CANDIDATES drawn from each item's generator, checked in
        one batched anny call, the first two in range kept (more drawn in the rare case of fewer)."""
        drawn = np.stack([[anny_body.sample_phenotype(rng) for _ in range(CANDIDATES)] for rng in rngs])
        ok = anny_body.bmi_in_range(self._model, drawn.reshape(-1, drawn.shape[-1])).reshape(len(rngs), CANDIDATES)
        people = []
        for rng, candidates, keep in zip(rngs, drawn, ok):
            kept = list(candidates[keep][:2])
            if len(kept) < 2:
                kept += list(anny_body.sample_identities(self._model, 2 - len(kept), rng)[0])
            people.append(np.stack(kept))
        return people
