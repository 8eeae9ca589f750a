"""Checkpoints as safetensors, never pickle: they cross a trust boundary (users download them).

Two files per checkpoint: the model's weights (what users download, opened by
safetensors.torch.load; the job, epoch and spec in its metadata), and the trainer state a
resume needs (optimizer tensors and RNG states as tensors; step counters, hyper-parameters
and bookkeeping as JSON, itself stored as a byte tensor).
"""

import json
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
    """A nested dict of tensors and JSON values as one safetensors file.

    The JSON skeleton travels as a byte tensor, not as header metadata: safetensors reads
    metadata only through safe_open, from a file path, never from bytes (safetensors#194),
    and a state comes back from the database as bytes. So the library reads the whole file
    and no header is parsed by hand.
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(state, "s", tensors)  # tensor names all start with "s."
    encoded = bytearray(json.dumps(skeleton).encode())
    tensors[_STATE_KEY] = torch.frombuffer(encoded, dtype=torch.uint8)
    return save_tensors(tensors)


def unpack_state(data: bytes) -> dict[str, Any]:
    tensors = load_tensors(data)
    skeleton = json.loads(tensors.pop(_STATE_KEY).numpy().tobytes())
    state: dict[str, Any] = _join_tensors(skeleton, tensors)
    return state


def optimizer_state_from_json(state: dict[str, Any]) -> dict[str, Any]:
    """JSON turned the optimizer's integer parameter ids into strings; turn them back."""
    return {
        "state": {int(k): v for k, v in state["state"].items()},
        "param_groups": state["param_groups"],
    }
