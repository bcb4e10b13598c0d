"""A worker's tie to the ``stickerbot run`` process that started it.

``run`` starts its worker in a session of its own, so that a terminal's Ctrl+C reaches the
worker once, through ``run``, and not twice. The price: when ``run`` itself dies without
stopping it (SIGKILL, the OOM killer, a process manager's stop timeout), nothing would end
the worker, and a restarted ``run`` would start a second one on the same queue and GPU.
:func:`follow_supervisor` closes that gap from the worker's side:

- on Linux, ``prctl(PR_SET_PDEATHSIG, SIGTERM)``: the kernel sends SIGTERM when the parent
  goes. It fires when the parent *thread* that forked us exits, so ``run`` starts workers from
  its main thread. The parent may die before the call: ``getppid()`` is checked after it;
- everywhere, a daemon thread polls ``getppid()``: it sends the SIGTERM where there is no
  prctl, and ends the process after a grace period if the graceful stop hangs.

SIGTERM is the worker's graceful stop: a training job checkpoints and is released (or its
lease expires if even that fails), so a restarted ``run`` resumes it; nothing runs twice.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def set_parent_death_signal(sig: int) -> bool:
    """Ask the Linux kernel for ``sig`` when our parent thread exits. False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
            return False
    except (OSError, AttributeError) as exc:
        log.warning("prctl is not available (%s); watching the supervisor instead", exc)
        return False
    return True


def follow_supervisor(pid: int, *, grace: float, poll: float = 0.5) -> threading.Thread:
    """End this process (SIGTERM, then after ``grace`` seconds a hard exit) when process ``pid``,
    our parent, is gone. Returns the watching thread (a daemon)."""
    kernel = set_parent_death_signal(signal.SIGTERM)

    def supervisor_gone() -> bool:
        return os.getppid() != pid  # an orphan is adopted by init or a subreaper

    def watch() -> None:
        while not supervisor_gone():
            time.sleep(poll)
        log.warning("the supervising process %d is gone: stopping this worker", pid)
        if not kernel:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        log.error("the worker did not stop within %.0f s of its supervisor's end: exiting", grace)
        logging.shutdown()
        os._exit(1)

    if kernel and supervisor_gone():  # it died before prctl: the kernel will not tell us
        os.kill(os.getpid(), signal.SIGTERM)
    thread = threading.Thread(target=watch, name="supervisor-watch", daemon=True)
    thread.start()
    return thread
