"""Checkpoints: plain dicts written atomically, and loading a model back from one.

Keys: "format" (CHECKPOINT_FORMAT), "model" (state dict), "optimizer", "model_config" and
"train_config" (dicts), "step", "rng" (python, numpy and torch states).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from mapconnet.model import MAPConNet, ModelConfig

CHECKPOINT_FORMAT = "mapconnet-checkpoint-v1"


def save(path, payload: dict) -> Path:
    """torch.save to a temporary name, then rename: a crash never leaves a half checkpoint."""
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
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(payload["model_config"]) - fields
    if unknown:
        raise ValueError(f"checkpoint model config has unknown fields {sorted(unknown)}")
    return ModelConfig(**payload["model_config"])


def load_model(path, *, device="cpu", backend: str | None = None) -> MAPConNet:
    """The trained model of a checkpoint in eval mode (spectral norms frozen), on `device`,
    optionally with another kernels backend."""
    payload = load(path)
    cfg = model_config_from(payload)
    if backend is not None:
        cfg.backend = backend
    model = MAPConNet(cfg)
    model.load_state_dict(payload["model"])
    return model.to(device).eval()
