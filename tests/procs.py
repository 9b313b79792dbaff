"""The processes of one session (Linux /proc), for stopping what a test started and nothing else. Ray starts its
workers in process groups of their own inside the session, so a process group alone misses them: a "killed" node
or driver would leave its trials training and reporting."""
import os


def session_pids(sid: int) -> list[int]:
    """Every live process whose session id is `sid`."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(d))
    return out


def kill_session(sid: int, sig) -> None:
    """`sig` to every process of session `sid` (the caller too, last, when it is one of them)."""
    me = os.getpid()
    pids = session_pids(sid)
    for pid in [p for p in pids if p != me] + [p for p in pids if p == me]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
