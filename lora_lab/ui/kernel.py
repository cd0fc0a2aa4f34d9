"""The one module that knows ipykernel's internals: is there a kernel, and how to hear the front end
while a cell is busy.

A kernel executes one shell message at a time, and a widget event (a button click, a slider move)
is a ``comm_msg`` on that same shell channel, so it normally waits until the running cell has
finished (ipywidgets #3468).  Views that must react *during* a cell call :func:`pump_kernel_events`
between units of work (the dashboard between training steps): it handles the waiting widget
messages at once, publishes the "idle" status that ipywidgets' front end waits for before it sends
a widget's next message, and re-queues everything else to run, in order, after the cell.
:func:`in_kernel` tells a view whether it runs in a kernel at all (the switchboard then generates
on a worker thread).  Outside a kernel both are cheap no-ops.
"""

from __future__ import annotations

import threading

__all__ = ["current_kernel", "in_kernel", "pump_kernel_events"]


def current_kernel():
    """The running ipykernel ``Kernel`` object, or None outside a kernel (scripts, pytest)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    return getattr(shell, "kernel", None)


def in_kernel() -> bool:
    """True inside a Jupyter kernel, where a button click waits while a cell is busy."""
    return current_kernel() is not None


def _run_now(coro) -> bool:
    """Drive a coroutine that never suspends (comm handlers are synchronous); False if it did."""
    try:
        coro.send(None)
    except StopIteration:
        return True
    coro.close()
    return False


def pump_kernel_events() -> int:
    """Handle widget messages waiting for a busy kernel; re-queue the rest.  Returns how many
    widget messages were handled (0 outside ipykernel >= 7 or when nothing waits).

    ipykernel 7 receives shell messages on a thread and forwards those for the main shell through
    an in-process socket that the main thread reads only between cells.  We read that socket, run
    ``comm_msg``/``comm_close`` through the kernel's own dispatcher (as ipykernel does for comm
    messages that arrive during an ``await``), restore the cell's parent header so its output stays
    in its cell, and hand every other message back to the kernel's loop, in arrival order, to run
    after the cell exactly as it would have on receipt.
    """
    kernel = current_kernel()
    thread = getattr(kernel, "shell_channel_thread", None)
    if thread is None or getattr(kernel, "session", None) is None:
        return 0
    if threading.current_thread() is not threading.main_thread():
        return 0  # only the main shell's thread may read its socket (a subshell has its own loop)
    pair = thread.manager.get_shell_channel_to_subshell_pair(None)
    sock = pair.to_socket
    handled = 0
    while sock.poll(0):
        frames = sock.recv_multipart(copy=False)
        try:
            _, msg = kernel.session.feed_identities(frames, copy=False)
            header = kernel.session.deserialize(msg, content=False, copy=False)["header"]
            msg_type = header["msg_type"]
        except Exception:  # noqa: BLE001  (leave anything odd to the kernel itself)
            msg_type = None
        if msg_type in ("comm_msg", "comm_close"):
            parent = kernel.get_parent("shell")
            ident = kernel._get_shell_context_var(kernel._shell_parent_ident)
            try:
                if _run_now(kernel.dispatch_shell(frames, None, concurrent=True)):
                    handled += 1
                # A concurrent dispatch publishes no busy/idle status, but ipywidgets' front end
                # holds a widget's next message until the previous one's "idle" arrives: without
                # this, Resume after Pause (or a slider moved twice) would never be sent.
                kernel._publish_status("idle", "shell")  # parent: this comm message
            finally:
                kernel.set_parent(ident, parent, channel="shell")
        else:
            _defer(kernel, pair, frames)
    return handled


def _defer(kernel, pair, frames) -> None:
    """Schedule a shell message to run after the current cell exactly as the kernel would have on
    receipt: through the socket's own receive callback, which runs it in the kernel's persistent
    ContextVar context (ContextVars set in one cell stay set in the next)."""
    receive = getattr(pair.to_stream, "_recv_callback", None)  # pyzmq ZMQStream's callback
    if receive is not None:
        kernel.io_loop.add_callback(receive, frames)
    else:
        kernel.io_loop.add_callback(kernel.shell_main, None, frames)
