"""Checkpoints as safetensors, never pickle: they cross a trust boundary (users download them).

Two files per checkpoint: the model's weights (what users download, opened by
safetensors.torch.load), and the trainer state a resume needs (optimizer tensors and RNG
states as tensors; step counters, hyper-parameters and bookkeeping as JSON metadata).
"""

import json
import struct
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

_STATE_KEY = "trainsvc.trainer_state"


def pack_weights(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A model's state dict as a safetensors file, with string metadata in its header."""
    return save_tensors(
        {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, metadata
    )


def unpack_weights(model: torch.nn.Module, data: bytes) -> None:
    model.load_state_dict(load_tensors(data))


def _split_tensors(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors inside a nested state dict by references, collecting them in `tensors`."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().contiguous().cpu()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {str(k): _split_tensors(v, f"{prefix}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join_tensors(v, tensors) for v in value]
    return value


def pack_state(state: dict[str, Any]) -> bytes:
    """A nested dict of tensors and JSON values as one safetensors file."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(state, "s", tensors)
    return save_tensors(tensors, metadata={_STATE_KEY: json.dumps(skeleton)})


def unpack_state(data: bytes) -> dict[str, Any]:
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    skeleton = json.loads(header["__metadata__"][_STATE_KEY])
    state: dict[str, Any] = _join_tensors(skeleton, load_tensors(data))
    return state


def optimizer_state_from_json(state: dict[str, Any]) -> dict[str, Any]:
    """JSON turned the optimizer's integer parameter ids into strings; turn them back."""
    return {
        "state": {int(k): v for k, v in state["state"].items()},
        "param_groups": state["param_groups"],
    }
