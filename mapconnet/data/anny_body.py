"""Identities and poses of the anny body model (anny 0.6.x, `anny-noeyes-notongue` topology).

Frame (anny): metres, Z up, the body's left is +X, its front is -Y, pelvis at the origin.
Pose parameters are anny's `local-ref` 4x4 transforms, one per bone (104): each bone's rotation is
expressed in the world-aligned axes of the reference (rest) pose, applied about the bone's head and
carried along by its parent. About +X a hanging limb swings backward, so forward flexion of a hip
or a shoulder is a negative angle about X. Right-side rotations mirror the left ones:
R_right = M R_left M with M = diag(-1, 1, 1), each side sampled independently.

The joint limits below are anatomical ranges that gave plausible humans (docs/DESIGN.md section 7), in
degrees; fingers, toes, eyes and the root stay at rest (no global rotation or translation, as in
the published data). One intensity s ~ U(0.3, 1) per pose scales every angle toward neutral so
that calm poses appear too.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

TOPOLOGY = "anny-noeyes-notongue"  # one closed surface, 13,348 vertices
MIRROR = np.diag([-1.0, 1.0, 1.0])

# (flex about X, lateral about Y, twist about Z) ranges in degrees for the axial chain.
AXIAL_LIMITS = {
    **{f"spine0{i}": ((-5, 12), (-6, 6), (-7, 7)) for i in range(1, 6)},
    **{f"neck0{i}": ((-8, 12), (-7, 7), (-10, 10)) for i in range(1, 4)},
    "head": ((-15, 20), (-10, 10), (-20, 20)),
}
# Per-side limits (left side; the right side is mirrored).
SHOULDER_ELEVATION = (10, 150)  # from straight down
SHOULDER_PLANE = (-30, 90)  # 0 lateral, 90 forward
SHOULDER_TWIST = (-45, 45)
CLAVICLE_ELEVATION = (-5, 12)  # plus a quarter of the arm's elevation above 80 degrees
CLAVICLE_PROTRACTION = (-10, 10)
ELBOW_FLEX = (-35, 95)  # about the hinge axis, relative to the pre-flexed rest
FOREARM_TWIST = (-50, 50)
WRIST_FLEX, WRIST_DEVIATION = (-40, 40), (-15, 15)
HIP_FLEX, HIP_ABDUCTION, HIP_TWIST = (-20, 100), (-10, 30), (-30, 30)
KNEE_FLEX = (0, 120)  # with probability 0.4 scaled down to near-straight
# Ankle: positive = plantarflexion (toes down, anatomically up to ~50 degrees), negative =
# dorsiflexion (toes up, ~20 degrees); both kept inside the anatomical range.
ANKLE_PLANTARFLEXION, ANKLE_INVERSION, ANKLE_ROTATION = (-20, 35), (-15, 15), (-15, 15)

# Identity ranges (anny phenotype values in [0, 1]) that give varied adults: age 0.72..0.90 is
# about 17..83 years (anny's age is piecewise: 0.67 = 16 y, 0.77 = 18 y, 0.83 = 64 y); height
# 0.2..0.6 is about 1.51..1.98 m; gender bimodal so both sexes are well represented with some
# androgynous bodies; muscle and weight span thin to heavy; a rest-mesh BMI outside 17..36 is
# rejected so that the extremes of the weight range stay realistic.
PHENOTYPES = ("gender", "age", "muscle", "weight", "height", "proportions")
AGE, MUSCLE, WEIGHT, HEIGHT, PROPORTIONS = (0.72, 0.90), (0.05, 0.95), (0.05, 0.95), (0.2, 0.6), (0.2, 0.8)
BMI_RANGE = (17.0, 36.0)


def rotation(axis, degrees: float) -> np.ndarray:
    """(3, 3) float64 rotation by `degrees` about `axis` ((3,), normalised here; Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / np.linalg.norm(axis)
    a = math.radians(degrees)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * K + (1 - math.cos(a)) * K @ K


def swing(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(3, 3) smallest rotation taking direction a (3,) onto direction b (3,)."""
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    axis = np.cross(a, b)
    s = np.linalg.norm(axis)
    if s < 1e-9:
        return np.eye(3)
    return rotation(axis / s, math.degrees(math.atan2(s, float(a @ b))))


def euler_xyz(flex: float, lateral: float, twist: float) -> np.ndarray:
    """3x3 rotation: flex about X (positive bends an upright segment forward, toward -Y), then
    lateral about Y, then twist about Z (degrees)."""
    return rotation([0, 0, 1], twist) @ rotation([0, 1, 0], lateral) @ rotation([1, 0, 0], flex)


@lru_cache(maxsize=1)
def load_model():
    """The anny model in float32 (first call builds anny's cache: ~70-100 s, then 0.4 s)."""
    import anny

    model = anny.Anny(topology=TOPOLOGY, rig="anny").to(torch.float32)
    if tuple(model.phenotype_labels) != PHENOTYPES:
        raise RuntimeError(f"anny {anny_version()} orders its phenotypes {model.phenotype_labels}; this "
                           f"generator assumes {PHENOTYPES} (update mapconnet.data.anny_body)")
    return model


def anny_version() -> str:
    from importlib.metadata import version

    return version("anny")


class PoseSampler:
    """Samples (104, 4, 4) local-ref pose parameters within the anatomical limits above."""

    def __init__(self, model):
        self.bones = {name: i for i, name in enumerate(model.bone_labels)}
        with torch.no_grad():
            rest = model(pose_parameters=torch.eye(4).expand(1, len(self.bones), 4, 4).clone())
        heads = rest["rest_bone_heads"][0].double().numpy()  # (104, 3)
        head = lambda bone: heads[self.bones[bone]]  # noqa: E731
        self.upper_arm_rest = head("lowerarm01.L") - head("upperarm01.L")  # shoulder -> elbow
        self.upper_arm_rest /= np.linalg.norm(self.upper_arm_rest)
        forearm = head("wrist.L") - head("lowerarm01.L")
        self.forearm_rest = forearm / np.linalg.norm(forearm)  # pronation/supination axis
        self.elbow_hinge = np.cross(self.upper_arm_rest, forearm)
        self.elbow_hinge /= np.linalg.norm(self.elbow_hinge)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One pose: (104, 4, 4) float32 local-ref transforms (identity = rest)."""
        s = rng.uniform(0.3, 1.0)  # intensity: scales every angle toward neutral
        u = lambda lo_hi: s * rng.uniform(*lo_hi)  # noqa: E731
        R = {name: euler_xyz(u(f), u(lat), u(t)) for name, (f, lat, t) in AXIAL_LIMITS.items()}
        for side in ("L", "R"):
            left = self._left_limbs(rng, s, u)
            for name, rot in left.items():
                R[f"{name}.{side}"] = rot if side == "L" else MIRROR @ rot @ MIRROR
        pose = np.tile(np.eye(4), (len(self.bones), 1, 1))
        for name, rot in R.items():
            pose[self.bones[name], :3, :3] = rot
        return pose.astype(np.float32)

    def _left_limbs(self, rng, s, u) -> dict[str, np.ndarray]:
        rest_elevation = math.degrees(math.acos(-self.upper_arm_rest[2]))
        # Arm: sample a direction (elevation from straight down, plane of elevation), swing the rest
        # direction onto it, then twist about the arm. Composing flexion and abduction about world
        # axes instead swings raised arms behind the back.
        elevation = rest_elevation + s * (rng.uniform(*SHOULDER_ELEVATION) - rest_elevation)
        plane = math.radians(s * rng.uniform(*SHOULDER_PLANE))
        e = math.radians(elevation)
        target = np.array([math.sin(e) * math.cos(plane), -math.sin(e) * math.sin(plane), -math.cos(e)])
        shoulder = rotation(target, u(SHOULDER_TWIST)) @ swing(self.upper_arm_rest, target)
        clavicle_up = u(CLAVICLE_ELEVATION) + 0.25 * max(0.0, elevation - 80)
        knee = u(KNEE_FLEX) * (rng.uniform(0.0, 0.15) if rng.random() < 0.4 else 1.0)
        return {
            # elevation raises the lateral end (+X) upward: a rotation about -Y for the left side
            "clavicle": rotation([0, 0, 1], u(CLAVICLE_PROTRACTION)) @ rotation([0, -1, 0], clavicle_up),
            "upperarm01": shoulder,
            "lowerarm01": rotation(self.elbow_hinge, u(ELBOW_FLEX)),
            # pronation/supination turns the forearm about its own axis (not the upper arm's,
            # which would swing the pre-flexed forearm sideways)
            "lowerarm02": rotation(self.forearm_rest, u(FOREARM_TWIST)),
            "wrist": rotation([1, 0, 0], u(WRIST_FLEX)) @ rotation([0, 1, 0], u(WRIST_DEVIATION)),
            # hip flexion brings the leg forward (-Y): negative about X; abduction moves the left
            # leg toward +X: negative about Y
            "upperleg01": rotation([0, 0, 1], u(HIP_TWIST)) @ rotation([0, -1, 0], u(HIP_ABDUCTION))
            @ rotation([-1, 0, 0], u(HIP_FLEX)),
            "lowerleg01": rotation([1, 0, 0], knee),  # the shin swings backward
            # the foot points forward (-Y): a positive angle about +X turns the toes down
            "foot": rotation([0, 0, 1], u(ANKLE_ROTATION)) @ rotation([0, 1, 0], u(ANKLE_INVERSION))
            @ rotation([1, 0, 0], u(ANKLE_PLANTARFLEXION)),
        }


def sample_phenotype(rng: np.random.Generator) -> np.ndarray:
    """(6,) phenotype values in PHENOTYPES order."""
    r = rng.random()
    gender = rng.uniform(0, 0.15) if r < 0.4 else rng.uniform(0.85, 1) if r < 0.8 else rng.uniform(0, 1)
    return np.array([gender, rng.uniform(*AGE), rng.uniform(*MUSCLE), rng.uniform(*WEIGHT),
                     rng.uniform(*HEIGHT), rng.uniform(*PROPORTIONS)], dtype=np.float32)


def bmi_in_range(model, phenotypes: np.ndarray) -> np.ndarray:
    """(K,) bool: whether each phenotype (K, 6)'s rest mesh has a BMI inside BMI_RANGE (one anny call)."""
    import anny

    with torch.no_grad():
        rest = model(phenotype_kwargs=torch.from_numpy(np.asarray(phenotypes, dtype=np.float32)))["rest_vertices"]
        bmi = anny.Anthropometry(model).bmi(rest).reshape(-1).numpy()
    return (BMI_RANGE[0] <= bmi) & (bmi <= BMI_RANGE[1])


def sample_identities(model, count: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """`count` phenotypes whose rest-mesh BMI lies in BMI_RANGE; returns them and the rejections."""
    kept, rejected = [], 0
    while len(kept) < count:
        phenotype = sample_phenotype(rng)
        if bmi_in_range(model, phenotype[None])[0]:
            kept.append(phenotype)
        else:
            rejected += 1
    return np.stack(kept), rejected


def posed_vertices(model, phenotypes: np.ndarray, poses: np.ndarray) -> np.ndarray:
    """Meshes of one identity in many poses, or many identities in one pose (broadcast).

    Args: phenotypes (B or 1, 6), poses (B or 1, 104, 4, 4). Returns (B, 13348, 3) float32.
    """
    with torch.no_grad():
        out = model(pose_parameters=torch.from_numpy(poses), phenotype_kwargs=torch.from_numpy(phenotypes))
    return out["vertices"].numpy().astype(np.float32)
