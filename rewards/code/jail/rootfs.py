"""The sandbox's filesystem: a fresh tmpfs root holding only what a Python program needs.

Runs as (namespace) root inside a new mount namespace, before any sandboxed process
starts. The new root has read-only, nosuid bind mounts of the system directories and of
the Python installation, a handful of device nodes, a private /tmp (the working
directories live there), and a /proc for the new PID namespace only. `pivot_root` then
detaches the host's tree, so nothing else on the host is visible or writable, and the whole
thing vanishes with the namespace.
"""
from __future__ import annotations

import os

from . import linux

SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")
DEVICES = ("null", "zero", "full", "random", "urandom")
# statvfs flag -> mount flag, for flags a bind remount must repeat (the kernel refuses to
# clear locked flags inside a user namespace)
_KEEP_FLAGS = ((os.ST_NOEXEC, linux.MS_NOEXEC), (os.ST_NOATIME, 1024),
               (os.ST_NODIRATIME, 2048), (os.ST_RELATIME, 1 << 21))


def _bind(src: str, dst: str, *, read_only: bool) -> None:
    if os.path.isdir(src):
        os.makedirs(dst, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        open(dst, "a").close()
    linux.mount(src, dst, None, linux.MS_BIND | linux.MS_REC)
    flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_NOSUID
    if read_only:
        flags |= linux.MS_RDONLY | linux.MS_NODEV
    current = os.statvfs(dst).f_flag
    for st_flag, ms_flag in _KEEP_FLAGS:
        if current & st_flag:
            flags |= ms_flag
    linux.mount(None, dst, None, flags)


def build(root: str, *, ro_paths: list[str], tmpfs_mb: int) -> None:
    """Mount the sandbox tree on `root` (an empty host directory) and pivot into it."""
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.mount("tmpfs", root, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV,
                f"size={tmpfs_mb}m,mode=755")
    for name in SYSTEM_DIRS:
        src = "/" + name
        if os.path.islink(src):
            os.symlink(os.readlink(src), os.path.join(root, name))
        elif os.path.isdir(src):
            _bind(src, os.path.join(root, name), read_only=True)
    for path in ro_paths:
        path = os.path.realpath(path)
        if os.path.exists(path) and not os.path.exists(root + path):
            _bind(path, root + path, read_only=True)
    dev = os.path.join(root, "dev")
    os.makedirs(dev, exist_ok=True)
    for name in DEVICES:
        if os.path.exists("/dev/" + name):
            _bind("/dev/" + name, os.path.join(dev, name), read_only=False)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, os.path.join(dev, name))
    for name in ("tmp", "dev/shm"):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        os.chmod(os.path.join(root, name), 0o1777)
    os.makedirs(os.path.join(root, "proc"), exist_ok=True)
    # hidepid=2: a sandbox uid cannot even list another uid's processes.
    linux.mount("proc", os.path.join(root, "proc"), "proc",
                linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, "hidepid=2")
    old = os.path.join(root, ".old_root")
    os.makedirs(old)
    os.chdir(root)
    linux.pivot_root(".", ".old_root")
    os.chdir("/")
    linux.umount2("/.old_root", linux.MNT_DETACH)
    os.rmdir("/.old_root")
