"""Generate a pose-transfer dataset from the anny body model.

    python -m mapconnet.data.generate --out data/demo --identities 8 --poses 32 \\
        --test-identities 4 --test-poses 8 --seed 0 --resolution lite --test-pairs 64 --preview

Writes DIR/vertices.npy ((I + TI, P + TP, V, 3) float32, memory-mappable; identities and poses in
manifest order: training first, then test), DIR/faces.npy ((F, 3) int64) and DIR/manifest.json
(anny and generator versions, seed, phenotypes, pose parameters, splits, test lists, checksums,
rejection counts). Everything is written into DIR.partial-<pid> and renamed when complete, so an
interrupted run leaves no half dataset (a stale partial folder is removed by the next run).
The same seed and arguments give byte-identical vertices.

Sizes: the demo set above (a couple of minutes on 2 cores); the published shape
`--identities 16 --poses 400 --test-identities 14 --test-poses 200 --resolution smpl`; a larger
one `--identities 30 --poses 800`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import anny_body
from .resolution import RESOLUTIONS, apply_map, resolution_map

GENERATOR_VERSION = "1"
POSE_CHUNK = 32  # meshes per anny forward


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="dataset folder to create")
    p.add_argument("--identities", type=int, default=8, help="training identities")
    p.add_argument("--poses", type=int, default=32, help="training poses")
    p.add_argument("--test-identities", type=int, default=4, help="unseen test identities")
    p.add_argument("--test-poses", type=int, default=8, help="unseen test poses")
    p.add_argument("--test-pairs", type=int, default=400, help="triplets per test list")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", choices=sorted(RESOLUTIONS), default="smpl")
    p.add_argument("--collision-identities", type=int, default=3,
                   help="a pose is kept only if collision-free on this many of the heaviest training identities")
    p.add_argument("--preview", action="store_true", help="render a grid of sampled bodies to DIR/preview.png")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    args = p.parse_args(argv)
    for name in ("identities", "poses", "test_identities", "test_poses", "test_pairs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.test_identities < 2 or args.test_poses < 2:
        p.error("--test-identities and --test-poses must be >= 2 (a test triplet needs two of each)")
    if args.poses < 2:
        p.error("--poses must be >= 2 (a training pair needs two poses)")
    return args


def _collides(detector, vertices: np.ndarray) -> bool:
    return bool((detector.detect_self_intersections(torch.from_numpy(vertices)) >= 0).any())


def sample_poses(model, sampler, count, rng, check_phenotypes, detector) -> tuple[np.ndarray, int]:
    """`count` poses, each collision-free on every check phenotype; returns them and the rejections."""
    kept, rejected = [], 0
    with tqdm(total=count, desc="sampling poses", unit="pose") as bar:
        while len(kept) < count:
            pose = sampler.sample(rng)
            meshes = anny_body.posed_vertices(model, check_phenotypes, pose[None].repeat(len(check_phenotypes), 0))
            if any(_collides(detector, m) for m in meshes):
                rejected += 1
                continue
            kept.append(pose)
            bar.update(1)
    return np.stack(kept), rejected


def test_lists(rng, train_ids, test_ids, test_poses, pairs) -> dict[str, list[list[int]]]:
    """[identity, identity_pose, pose_identity, pose] quadruples; ground truth (identity, pose).

    unseen: identities and poses both from the test split; seen: training identities in test poses.
    The identity and pose meshes show different people in different poses.
    """
    def draw(ids):
        a, b = rng.choice(ids, 2, replace=False) if len(ids) > 1 else (ids[0], ids[0])
        p, q = rng.choice(test_poses, 2, replace=False)
        return [int(a), int(p), int(b), int(q)]

    return {"unseen": [draw(test_ids) for _ in range(pairs)], "seen": [draw(train_ids) for _ in range(pairs)]}


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"dataset folder {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f"{out.name}.partial-*"):
        shutil.rmtree(stale)  # an interrupted earlier run: restart cleanly
    work = out.parent / f"{out.name}.partial-{os.getpid()}"
    work.mkdir()
    start = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)

    model = anny_body.load_model()
    from anny.utils.collision import SelfInterpenetrationModule

    detector = SelfInterpenetrationModule(model)
    n_ids, n_poses = args.identities + args.test_identities, args.poses + args.test_poses
    phenotypes, id_rejected = anny_body.sample_identities(model, n_ids, rng)
    heaviest = np.argsort(-phenotypes[: args.identities, 3])[: args.collision_identities]
    sampler = anny_body.PoseSampler(model)
    poses, pose_rejected = sample_poses(model, sampler, n_poses, rng, phenotypes[heaviest], detector)

    neutral = np.full((1, len(anny_body.PHENOTYPES)), 0.5, dtype=np.float32)
    rest = anny_body.posed_vertices(model, neutral, np.eye(4, dtype=np.float32)[None, None].repeat(104, 1))
    tag = f"anny{anny_body.anny_version()}-{anny_body.TOPOLOGY}"
    W, faces = resolution_map(args.resolution, rest[0].astype(np.float64), model.faces.numpy(), tag)
    V = W.shape[0] if W is not None else rest.shape[1]

    vertices = np.lib.format.open_memmap(work / "vertices.npy", mode="w+", dtype=np.float32, shape=(n_ids, n_poses, V, 3))
    with tqdm(total=n_ids * n_poses, desc=f"meshes ({args.resolution}, {V} vertices)", unit="mesh") as bar:
        for i in range(n_ids):
            for p0 in range(0, n_poses, POSE_CHUNK):
                chunk = poses[p0:p0 + POSE_CHUNK]
                vertices[i, p0:p0 + len(chunk)] = apply_map(W, anny_body.posed_vertices(model, phenotypes[i:i + 1], chunk))
                bar.update(len(chunk))
    vertices.flush()
    np.save(work / "faces.npy", faces.astype(np.int64))

    train_ids, test_ids = list(range(args.identities)), list(range(args.identities, n_ids))
    train_poses, test_poses = list(range(args.poses)), list(range(args.poses, n_poses))
    manifest = {
        "generator_version": GENERATOR_VERSION, "anny_version": anny_body.anny_version(),
        "topology": anny_body.TOPOLOGY, "resolution": args.resolution, "num_vertices": int(V),
        "seed": args.seed, "arguments": vars(args),
        "phenotype_labels": list(anny_body.PHENOTYPES), "phenotypes": phenotypes.tolist(),
        "pose_parameters": poses[:, :, :3, :3].round(6).tolist(),
        "train_identities": train_ids, "test_identities": test_ids,
        "train_poses": train_poses, "test_poses": test_poses,
        "test_lists": test_lists(rng, train_ids, test_ids, test_poses, args.test_pairs),
        "rejections": {"identities_bmi": id_rejected, "poses_collision": pose_rejected,
                       "pose_rejection_rate": pose_rejected / (pose_rejected + n_poses)},
        "sha256": {name: hashlib.sha256((work / name).read_bytes()).hexdigest() for name in ("vertices.npy", "faces.npy")},
        "seconds": round(time.perf_counter() - start, 1),
    }
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    if args.preview:
        from .preview import render_preview

        render_preview(vertices, faces, work / "preview.png")
    if out.exists():
        shutil.rmtree(out)
    os.replace(work, out)
    print(f"wrote {out}: {n_ids} identities x {n_poses} poses x {V} vertices in {manifest['seconds']} s; "
          f"pose rejection rate {manifest['rejections']['pose_rejection_rate']:.1%}")
    return out


if __name__ == "__main__":
    main()
