"""Loader workers and their fork server leave SIGINT and SIGTERM to the training process.

A terminal's Ctrl-C signals the whole foreground process group, torchrun signals each
training process's whole process group (`os.killpg` in torch's `SubprocessHandler.close`),
and Slurm signals every process of a job step: the loader workers and their fork server get
the same SIGINT/SIGTERM as the training process. A worker that dies of it takes its batches
with it (seen: `FileNotFoundError` in multiprocessing/resource_sharer.py in the validation
loader, while the other process waited in its all-reduce until torchrun's SIGKILL); a
fork server that dies makes the persistent workers leave too (torch's worker watchdog quits
when its parent changes). The training process alone decides when to stop
(`trainer.loop.stop`) and then shuts its workers down the ordinary way.

So the fork server ignores both signals from its first import (`SERVER_INIT`, first in the
loaders' `WORKER_PRELOAD`), before it forks anything, and every worker inherits that. (A
signal mask is not inherited: the server is started through `_posixsubprocess`, which
resets it, as /proc/<pid>/status shows.) Should a signal end a server still starting, the next loader that needs a
worker starts another (`ensure_running`), which ignores them again.

A loader worker takes SIGTERM back, though: torch's worker loop installs a handler of its
own before anything else (`_set_worker_signal_handlers` in torch/utils/data/_utils/worker.py;
/proc/<worker>/status shows SIGTERM caught), which ends the worker. `detach_worker`, run
first in each worker (`worker_init_fn`), ignores it again; a SIGTERM in the moment between
the two, as a worker starts, still ends that worker.

A worker stuck in a decoder is no longer ended by torch's SIGTERM (`w.terminate()` in
`_shutdown_workers`), so loader workers die with the fork server instead
(`PR_SET_PDEATHSIG`), which leaves as soon as the training process does (it reads EOF on
its "alive" pipe: multiprocessing/forkserver.py).
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing
import signal
from multiprocessing.context import ForkServerProcess

STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})
PR_SET_PDEATHSIG = 1  # linux/prctl.h


SERVER_INIT = "trainer.data.fork_server_init"  # the module whose import does `ignore_stop_signals` in the server


def ignore_stop_signals() -> None:
    """SIGINT and SIGTERM ignored by this process and all it forks from now on (fork server and loader workers only)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def restore_stop_signals() -> None:
    """Python's usual SIGINT (KeyboardInterrupt) and SIGTERM (exit) again, in a fork server's child that should
    end on them (`check-data`'s pool)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def kill_workers_at_exit() -> None:
    """From now on, the training process SIGKILLs its loader workers still alive when it exits.

    NOTE: multiprocessing's own exit handler (`_exit_function`, multiprocessing/util.py)
    ends daemonic children with `terminate()` (SIGTERM) and then joins them: a worker that
    ignores SIGTERM would keep the training process waiting for ever. That happens when a
    run ends with an error while a loader iterator is still alive (seen: `data.on_error:
    raise` printed its one line, then the process hung at exit). atexit runs handlers last
    registered first, so this one, registered after multiprocessing's, runs before it.
    Registered once per process.
    """
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_kill_loader_workers)
        _exit_hook_registered = True


_exit_hook_registered = False


def _kill_loader_workers() -> None:
    for child in multiprocessing.active_children():
        if isinstance(child, ForkServerProcess) and child.daemon:
            child.kill()
            child.join(timeout=5)


def detach_worker() -> bool:
    """In a loader worker: SIGINT/SIGTERM ignored again, death with the fork server; False without prctl."""
    ignore_stop_signals()
    return die_with_parent()


def die_with_parent() -> bool:
    """SIGKILL this process when its parent (the fork server) exits; False where the OS has no prctl."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
