"""Python multiprocessing's temporary folders (pymp-*), which a local Ray's dashboard makes and Ray, ending
the dashboard without letting Python remove them, leaves in $TMPDIR: one per Ray started."""
from __future__ import annotations

import os
import tempfile


def folders() -> set[str]:
    """Python multiprocessing's temporary folders (pymp-*) in the temporary folder this process and the
    Ray it starts use."""
    base = tempfile.gettempdir()
    try:
        return {os.path.join(base, n) for n in os.listdir(base) if n.startswith("pymp-")}
    except OSError:
        return set()


def listening(children_only: bool) -> set[str]:
    """The Unix sockets in pymp-* folders that the processes this one started (`children_only`), or any
    process, listen on. Ray's dashboard starts its modules from a forkserver listening in one; Python
    removes the folder when the dashboard exits, but Ray ends the dashboard without letting it (an
    empty pymp-* folder left in $TMPDIR per run)."""
    try:
        import psutil  # Ray's dependency
    except ImportError:
        return set()
    try:
        if not children_only:
            connections = psutil.net_connections(kind="unix")
        else:
            connections = []
            for child in psutil.Process().children(recursive=True):
                try:
                    connections += child.net_connections(kind="unix")
                except psutil.Error:
                    continue
    except psutil.Error:
        return set()
    return {c.laddr for c in connections
            if isinstance(c.laddr, str) and os.path.basename(os.path.dirname(c.laddr)).startswith("pymp-")}


def remove(ours: set[str], new: set[str]) -> None:
    """Remove the pymp-* folders of this Ray: `ours`, where its processes listened before it was shut
    down, and `new`, those made while it ran, where no process listens any longer (its processes may
    have been ended first, by a SIGTERM to the whole process group); each only if nothing but its
    listening sockets is in it."""
    live = listening(children_only=False) if new - ours else set()
    for folder in ours | new:
        try:
            names = os.listdir(folder)
            if any(not n.startswith("listener-") or (folder not in ours and os.path.join(folder, n) in live)
                   for n in names):
                continue
            for name in names:
                os.unlink(os.path.join(folder, name))
            os.rmdir(folder)
        except OSError:  # gone already, or no longer only sockets
            pass
