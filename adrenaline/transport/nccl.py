"""NCCL transport: GPU-to-GPU point-to-point through cupy's NCCL bindings.

cupy is imported only when an id or a communicator is made, so this module
imports on machines without CUDA or libnccl; making either there raises
RuntimeError. Tensors travel as raw bytes (NCCL_UINT8, numel * element_size),
so every dtype, bfloat16 included, arrives bit-exactly.

Every operation runs on the communicator's one CUDA stream, in posting order.
NCCL has no tags, so messages of a pair are matched in posting order whatever
their tag (``independent_tags = False``), and a posted recv holds back every
later operation of this rank until its sender arrives: all ranks must post in
a globally consistent order.
"""

from __future__ import annotations

import warnings
from types import ModuleType

import torch

from adrenaline.transport.base import CommHandle, Communicator, DoneHandle, check_recv_buffer


def _nccl_bindings() -> ModuleType:
    """cupy's NCCL module, or RuntimeError saying what is missing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cupy warns when libnccl is absent; we raise instead
            from cupy.cuda import nccl
    except Exception as e:  # cupy missing or broken
        raise RuntimeError(f"the NCCL transport needs cupy-cuda12x: {e}") from e
    if not getattr(nccl, "available", True):
        raise RuntimeError("cupy cannot load libnccl.so.2; install nvidia-nccl-cu12")
    return nccl


def new_nccl_unique_id() -> str:
    """A fresh NCCL unique id, hex-encoded, to hand every rank of one new world.

    Make it on the host of one rank (it names that host's bootstrap socket).
    """
    raw = _nccl_bindings().get_unique_id()
    if isinstance(raw, bytes):
        return raw.hex()
    return bytes(b & 0xFF for b in raw).hex()  # cupy < 14: tuple of signed chars


def _init_comm(nccl: ModuleType, world_size: int, uid: bytes, rank: int) -> object:
    try:
        return nccl.NcclCommunicator(world_size, uid, rank)
    except TypeError:  # cupy < 14 takes the id as a tuple of signed chars
        return nccl.NcclCommunicator(world_size, tuple(b - 256 if b > 127 else b for b in uid), rank)


class _NcclHandle(CommHandle):
    """An event recorded after the operation on the comm stream, plus the buffer it uses."""

    def __init__(self, event: torch.cuda.Event, buf: torch.Tensor):
        self._event: torch.cuda.Event | None = event
        self._buf: torch.Tensor | None = buf

    def wait(self) -> None:
        # Blocks the host, so any stream may use (or overwrite) the buffer afterwards.
        if self._event is None:
            return
        self._event.synchronize()
        self._event = None
        self._buf = None


class NcclCommunicator(Communicator):
    """One rank of an NCCL world on one CUDA device; see ``Communicator`` and the module notes.

    ``uid`` is the hex string from ``new_nccl_unique_id()``. The constructor
    blocks until all ``world_size`` ranks have joined. ``device`` defaults to
    torch's current CUDA device. Each operation first waits (on the GPU) for
    work already queued on the caller's current stream, so a tensor produced
    there may be sent right away.
    """

    independent_tags = False

    def __init__(self, world_size: int, uid: str, rank: int, *, device: torch.device | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        if not torch.cuda.is_available():
            raise RuntimeError("NcclCommunicator needs a CUDA device, and torch sees none; "
                               "use the gloo transport on CPU")
        try:
            uid_bytes = bytes.fromhex(uid)
        except ValueError as e:
            raise ValueError("nccl init must be the hex string from new_nccl_unique_id()") from e
        nccl = _nccl_bindings()
        import cupy

        dev = torch.device("cuda") if device is None else torch.device(device)
        self._device = dev if dev.index is not None else torch.device("cuda", torch.cuda.current_device())
        self._uint8 = nccl.NCCL_UINT8
        self._stream = torch.cuda.Stream(device=self._device)
        with cupy.cuda.Device(self._device.index):
            self._comm = _init_comm(nccl, world_size, uid_bytes, rank)
        self.rank = rank
        self.world_size = world_size
        self._closed = False

    def send(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> None:
        self.isend(tensor, dst, tag).wait()

    def recv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> None:
        self.irecv(tensor, src, tag).wait()

    def isend(self, tensor: torch.Tensor, dst: int, tag: int = 0) -> CommHandle:
        self._check_args(tensor, dst, tag)
        return self._post(tensor.detach().contiguous(), dst, is_send=True)

    def irecv(self, tensor: torch.Tensor, src: int, tag: int = 0) -> CommHandle:
        self._check_args(tensor, src, tag)
        check_recv_buffer(tensor)
        return self._post(tensor.detach(), src, is_send=False)

    def _post(self, buf: torch.Tensor, peer: int, *, is_send: bool) -> CommHandle:
        if buf.numel() == 0:
            return DoneHandle()
        # The comm stream sees every write the caller queued before posting.
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        op = self._comm.send if is_send else self._comm.recv
        op(buf.data_ptr(), buf.numel() * buf.element_size(), self._uint8, peer,
           self._stream.cuda_stream)
        # The caching allocator must not hand this memory out again until the comm stream passes here.
        buf.record_stream(self._stream)
        event = torch.cuda.Event()
        event.record(self._stream)
        return _NcclHandle(event, buf)

    def _check_args(self, tensor: torch.Tensor, peer: int, tag: int) -> None:
        if self._closed:
            raise RuntimeError("communicator is closed")
        self._check_peer(peer, tag)
        if tensor.device != self._device:
            raise ValueError(f"tensor is on {tensor.device}, this communicator on {self._device}")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stream.synchronize()
        self._comm.destroy()
