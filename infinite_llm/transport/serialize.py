"""Pickling with torch tensors carried out of band, as raw byte frames.

Messages are picklable objects (dataclasses) that may hold CPU tensors anywhere: in fields,
lists, dicts. Pickling a tensor the default way copies its data into the pickle stream (and
torch's reducer adds storage bookkeeping); for KV blocks of many megabytes that copy dominates.
Here every tensor is replaced in the pickle by a small reference `(index, dtype, shape)` and its
bytes travel as a separate frame, so a message becomes `[header, frame0, frame1, ...]`:

- sending reads each tensor's memory in place (a `memoryview`, no copy) when the tensor is
  already a contiguous CPU tensor;
- receiving adopts a large frame's buffer as the tensor's memory (no copy; the tensor keeps the
  frame alive) when the buffer is writable and aligned for the dtype, which zmq's per-message
  buffers are; small, read-only or misaligned frames are copied once into fresh torch memory.
  Either way the tensor is writable and shares memory with nothing the sender can touch.

Rules the caller should know:

- CUDA (or other device) tensors are moved to the CPU before sending, which synchronizes with
  the device; the receiver gets CPU tensors and moves them itself;
- autograd state is dropped (`detach`); tensor subclasses (e.g. `nn.Parameter`) arrive as plain
  tensors; sparse and quantized tensors fall back to torch's own (in-band) pickling;
- one tensor object referenced twice in a message arrives as one tensor referenced twice, but
  two different views of one storage arrive as two independent tensors;
- the sender must not modify a sent tensor afterwards: its bytes may be read later, when the
  transport's I/O thread writes them (the in-process transport passes the very same object, so
  the rule is the same there);
- pickle runs code while loading: use it only between trusted processes of one deployment.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

Frame = Union[bytes, bytearray, memoryview]  # anything exposing the buffer protocol

_PROTOCOL = pickle.HIGHEST_PROTOCOL

# Frames at least this large are adopted without a copy on receive (see `_tensor_from_frame`).
ZERO_COPY_MIN_BYTES = 64 << 10


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of `tensor` as a flat buffer, without a copy where it is already dense.

    Every dtype is reinterpreted as uint8 first: numpy has no bfloat16 or float8 type, and bytes
    are all the frame needs (dtype and shape travel in the header).
    """
    flat = tensor.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    # conj/neg bits are lazy flags, not data: materialize them or the bytes would be wrong.
    flat = flat.resolve_conj().resolve_neg().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class _TensorPickler(pickle.Pickler):
    """Pickler that swaps each dense tensor for a reference and collects its bytes as a frame."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        self.frames: list[memoryview] = []
        # id -> frame index, so a tensor referenced twice is sent once; the ids stay valid because
        # the message being pickled keeps every tensor alive until dumping ends.
        self._seen: dict[int, int] = {}

    def persistent_id(self, obj: Any) -> Optional[tuple]:
        if not isinstance(obj, torch.Tensor):
            return None
        if obj.layout != torch.strided or obj.is_quantized:
            return None  # no flat byte image: let torch pickle it in band
        index = self._seen.get(id(obj))
        if index is None:
            index = len(self.frames)
            self.frames.append(_tensor_bytes(obj))
            self._seen[id(obj)] = index
        return (index, obj.dtype, tuple(obj.shape))


class _TensorUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds the referenced tensors from the frames that came with the header."""

    def __init__(self, header: Frame, frames: Sequence[Frame]) -> None:
        super().__init__(io.BytesIO(header))
        self._frames = frames
        self._tensors: dict[int, torch.Tensor] = {}

    def persistent_load(self, pid: tuple) -> torch.Tensor:
        index, dtype, shape = pid
        tensor = self._tensors.get(index)
        if tensor is None:
            tensor = _tensor_from_frame(self._frames[index], dtype, shape)
            self._tensors[index] = tensor
        return tensor


def _tensor_from_frame(frame: Frame, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """A tensor over `frame`'s bytes: the frame's own memory when that is safe, else one copy.

    Small frames are copied because zmq packs them into a shared receive buffer that adopting
    them would pin (and they are cheap to copy). Read-only buffers would give a read-only tensor,
    and misaligned ones (zmq's large buffers are only 8-byte aligned) break wider dtypes.
    """
    view = memoryview(frame)
    if view.nbytes >= ZERO_COPY_MIN_BYTES and not view.readonly and view.contiguous:
        data = torch.frombuffer(view, dtype=torch.uint8)  # holds a reference to the frame
        if data.data_ptr() % dtype.itemsize == 0:
            return data.view(dtype).reshape(shape)
    source = np.frombuffer(view, dtype=np.uint8)
    data = torch.empty(source.nbytes, dtype=torch.uint8)
    if source.nbytes:
        np.copyto(data.numpy(), source)
    return data.view(dtype).reshape(shape)


def to_frames(message: object) -> list[Frame]:
    """`[header, tensor frames...]` for `message`; frames alias the tensors' memory."""
    buffer = io.BytesIO()
    pickler = _TensorPickler(buffer)
    pickler.dump(message)
    return [buffer.getbuffer(), *pickler.frames]


def from_frames(frames: Sequence[Frame]) -> object:
    """Inverse of `to_frames`. Tensors may adopt writable frames' memory: hand frames over, do
    not reuse them (read-only inputs such as `bytes` are always copied)."""
    if not frames:
        raise ValueError("a message needs at least its header frame")
    return _TensorUnpickler(frames[0], frames[1:]).load()


def frames_nbytes(frames: Sequence[Frame]) -> int:
    """Total payload size of a framed message (header plus tensor data)."""
    return sum(memoryview(f).nbytes for f in frames)
