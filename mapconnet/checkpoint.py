"""Checkpoints: plain dicts written atomically, a model-config compatibility check, and loading a
model back from one (train.py writes them; evaluate.py and transfer.py read them).

Keys written by train.py: "format" (CHECKPOINT_FORMAT), "model" (state dict), "optimizer" (state
dict), "model_config", "loss_config" and "train_config" (plain dicts of the dataclasses), "step"
(optimizer steps done), "epoch" (float: samples drawn / pairs per epoch), "sampler" ({step kind:
samples drawn from that kind's stream}), "seconds" (training wall-clock so far), "rng" (`rng_state()`).
Only tensors, numbers, strings, lists, tuples and dicts are stored, and files are read with
`torch.load(weights_only=True)`: loading a checkpoint never runs code from it.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from mapconnet.files import replacing
from mapconnet.model import CANCELLED_BIAS, MAPConNet, ModelConfig

# v2: residual decoder options in the model config, loss terms keyed by LossConfig names, RNG
# states stored as plain tensors and numbers so that every checkpoint loads with weights_only=True.
CHECKPOINT_FORMAT = "mapconnet-checkpoint-v2"

# ModelConfig fields that choose how the model runs, not what it computes: a checkpoint may be
# resumed or evaluated with other values.
RUNTIME_FIELDS = ("backend", "checkpoint_decoder")
# ModelConfig fields whose "off" value in a checkpoint `--init` may turn on: the branch they add
# starts silent, so the grown model computes the same function as the checkpoint's and training
# goes on from it. Field -> (off value, prefix of the weights the branch adds, the weight
# that silences it or the prefix of those). A silencing weight the checkpoint lacks is set to zero:
# the decoder's projections start at zero anyway (model.MAPConNet.reset_parameters); the
# encoder's offsets map starts at zero only when grown: max_j (h + IN(0)) = h.
GROWABLE_FIELDS = {"decoder_neighbours": (0, "decoder.local", "decoder.local_out.weight"),
                   "decoder_hops": (0, "decoder.hop_", "decoder.hop_out."),
                   "encoder_neighbours": (0, "encoder.fc_offsets", "encoder.fc_offsets.weight"),
                   "encoder_global": (False, "encoder.fc_global", "encoder.fc_global.weight")}
# What a checkpoint written before a ModelConfig field existed computed: that field's value then.
BEFORE_FIELD = {"decoder_neighbours": 0, "decoder_hops": 0}


def save(path, payload: dict) -> Path:
    """torch.save to a temporary name in the same folder, then rename: a crash never leaves a half
    checkpoint, and readers see either the old file or the new one."""
    path = Path(path)
    with replacing(path) as tmp:
        torch.save({"format": CHECKPOINT_FORMAT, **payload}, tmp)
    return path


def read_tensor_file(path, what: str, expected: str):
    """torch.load `path` with weights_only (no code runs), on the CPU. `what` names the file in
    errors ("checkpoint"), `expected` says what it should have been; FileNotFoundError when it is
    missing, ValueError when it is corrupt or not a plain tensor file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"cannot read {what} {path} as a plain tensor file ({type(e).__name__}: {first}); "
                         f"expected {expected}") from None


def load(path) -> dict:
    """Read a checkpoint written by `save`; clear errors for missing, corrupt or foreign files."""
    path = Path(path)
    payload = read_tensor_file(path, "checkpoint", "a file written by train.py (weights and numbers only)")
    if isinstance(payload, dict) and str(payload.get("format", "")).startswith("mapconnet-checkpoint-") and \
            payload["format"] != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is a {payload['format']} checkpoint from another version of mapconnet; this "
                         f"version reads {CHECKPOINT_FORMAT} (retrain, or use the version that wrote it)")
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or "model" not in payload \
            or "model_config" not in payload:
        raise ValueError(f"{path} is not a mapconnet checkpoint (expected a dict with format {CHECKPOINT_FORMAT!r}, "
                         "\"model\" and \"model_config\")")
    broken = [k for k, v in payload["model"].items() if torch.is_tensor(v) and v.is_floating_point()
              and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"checkpoint {path} has NaN or inf in {len(broken)} weight tensors ({', '.join(broken[:3])}): "
                         "the run that wrote it diverged; use an earlier checkpoint")
    return _in_current_layout(payload)


def _in_current_layout(payload: dict) -> dict:
    """A checkpoint written by an earlier layout of the same model, in today's layout; the model
    computes the same function from it, so such a checkpoint evaluates and resumes as before.

    - The instance-normalised layers had biases (`model.CANCELLED_BIAS`): dropped, weights and Adam
      state (the norm cancelled them exactly).
    - `encoder_global` concatenated [h, max over vertices of h] before the feature layer fc3,
      whose instance norm cancelled the second half (a per-channel constant): fc3 keeps its first
      half of input columns, and the new `encoder.fc_global` map starts at zero.

    The optimizer's entries are numbered in parameter order: they are renumbered by name."""
    weights = payload["model"]
    cancelled = {k for k in weights if CANCELLED_BIAS.fullmatch(k)}
    cfg = model_config_from(payload)
    concatenated = cfg.encoder_global and "encoder.fc_global.weight" not in weights
    if not cancelled and not concatenated:
        return payload
    weights = {k: v for k, v in weights.items() if k not in cancelled}
    width = cfg.encoder_widths[1]
    if concatenated:
        weights["encoder.fc3.weight"] = weights["encoder.fc3.weight"][:, :width].clone()
        weights["encoder.fc_global.weight"] = weights["encoder.fc3.weight"].new_zeros(width, width)
    payload = {**payload, "model": weights}
    if "optimizer" in payload:
        names = [name for name, _ in MAPConNet(cfg).named_parameters()]
        old_order = []
        for name in names:
            if name == "encoder.fc_global.weight" and concatenated:
                continue
            old_order.append(name)
            if name.endswith(".weight") and name[: -len("weight")] + "bias" in cancelled:
                old_order.append(name[: -len("weight")] + "bias")
        new_index = {old: names.index(name) for old, name in enumerate(old_order) if name in names}
        opt = payload["optimizer"]
        state = {new_index[i]: dict(s) for i, s in opt["state"].items() if i in new_index}
        fc3 = names.index("encoder.fc3.weight")
        if concatenated and fc3 in state:
            state[fc3].update({k: v[:, :width].clone() for k, v in state[fc3].items()
                               if torch.is_tensor(v) and v.ndim == 2})  # exp_avg, exp_avg_sq
        groups = [{**g, "params": [new_index[i] for i in g["params"] if i in new_index]} for g in opt["param_groups"]]
        if concatenated:  # fc_global joins the first group with no state: Adam starts it at its first step
            groups[0]["params"] = sorted(groups[0]["params"] + [names.index("encoder.fc_global.weight")])
        payload["optimizer"] = {"state": state, "param_groups": groups}
    return payload


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors and numbers (weights_only-safe)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_config_from(payload: dict) -> ModelConfig:
    """The ModelConfig a checkpoint was trained with (fields it predates take BEFORE_FIELD values)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(payload["model_config"]) - fields
    if unknown:
        raise ValueError(f"checkpoint model config has unknown fields {sorted(unknown)}; "
                         f"expected only {sorted(fields)}")
    return ModelConfig(**{**BEFORE_FIELD, **payload["model_config"]})


def check_compatible(payload: dict, cfg: ModelConfig, where="checkpoint", grow: bool = False) -> None:
    """Raise ValueError if `cfg` describes another architecture than the checkpoint's model config.

    Runtime fields (RUNTIME_FIELDS: the kernels backend, decoder checkpointing) may differ; with
    `grow` (--init) a GROWABLE_FIELDS branch that is off in the checkpoint may be on in `cfg`.
    """
    saved = dataclasses.asdict(model_config_from(payload))
    given = dataclasses.asdict(cfg)
    grown = {k for k, (off, *_) in GROWABLE_FIELDS.items() if grow and saved[k] == off}
    diff = {k: (saved[k], given[k]) for k in given
            if k not in RUNTIME_FIELDS and k not in grown and saved[k] != given[k]}
    if diff:
        listed = "; ".join(f"{k}: checkpoint {a!r}, given {b!r}" for k, (a, b) in diff.items())
        also = f"; --init may also turn on {', '.join(GROWABLE_FIELDS)}" if grow else ""
        raise ValueError(f"{where} was trained with another model config ({listed}); expected the same "
                         f"architecture (only {', '.join(RUNTIME_FIELDS)} may change{also}): use the checkpoint's "
                         "config or a new output folder")


def load_grown(model: MAPConNet, weights: dict) -> None:
    """Load `weights` (of a config `check_compatible(..., grow=True)` accepted) into `model`; a
    branch the checkpoint lacked starts silent (GROWABLE_FIELDS), so the function is the checkpoint's."""
    state = model.state_dict()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    wrong = [k for k in missing if not k.startswith(tuple(p for _, p, _ in GROWABLE_FIELDS.values()))]
    if wrong or unexpected:
        raise ValueError(f"--init weights do not fit the model: {(wrong + list(unexpected))[:4]} "
                         "(missing or unexpected)")
    silencing = tuple(silent for _, _, silent in GROWABLE_FIELDS.values())
    with torch.no_grad():
        for name in missing:
            if name.startswith(silencing):
                state[name].zero_()


PRETRAINED_DIR = Path(__file__).parent / "pretrained"
# name accepted for --checkpoint -> file shipped in mapconnet/pretrained (weights only)
PRETRAINED = {"pretrained": "supervised.pt", "pretrained-unsupervised": "unsupervised.pt",
              "pretrained-semi": "semi.pt", "pretrained-animal": "animal.pt"}


def resolve(path) -> Path:
    """A checkpoint path, or one of the PRETRAINED names -> the file that ships in the package."""
    name = str(path)
    if name in PRETRAINED:
        shipped = PRETRAINED_DIR / PRETRAINED[name]
        if not shipped.is_file():
            available = sorted(k for k, f in PRETRAINED.items() if (PRETRAINED_DIR / f).is_file())
            raise FileNotFoundError(f"checkpoint {name!r}: {shipped} does not ship with this install of mapconnet; "
                                    f"shipped: {available}")
        return shipped
    return Path(path)


def export_weights(src, dst, **notes) -> Path:
    """Write the weights-only form of a training checkpoint (what ships in mapconnet/pretrained):
    format, model state, model config, step and training config, plus `notes` (plain values)."""
    payload = load(src)
    keep = {k: payload[k] for k in ("model", "model_config", "loss_config", "train_config", "step", "seconds")
            if k in payload}
    return save(dst, {**keep, **notes})


def load_model(path, *, device="cpu", backend: str | None = None) -> MAPConNet:
    """The trained model of a checkpoint (a path or a PRETRAINED name) in eval mode (spectral norms
    frozen), on `device`, optionally with another kernels backend."""
    path = resolve(path)
    payload = load(path)
    cfg = model_config_from(payload)
    if backend is not None:
        cfg = dataclasses.replace(cfg, backend=backend)
    model = MAPConNet(cfg)
    try:
        missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    except RuntimeError as e:  # a weight of another shape: torch lists every one, keep the first
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:200])
        raise ValueError(f"checkpoint {path} does not fit its own model config ({first})") from None
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit its own model config: missing weights {missing[:4]}, "
                         f"unexpected weights {unexpected[:4]} (a file edited or written by another version)")
    return model.to(device).eval()
