"""The processes of one session (Linux /proc), for stopping what a test started and nothing else. Ray starts its
workers in process groups of their own inside the session, so a process group alone misses them: a "killed" node
or driver would leave its trials training and reporting."""
import os
import time


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


def kill_session(sid: int, sig, seconds: float = 10.0) -> None:
    """`sig` to every process of session `sid`, again until none is left or `seconds` have passed: a process forked
    while the others are being killed (a Ray worker starting) is not in the first listing, and a killed one may take
    a moment to die. The caller, when it is one of them, gets `sig` last."""
    me = os.getpid()
    end = time.monotonic() + seconds
    while True:
        pids = [p for p in session_pids(sid) if p != me]
        if not pids or time.monotonic() > end:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    if me in session_pids(sid):
        os.kill(me, sig)
