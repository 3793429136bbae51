"""Checkpoints: plain dicts written atomically, a model-config compatibility check, and loading a
model back from one (train.py writes them; evaluate.py and transfer.py read them).

Keys written by train.py: "format" (CHECKPOINT_FORMAT), "model" (state dict), "optimizer" (state
dict), "model_config", "loss_config" and "train_config" (plain dicts of the dataclasses), "step"
(optimizer steps done), "epoch" (float: samples drawn / pairs per epoch), "sampler" ({step kind:
samples drawn from that kind's stream}), "rng" ({"python", "numpy", "torch", "cuda"} states).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from mapconnet.model import MAPConNet, ModelConfig

CHECKPOINT_FORMAT = "mapconnet-checkpoint-v1"

# ModelConfig fields that choose how the model runs, not what it computes: a checkpoint may be
# resumed or evaluated with other values.
RUNTIME_FIELDS = ("backend", "checkpoint_decoder")


def save(path, payload: dict) -> Path:
    """torch.save to a temporary name in the same folder, then rename: a crash never leaves a half
    checkpoint, and readers see either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    os.replace(tmp, path)
    return path


def load(path) -> dict:
    """Read a checkpoint written by `save`; clear errors for missing, corrupt or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a mapconnet checkpoint (expected a dict with format {CHECKPOINT_FORMAT!r})")
    return payload


def model_config_from(payload: dict) -> ModelConfig:
    """The ModelConfig a checkpoint was trained with."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(payload["model_config"]) - fields
    if unknown:
        raise ValueError(f"checkpoint model config has unknown fields {sorted(unknown)}; "
                         f"expected only {sorted(fields)}")
    return ModelConfig(**payload["model_config"])


def check_compatible(payload: dict, cfg: ModelConfig, where="checkpoint") -> None:
    """Raise ValueError if `cfg` describes another architecture than the checkpoint's model config.

    Runtime fields (RUNTIME_FIELDS: the kernels backend, decoder checkpointing) may differ.
    """
    saved = dataclasses.asdict(model_config_from(payload))
    given = dataclasses.asdict(cfg)
    diff = {k: (saved[k], given[k]) for k in given if k not in RUNTIME_FIELDS and saved[k] != given[k]}
    if diff:
        listed = "; ".join(f"{k}: checkpoint {a!r}, given {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{where} was trained with another model config ({listed}); expected the same "
                         f"architecture (only {', '.join(RUNTIME_FIELDS)} may change): use the checkpoint's "
                         "config or a new output folder")


def load_model(path, *, device="cpu", backend: str | None = None) -> MAPConNet:
    """The trained model of a checkpoint in eval mode (spectral norms frozen), on `device`,
    optionally with another kernels backend."""
    payload = load(path)
    cfg = model_config_from(payload)
    if backend is not None:
        cfg = dataclasses.replace(cfg, backend=backend)
    model = MAPConNet(cfg)
    model.load_state_dict(payload["model"])
    return model.to(device).eval()
