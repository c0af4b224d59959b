"""Processes distill starts end with it, however it ends.

- Stop signals: SIGTERM (schedulers: Slurm, Kubernetes, systemd) and SIGHUP (a closed terminal)
  take the path of Ctrl-C: `KeyboardInterrupt` in the main thread, so every `finally` runs,
  engines shut down cleanly and finished shards stay (`stop_on_signals`, installed by the CLI).
- SIGKILL of distill cannot be caught, so its children watch for it themselves:
  - vLLM's engine processes (EngineCore, workers; started with multiprocessing) run
    `arm_engine_process`, a vLLM `general_plugins` entry point (pyproject.toml), which vLLM calls
    in every process it starts. It starts `watch_parent`: a thread that notices the parent is gone
    (the kernel reparents an orphan, so `os.getppid()` changes), SIGTERMs its own process so that
    vLLM's handlers release the shared memory and the device, and SIGKILLs it if that hangs.
    A thread rather than PR_SET_PDEATHSIG because the plugin runs for every vLLM engine in this
    environment, including ones a library user starts from a short-lived thread: the kernel's
    parent-death signal fires when the *thread* that started the child exits, not the process,
    and it gives no chance for a clean shutdown.
  - The OpenAI servers of `distill.launcher` are programs we exec: they start under
    `python -m distill.lifetime PID COMMAND...`, which sets PR_SET_PDEATHSIG (SIGKILL) and execs
    COMMAND (the signal survives exec). The server itself holds nothing to clean up; its engine
    processes, armed as above, shut down cleanly when it is gone. The launcher starts servers
    from the main thread, so the thread caveat above does not apply.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
POLL_S = 0.5  # how often an engine process checks that its parent is alive
GRACE_S = 5.0  # how long a clean shutdown may take before the orphan SIGKILLs itself
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_watching: int | None = None  # the pid of the process whose parent is watched (a fork child must re-arm)
_forking_pid: int | None = None


class Stopped(KeyboardInterrupt):
    """A stop signal, raised like Ctrl-C's KeyboardInterrupt; `signum` says which one."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum: int, frame) -> None:
    raise Stopped(signum)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise `Stopped` (a KeyboardInterrupt) in the main thread."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_stopped)


def watch_parent(parent_pid: int) -> None:
    """End this process a moment after `parent_pid` stops being its parent."""
    global _watching
    if _watching == os.getpid():
        return
    _watching = os.getpid()
    threading.Thread(target=_watch, args=(parent_pid,), name="distill-watch-parent", daemon=True).start()


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)  # vLLM's handler shuts the engine down cleanly
    time.sleep(GRACE_S)
    os.kill(os.getpid(), signal.SIGKILL)


def arm_engine_process() -> None:
    """vLLM `general_plugins` entry point, called once in each process vLLM runs: in one that
    multiprocessing started (spawn: EngineCore, CPU workers), watch the parent; in every one,
    arm the children it will fork (vLLM's default start method on GPUs), which inherit the
    plugin's loaded state and do not call it again."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        watch_parent(parent.ident)  # not `.pid`: CPython's `_ParentProcess` overrides `ident` only
    _arm_forked_children()


@functools.cache
def _arm_forked_children() -> None:
    os.register_at_fork(before=_note_forking_pid, after_in_child=lambda: watch_parent(_forking_pid))


def _note_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def command_dying_with_parent(command: list[str]) -> list[str]:
    """`command`, run so that it is SIGKILLed when the calling process dies (see `_exec`)."""
    return [sys.executable, "-m", "distill.lifetime", str(os.getpid()), *command]


def _exec(parent_pid: int, command: list[str]) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        sys.exit(1)
    os.execvp(command[0], command)


if __name__ == "__main__":
    _exec(int(sys.argv[1]), sys.argv[2:])
