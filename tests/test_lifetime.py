"""`distill.lifetime` without an engine: a process whose parent is SIGKILLed ends within seconds,
whether multiprocessing forked or spawned it, or the launcher exec'd it; stop signals become
KeyboardInterrupt. The same on a real `distill generate`: tests/test_resume.py."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from importlib.metadata import entry_points

import psutil
import pytest

from distill import lifetime

# The parent: starts one child the way vLLM (multiprocessing, `arm_engine_process` run by the
# plugin) or the launcher (`command_dying_with_parent`) does, prints its pid, then waits.
PARENT = textwrap.dedent("""
    import multiprocessing, subprocess, sys, time
    from distill import lifetime

    def engine_process():
        lifetime.arm_engine_process()  # what vLLM's plugin loader calls in a spawned process
        time.sleep(600)

    if __name__ == "__main__":
        how = sys.argv[1]
        if how == "exec":
            child = subprocess.Popen(lifetime.command_dying_with_parent(
                [sys.executable, "-c", "import time; time.sleep(600)"]))
        else:
            lifetime.arm_engine_process()  # vLLM calls it in the parent too: arms forked children
            child = multiprocessing.get_context(how).Process(target=engine_process)
            child.start()
        print(child.pid, flush=True)
        time.sleep(600)
""")


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("how", ["spawn", "fork", "exec"])
def test_a_child_ends_within_seconds_after_its_parent_is_sigkilled(tmp_path, how):
    script = tmp_path / "parent.py"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), how], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        time.sleep(lifetime.POLL_S * 2)  # the child is armed (its watch thread started, or exec'd)
        assert psutil.Process(child).is_running()
        parent.kill()
        parent.wait()
        assert gone_within(child, lifetime.GRACE_S + 5), f"{how} child {child} outlived its parent"
    finally:
        try:
            os.killpg(parent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_vllm_loads_the_plugin():
    """`pip install -e .` registers it; without it vLLM's engine processes would not watch distill."""
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("distill_lifetime") == "distill.lifetime:arm_engine_process"


@pytest.mark.parametrize("sig", lifetime.STOP_SIGNALS)
def test_stop_signals_raise_keyboard_interrupt_with_the_signal(sig):
    saved = {s: signal.getsignal(s) for s in lifetime.STOP_SIGNALS}
    try:
        lifetime.stop_on_signals()
        with pytest.raises(KeyboardInterrupt) as caught:
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler runs in the main thread at the next bytecode
        assert caught.value.signum == sig
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
