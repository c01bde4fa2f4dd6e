"""Checkpoint files: written atomically, read back with one-line errors, turned back into a model.

A checkpoint is a dict holding at least "format_version", "model" (a state dict) and "model_config" (a dict).
train.py adds the optimiser, step and RNG states it needs to resume. Everything in it is a tensor, a number,
a string, or a list/dict/tuple of those, so it loads with torch.load(weights_only=True)."""

import torch

from cli import CLIError
from fileio import atomic_write, is_of, regular_file
from model import Transformer
from model_config import ModelConfig
from runtime import check_model_fits

CHECKPOINT_FORMAT_VERSION = 1


def save_checkpoint(state: dict, path) -> None:
    """Write state plus the format version to path atomically, so a crash mid-write leaves any previous file
    at path intact."""
    with atomic_write(path) as tmp:
        torch.save({**state, "format_version": CHECKPOINT_FORMAT_VERSION}, tmp)


def load_checkpoint(path, mmap: bool = False) -> dict:
    """Read a checkpoint onto the CPU (with mmap, its tensors are mapped from the file, read only when used). A
    missing, truncated, corrupt or foreign file, or an unknown format version, raises CLIError with one line."""
    path = regular_file(path, "checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch reports truncation and corruption through many exception types
        raise CLIError(f"checkpoint {path} is truncated or corrupt ({type(err).__name__})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_config", "format_version"} <= ckpt.keys():
        raise CLIError(f"{path} is not a checkpoint of this project (needs model, model_config, format_version)")
    if not is_of(ckpt["format_version"], int) or ckpt["format_version"] != CHECKPOINT_FORMAT_VERSION:
        raise CLIError(f"checkpoint {path} has format version {ckpt['format_version']!r}; "
                       f"this code reads version {CHECKPOINT_FORMAT_VERSION}")
    weights = ckpt["model"]
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise CLIError(f"checkpoint {path}: model must map weight names to tensors")
    if not isinstance(ckpt["model_config"], dict):
        raise CLIError(f"checkpoint {path}: model_config must be a dict of ModelConfig fields")
    if not isinstance(ckpt.get("train_config", {}), dict):
        raise CLIError(f"checkpoint {path}: train_config must be a dict of TrainConfig fields")
    return ckpt


def model_config_of(ckpt: dict) -> ModelConfig:
    """The ModelConfig a loaded checkpoint describes."""
    try:
        return ModelConfig.from_dict(ckpt["model_config"])
    except (ValueError, TypeError) as err:
        raise CLIError(f"checkpoint does not describe a valid model: {err}") from None


def read_model_config(path) -> ModelConfig:
    """The ModelConfig of the checkpoint at path, read without its weights."""
    return model_config_of(load_checkpoint(path, mmap=True))


def model_from_checkpoint(ckpt: dict) -> Transformer:
    """The Transformer a loaded checkpoint describes, with its weights, on the CPU in float32. Weights that are
    not all finite (a run that diverged) are refused: nothing sensible comes of evaluating or sampling them."""
    config = model_config_of(ckpt)
    check_model_fits([config], "cpu")
    model = Transformer(config)
    load_weights(model, ckpt["model"], "the checkpoint's weights do not fit its model_config")
    broken = next((name for name, weight in model.state_dict().items() if not torch.isfinite(weight).all()), None)
    if broken is not None:
        raise CLIError(f"the checkpoint's weights are not all finite (nan or inf in {broken}, the first)")
    return model


def load_weights(model: Transformer, state: dict, context: str) -> None:
    """model.load_state_dict(state); a mismatch is one line, context followed by its first reason (torch's
    message starts with a line that names only the module)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        reasons = [line.strip() for line in str(err).splitlines()[1:] if line.strip()] or [str(err)]
        raise CLIError(f"{context}: {reasons[0]}") from None
