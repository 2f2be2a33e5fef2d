"""The ``cncl`` collective backend of the emulated MLU.

CNCL is Cambricon's NCCL. Here it is a Python ``ProcessGroup`` that owns a
gloo group built on the same store: every collective stages mlu tensors to
host memory, runs the gloo collective synchronously and copies the results
back. CPU tensors pass straight through, which object collectives
(``broadcast_object_list``, ``all_gather_object``, ...) rely on, since they
pick the CPU for a Python process group. Gloo has a partial reduce-scatter,
built here from SUM all-reduces.

As the real ``ProcessGroupCNCL`` (torch_mlu/csrc/framework/distributed/process_group_cncl.cpp
on r1.22_pt2.1.0 / pt2.3.0 / pt2.4.0), it refuses AVG (and the bitwise reductions), sends
float64 as float32 (its type table maps kDouble to cnclFloat), and handles a failed or
timed-out collective by the error-handling variables of its torch_mlu line: with blocking
wait the caller gets the error; with async error handling the watchdog logs and takes the
whole process down (SIGABRT); with neither the collective never completes.
"""

from __future__ import annotations

import datetime
import functools
import os
import sys
import threading
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from torch_mlu._line import AT_LEAST_2_3

__all__ = ["ProcessGroupCNCL", "create_process_group"]

Work = torch._C._distributed_c10d.Work


def _completed_work(result: list[torch.Tensor]) -> Work:
    """Handle of a collective that already finished when it was returned.

    The future's value is ``result``, the tensors the collective wrote, which DDP's reducer
    reads back as the reduced bucket.

    NOTE: a C++ Work wrapping a completed future, not a Python subclass of Work. On torch 2.1,
    torch/csrc/distributed/c10d/PyProcessGroup.hpp hands C++ callers the bare ``PyWork``
    trampoline: once the Python object is collected (nothing in Python holds it after a call
    from C++, as DDP's ``_verify_params_across_processes`` makes), its ``wait`` override is
    gone and the base ``Work::wait`` blocks forever on a work never marked completed. Later
    torch wraps the Python object in ``PyWorkHolder`` (py/PyProcessGroup.hpp), which keeps it.
    """
    future: torch.futures.Future[list[torch.Tensor]] = torch.futures.Future()
    future.set_result(result)
    return torch._C._distributed_c10d._create_work_from_future(future)


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` itself if on the CPU, else a contiguous host copy."""
    if tensor.device.type == "cpu":
        return tensor
    return tensor.detach().to("cpu").contiguous()


def _write_back(dst: torch.Tensor, host: torch.Tensor) -> None:
    if host is not dst:
        with torch.no_grad():
            dst.copy_(host)


# NOTE: process_group_cncl.hpp: the 2.1 line reads CNCL_BLOCKING_WAIT / CNCL_ASYNC_ERROR_HANDLING
# only; pt2.3 and pt2.4 read TORCH_CNCL_*, then TORCH_NCCL_*, then NCCL_* (first one set wins).
_ERROR_VARIABLES = {
    "blocking": ["TORCH_CNCL_BLOCKING_WAIT", "TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT"],
    "async": ["TORCH_CNCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING"],
}
if not AT_LEAST_2_3:
    _ERROR_VARIABLES = {"blocking": ["CNCL_BLOCKING_WAIT"], "async": ["CNCL_ASYNC_ERROR_HANDLING"]}


_DIST_BACKEND_ERROR = getattr(dist, "DistBackendError", RuntimeError)


def _read_variable(names: list[str]) -> int:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip():
            text = value.strip().lower()
            return int(text) if text.lstrip("-").isdigit() else int(text in ("true", "yes", "on"))
    return 0


def _refuse(op: Any) -> None:
    """Raise as CNCL does for reductions it lacks: RuntimeError on 2.1, ValueError from 2.3."""
    names = {ReduceOp.AVG: "AVG", ReduceOp.BAND: "BAND", ReduceOp.BOR: "BOR", ReduceOp.BXOR: "BXOR"}
    for refused, name in names.items():
        if op == refused:
            error = ValueError if AT_LEAST_2_3 else RuntimeError
            raise error(f"Cannot use ReduceOp.{name} with CNCL")


def _sum_options(timeout: datetime.timedelta) -> dist.AllreduceOptions:
    options = dist.AllreduceOptions()
    options.reduceOp = ReduceOp.SUM
    options.timeout = timeout
    return options


class ProcessGroupCNCL(dist.ProcessGroup):
    """Emulated CNCL process group: gloo underneath, mlu tensors on top.

    Args:
        store: Rendezvous store of the group (shared with the gloo group).
        rank: This process's rank in the group.
        size: Number of processes in the group.
        timeout: Timeout of every collective.
    """

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: datetime.timedelta) -> None:
        super().__init__(rank, size)
        self._timeout = timeout
        self._blocking_wait = bool(_read_variable(_ERROR_VARIABLES["blocking"]))
        self._async_error_handling = _read_variable(_ERROR_VARIABLES["async"])
        self._seq = 0
        self._gloo = dist.ProcessGroupGloo(dist.PrefixStore("cncl-gloo/", store), rank, size, timeout)

    def getBackendName(self) -> str:  # noqa: N802  (C++ virtual's name)
        """Return ``"cncl"``."""
        return "cncl"

    # ------------------------------------------------------------- helpers

    def _wait(self, op_type: str, work: Work) -> None:
        """Wait for a gloo collective; a failure goes where the line's CNCL sends it."""
        self._seq += 1
        try:
            work.wait()
        except Exception as err:  # noqa: BLE001 - sorted below
            # A wrong call raises at once on the card too; only a peer that is gone or late
            # is the watchdog's business (a timeout or a closed connection in gloo's words).
            text = str(err).lower()
            if not any(word in text for word in ("timed out", "timeout", "connection", "peer")):
                raise
            self._collective_failed(op_type, err)

    def _allreduce_host(self, host: torch.Tensor, op: Any) -> None:
        """All-reduce one host tensor in place; float64 travels (and is summed) as float32."""
        _refuse(op)
        options = _sum_options(self._timeout)
        options.reduceOp = op
        if host.dtype == torch.float64:
            wire = host.to(torch.float32)
            self._wait("allreduce", self._gloo.allreduce([wire], options))
            host.copy_(wire)
            return
        self._wait("allreduce", self._gloo.allreduce([host], options))

    def _collective_failed(self, op_type: str, err: Exception) -> None:
        prefix = f"[PG 0 Rank {self.rank()}] " if AT_LEAST_2_3 else f"[Rank {self.rank()}] "
        timeout_ms = int(self._timeout.total_seconds() * 1000)
        work = f"WorkCNCL(SeqNum={self._seq}, OpType={op_type.upper()}, Timeout(ms)={timeout_ms})"
        blocking_name = _ERROR_VARIABLES["blocking"][0]
        if self._blocking_wait:
            raise _DIST_BACKEND_ERROR(f"{prefix}Work {work} timed out in blocking wait ({blocking_name}=1).") from err
        # NOTE: without blocking wait the caller never hears of it: the watchdog thread does
        # (workCleanupLoop / watchdogHandler). With async error handling it logs, rethrows on
        # its own thread and std::terminate ends the process; without, the work stays pending.
        if self._async_error_handling:
            lines = [
                f"{prefix}Watchdog caught collective operation timeout: {work} ran for "
                f"{int(self._timeout.total_seconds() * 1000)} milliseconds before timing out.",
                f"{prefix}Some CNCL operations have failed or timed out. "
                "Due to the asynchronous nature of MLU kernels, "
                "subsequent MLU operations might run on corrupted/incomplete data.",
                f"{prefix}To avoid data inconsistency, we are taking the entire process down.",
                "terminate called after throwing an instance of 'c10::DistBackendError'",
            ]
            sys.stderr.write("".join(f"{line}\n" for line in lines))
            sys.stderr.flush()
            os.abort()
        threading.Event().wait()  # the real collective never completes

    # --------------------------------------------------------- collectives

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> Work:
        """All-reduce each tensor in place (SUM/AVG/MIN/MAX/PRODUCT...)."""
        op = opts.reduceOp if opts is not None else ReduceOp.SUM
        for tensor in tensors:
            host = _to_host(tensor)
            self._allreduce_host(host, op)
            _write_back(tensor, host)
        return _completed_work(tensors)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> Work:
        """All-reduce several tensors (one collective each)."""
        return self.allreduce(tensors, opts)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> Work:
        """Broadcast ``tensors`` from ``opts.rootRank``."""
        hosts = [_to_host(t) for t in tensors]
        self._wait("broadcast", self._gloo.broadcast(hosts, opts))
        for tensor, host in zip(tensors, hosts):
            _write_back(tensor, host)
        return _completed_work(tensors)

    def reduce(self, tensors: list[torch.Tensor], opts: Any) -> Work:
        """Reduce into ``opts.rootRank``'s tensors; others stay unchanged."""
        for tensor in tensors:
            # Reducing via all-reduce keeps non-root buffers intact, which
            # gloo's reduce does not promise.
            host = tensor.detach().to("cpu", copy=True).contiguous()
            self._allreduce_host(host, opts.reduceOp)
            if self.rank() == opts.rootRank:
                with torch.no_grad():
                    tensor.copy_(host)
        return _completed_work(tensors)

    def allgather(
        self,
        output_lists: list[list[torch.Tensor]],
        inputs: list[torch.Tensor],
        opts: Any = None,
    ) -> Work:
        """Gather every rank's input into each output list."""
        host_outputs = [[_to_host(t) for t in outputs] for outputs in output_lists]
        host_inputs = [_to_host(t) for t in inputs]
        self._wait("allgather", self._gloo.allgather(host_outputs, host_inputs))
        for outputs, hosts in zip(output_lists, host_outputs):
            for tensor, host in zip(outputs, hosts):
                _write_back(tensor, host)
        return _completed_work([t for outputs in output_lists for t in outputs])

    def allgather_coalesced(
        self,
        output_lists: list[list[torch.Tensor]],
        inputs: list[torch.Tensor],
        opts: Any = None,
    ) -> Work:
        """All-gather several inputs (one collective each)."""
        for outputs, tensor in zip(output_lists, inputs):
            self.allgather([outputs], [tensor], opts)
        return _completed_work([t for outputs in output_lists for t in outputs])

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> Work:
        """Gather every rank's input into one tensor (``all_gather_into_tensor``)."""
        chunks = list(output.chunk(self.size()))
        self.allgather([chunks], [input], opts)
        return _completed_work([output])

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> Work:
        """``all_gather_single`` over pairs of outputs and inputs."""
        for output, tensor in zip(outputs, inputs):
            self.all_gather_single(output, tensor, opts)
        return _completed_work(outputs)

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def reduce_scatter(
        self,
        outputs: list[torch.Tensor],
        input_lists: list[list[torch.Tensor]],
        opts: Any,
    ) -> Work:
        """Reduce the inputs across ranks; rank r keeps the r-th result."""
        for output, inputs in zip(outputs, input_lists):
            stacked = torch.stack([t.detach().to("cpu") for t in inputs])
            self._allreduce_host(stacked, opts.reduceOp)
            with torch.no_grad():
                output.copy_(stacked[self.rank()])
        return _completed_work(outputs)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any) -> Work:
        """Reduce one flat input; rank r keeps the r-th slice (``reduce_scatter_tensor``)."""
        host = input.detach().to("cpu", copy=True).contiguous()
        self._allreduce_host(host, opts.reduceOp)
        with torch.no_grad():
            output.copy_(host.reshape(self.size(), *output.shape)[self.rank()])
        return _completed_work([output])

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any
    ) -> Work:
        """``reduce_scatter_single`` over pairs of outputs and inputs."""
        for output, tensor in zip(outputs, inputs):
            self.reduce_scatter_single(output, tensor, opts)
        return _completed_work(outputs)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def gather(
        self,
        output_lists: list[list[torch.Tensor]],
        inputs: list[torch.Tensor],
        opts: Any,
    ) -> Work:
        """Gather every rank's input on ``opts.rootRank``."""
        host_outputs = [[_to_host(t) for t in outputs] for outputs in output_lists]
        host_inputs = [_to_host(t) for t in inputs]
        self._wait("gather", self._gloo.gather(host_outputs, host_inputs, opts))
        for outputs, hosts in zip(output_lists, host_outputs):
            for tensor, host in zip(outputs, hosts):
                _write_back(tensor, host)
        return _completed_work([t for outputs in output_lists for t in outputs])

    def scatter(
        self,
        outputs: list[torch.Tensor],
        input_lists: list[list[torch.Tensor]],
        opts: Any,
    ) -> Work:
        """Scatter ``opts.rootRank``'s inputs, one per rank."""
        host_outputs = [_to_host(t) for t in outputs]
        host_inputs = [[_to_host(t) for t in inputs] for inputs in input_lists]
        self._wait("scatter", self._gloo.scatter(host_outputs, host_inputs, opts))
        for tensor, host in zip(outputs, host_outputs):
            _write_back(tensor, host)
        return _completed_work(outputs)

    def alltoall(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None) -> Work:
        """Send input i to rank i, receive output j from rank j."""
        host_outputs = [_to_host(t) for t in outputs]
        self._wait("alltoall", self._gloo.alltoall(host_outputs, [_to_host(t) for t in inputs]))
        for tensor, host in zip(outputs, host_outputs):
            _write_back(tensor, host)
        return _completed_work(outputs)

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Sequence[int],
        input_split_sizes: Sequence[int],
        opts: Any = None,
    ) -> Work:
        """All-to-all over slices of one tensor."""
        host = _to_host(output)
        splits = list(output_split_sizes), list(input_split_sizes)
        self._wait("alltoall_base", self._gloo.alltoall_base(host, _to_host(input), *splits))
        _write_back(output, host)
        return _completed_work([output])

    alltoall_base = all_to_all_single

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int = 0) -> Work:
        """Send ``tensors`` to rank ``dst`` (completes when delivered)."""
        self._wait("send", self._gloo.send([_to_host(t) for t in tensors], dst, tag))
        return _completed_work(tensors)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int = 0) -> Work:
        """Receive into ``tensors`` from rank ``src``."""
        hosts = [_to_host(t) for t in tensors]
        self._wait("recv", self._gloo.recv(hosts, src, tag))
        for tensor, host in zip(tensors, hosts):
            _write_back(tensor, host)
        return _completed_work(tensors)

    def barrier(self, opts: Any = None) -> Work:
        """Wait until every rank reaches the barrier."""
        options = dist.BarrierOptions()
        options.timeout = self._timeout
        self._wait("barrier", self._gloo.barrier(options))
        return _completed_work([])


# NOTE: staging through host memory is the emulation's own doing (NCCL and CNCL move
# device memory directly), so the transfer counters of torch.mlu.transfer_stats() must
# not see it: every collective runs inside the extension's internal scope.
_COLLECTIVES = (
    "allreduce",
    "allreduce_coalesced",
    "broadcast",
    "reduce",
    "allgather",
    "allgather_coalesced",
    "all_gather_single",
    "all_gather_single_coalesced",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_single_coalesced",
    "gather",
    "scatter",
    "alltoall",
    "all_to_all_single",
    "send",
    "recv",
    "barrier",
)


def _uncounted(method: Any) -> Any:
    @functools.wraps(method)
    def staged(*args: Any, **kwargs: Any) -> Any:
        ops = torch.ops.emulated_mlu
        ops.begin_internal()
        try:
            return method(*args, **kwargs)
        finally:
            ops.end_internal()

    return staged


for _name in _COLLECTIVES:
    setattr(ProcessGroupCNCL, _name, _uncounted(getattr(ProcessGroupCNCL, _name)))


def create_process_group(store: dist.Store, rank: int, size: int, timeout: datetime.timedelta) -> ProcessGroupCNCL:
    """Creator function given to ``Backend.register_backend("cncl", ...)``."""
    return ProcessGroupCNCL(store, rank, size, timeout)
