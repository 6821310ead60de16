"""Runs one untrusted program after locking this process down. Started by sandbox.py as
`python -I -S -B _sandbox_child.py CONFIG_JSON`; imports nothing from moss_jax.

Order: read the pass token from stdin, set resource limits, Landlock (writes only under the
work directory, no TCP bind/connect, no signals to processes outside), no_new_privs, seccomp
(no sockets, no new processes), a Python audit hook, then exec the program. The kernel layers
stay in force across exec and are inherited; the audit hook is a last, bypassable layer.
A program that finishes prints the token on the real stdout; anything else is a failure.
"""

import ctypes
import json
import os
import platform
import resource
import struct
import sys

# Landlock (include/uapi/linux/landlock.h); the same syscall numbers on x86_64 and aarch64.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
# Write-type filesystem rights by the ABI version that introduced them (reads stay allowed).
FS_WRITE_RIGHTS = {1: 0b1_1111_1111_0010, 2: 1 << 13, 3: 1 << 14, 5: 1 << 15}  # v1: WRITE_FILE, REMOVE_*, MAKE_*
NET_TCP_RIGHTS = 0b11  # v4: BIND_TCP, CONNECT_TCP
SCOPE_RIGHTS = 0b11  # v6: abstract unix sockets, signals

# seccomp BPF (linux/filter.h, linux/seccomp.h).
BPF_LD_W_ABS, BPF_JEQ_K, BPF_JSET_K, BPF_RET_K = 0x20, 0x15, 0x45, 0x06
SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO, SECCOMP_RET_KILL_PROCESS = 0x7FFF0000, 0x00050000, 0x80000000
PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
EPERM, ENOSYS = 1, 38
CLONE_THREAD = 0x00010000
# arch -> (AUDIT_ARCH, socket, clone, clone3, io_uring_setup, [fork, vfork] where they exist)
ARCHES = {
    "x86_64": (0xC000003E, 41, 56, 435, 425, (57, 58)),
    "aarch64": (0xC00000B7, 198, 220, 435, 425, ()),
}
# Signals: arch -> (kill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo), each allowed only with
# this process as its first argument (the target pid / thread group). Landlock scopes signals
# only from ABI 6 (Linux 6.12); these rules hold on any kernel with seccomp.
SIGNAL_SYSCALLS = {"x86_64": (62, 234, 129, 297), "aarch64": (129, 131, 138, 240)}
# Refused outright: tkill, ptrace, process_vm_readv/writev, pidfd_open/send_signal/getfd.
OTHER_PROCESS_SYSCALLS = {
    "x86_64": (200, 101, 310, 311, 434, 424, 438),
    "aarch64": (130, 117, 270, 271, 434, 424, 438),
}


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


def set_limits(cfg):
    cpu = int(cfg["cpu_seconds"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    mem = int(cfg["memory_bytes"])
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    fsize = int(cfg["file_bytes"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def landlock(libc, workdir):
    """Writes only beneath workdir. Returns the ABI version used, or 0 when unavailable."""
    abi = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi <= 0:
        return 0
    fs = 0
    for version, rights in FS_WRITE_RIGHTS.items():
        if abi >= version:
            fs |= rights
    if abi >= 6:
        attr = struct.pack("QQQ", fs, NET_TCP_RIGHTS, SCOPE_RIGHTS)
    elif abi >= 4:
        attr = struct.pack("QQ", fs, NET_TCP_RIGHTS)
    else:
        attr = struct.pack("Q", fs)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, buf, ctypes.c_size_t(len(attr)), 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    dir_fd = os.open(workdir, os.O_PATH | os.O_CLOEXEC)
    rule = ctypes.create_string_buffer(struct.pack("=Qi", fs, dir_fd), 12)
    if libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, rule, 0) < 0:
        raise OSError(ctypes.get_errno(), "landlock_add_rule")
    os.close(dir_fd)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) < 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)
    return int(abi)


def _insn(code, k, jt=0, jf=0):
    return struct.pack("HBBI", code, jt, jf, k)


def seccomp(libc):
    """No socket(), no new processes (threads allowed), no io_uring, no signals, tracing or
    memory access to other processes. True when installed."""
    arch = ARCHES.get(platform.machine())
    if arch is None:
        return False
    audit_arch, nr_socket, nr_clone, nr_clone3, nr_io_uring, nr_forks = arch
    own_pid = os.getpid()  # fixed: the filter forbids new processes
    errno = lambda e: _insn(BPF_RET_K, SECCOMP_RET_ERRNO | e)
    prog = [
        _insn(BPF_LD_W_ABS, 4),  # seccomp_data.arch
        _insn(BPF_JEQ_K, audit_arch, 1, 0),
        _insn(BPF_RET_K, SECCOMP_RET_KILL_PROCESS),
        _insn(BPF_LD_W_ABS, 0),  # seccomp_data.nr
    ]
    if platform.machine() == "x86_64":
        prog += [_insn(0x35, 0x40000000, 0, 1), errno(EPERM)]  # JGE: the x32 ABI
    for nr in (nr_socket, nr_io_uring, *nr_forks, *OTHER_PROCESS_SYSCALLS[platform.machine()]):
        prog += [_insn(BPF_JEQ_K, nr, 0, 1), errno(EPERM)]
    for nr in SIGNAL_SYSCALLS[platform.machine()]:
        prog += [
            _insn(BPF_JEQ_K, nr, 0, 6),
            _insn(BPF_LD_W_ABS, 16),  # args[0] low word: the target pid / thread group
            _insn(BPF_JEQ_K, own_pid, 0, 3),
            _insn(BPF_LD_W_ABS, 20),  # args[0] high word: 0 for a positive pid
            _insn(BPF_JEQ_K, 0, 0, 1),
            _insn(BPF_RET_K, SECCOMP_RET_ALLOW),
            errno(EPERM),
        ]
    prog += [_insn(BPF_JEQ_K, nr_clone3, 0, 1), errno(ENOSYS)]  # glibc falls back to clone
    prog += [
        _insn(BPF_JEQ_K, nr_clone, 0, 3),
        _insn(BPF_LD_W_ABS, 16),  # args[0] low word: clone flags
        _insn(BPF_JSET_K, CLONE_THREAD, 1, 0),
        errno(EPERM),
        _insn(BPF_RET_K, SECCOMP_RET_ALLOW),
    ]
    code = b"".join(prog)
    n = len(code) // 8
    filt = ctypes.create_string_buffer(code, len(code))
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxP", n, ctypes.addressof(filt)), 16)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return False
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0) != 0:
        return False
    return True


def audit_hook(workdir):
    """Python-level refusals (bypassable with ctypes; the kernel layers are the real ones)."""
    root = os.path.realpath(workdir) + os.sep
    blocked_prefixes = ("socket.", "subprocess.", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec")
    blocked = {"os.system", "os.kill", "os.killpg", "pty.spawn", "ctypes.dlopen", "webbrowser.open"}

    def hook(event, args):
        if event in blocked or event.startswith(blocked_prefixes):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
            path = os.path.realpath(os.fsdecode(args[0]))
            if writes and not (path + os.sep).startswith(root):
                raise PermissionError(f"sandbox: writing {path} outside the work directory")
        if event in ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.chmod"):
            path = args[0] if event != "os.rename" else args[1]
            if isinstance(path, (str, bytes)):
                path = os.path.realpath(os.fsdecode(path))
                if not (path + os.sep).startswith(root):
                    raise PermissionError(f"sandbox: {event} on {path} outside the work directory")

    sys.addaudithook(hook)


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def main():
    cfg = json.loads(sys.argv[1])
    token = sys.stdin.readline().strip()
    sys.stdin.close()
    workdir = cfg["workdir"]
    libc = _libc()
    layers = {"rlimits": False, "landlock": 0, "seccomp": False, "audit_hook": False}
    set_limits(cfg)
    layers["rlimits"] = True
    try:
        layers["landlock"] = landlock(libc, workdir) if cfg.get("landlock", True) else 0
    except OSError as e:
        print(f"sandbox: landlock unavailable: {e}", file=sys.stderr)
    layers["seccomp"] = seccomp(libc)
    if cfg.get("require_kernel_isolation") and not (layers["landlock"] and layers["seccomp"]):
        print(f"sandbox: kernel isolation unavailable {layers}", file=sys.stderr)
        sys.exit(3)
    if cfg.get("python_guard", True):
        audit_hook(workdir)
        layers["audit_hook"] = True
    real_stdout = os.dup(1)
    # Reported through an inherited pipe closed before the program runs: it cannot rewrite it.
    os.write(cfg["layers_fd"], json.dumps(layers).encode())
    os.close(cfg["layers_fd"])
    with open(cfg["program"], encoding="utf-8") as f:
        source = f.read()
    sys.argv = [cfg["program"]]
    sys.path.insert(0, workdir)
    glb = {"__name__": "__main__", "__file__": cfg["program"], "__builtins__": __builtins__}
    try:
        exec(compile(source, cfg["program"], "exec"), glb)
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
        print("sandbox: the program called exit(); not counted as a pass", file=sys.stderr)
        os._exit(4)
    sys.stdout.flush()
    os.write(real_stdout, ("\n" + token + "\n").encode())
    os._exit(0)


if __name__ == "__main__":
    main()
