"""QEMU's gdbstub through a real gdb in MI mode, launched by pygdbmi.

pygdbmi's own write()/get_gdb_response() wait 0.2 s per call for more output; we instead write a
tokenised MI command and read gdb's stdout line by line (parsed with pygdbmi's MI parser) until
the result record carrying our token: one physical read then costs what gdb/MI costs (~0.2 ms).

Read-only: the only packets we make gdb send are register and memory reads, qqemu.PhyMemMode
queries, and Qqemu.PhyMemMode to switch memory packets to guest-physical addresses and back to
the mode we found. No memory or register write is ever issued, and no detach or continue:
the session resumes a VM it found running through QMP.
"""

import ctypes
import os
import re
import select
import signal
import time
from typing import Dict, List, Optional

from ..errors import AttachError, MemoryReadError, VMGoneError
from .qmp import SocketAddress, check_socket_path, describe_address

# Seconds gdb itself may take to start and answer its first command.
GDB_START = 30
MAX_LINE = 256 << 20     # a line of gdb/MI: the longest a read qintrospect asks for, in hex, fits
# The control registers the walk needs, by the names QEMU's target.xml gives them.
CONTROL_REGISTERS = ("cr0", "cr3", "cr4", "efer")
# Protection-key rights registers, read when a stub describes them (gdb's org.gnu.gdb.i386.pkeys
# feature names PKRU "pkru"); QEMU's x86 stub does not, up to 10.0 at least.
KEY_REGISTERS = ("pkru", "pkrs")


# gdb's words for a remote end that went away (as opposed to one refusing a single read)
_LOST = re.compile(r"Remote connection closed|Remote communication error|not being run|"
                   r"Connection reset|Broken pipe|No such process", re.I)


def one_line(text: str) -> str:
    """`text`, refused (ValueError) if it holds a control character: gdb reads its input line
    by line, so a newline inside anything we pass (a socket path, say) would start a command
    of its own. Every command goes through here before it is written."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ValueError(f"control character in {text!r}: not passed to gdb")
    return text


class GdbError(AttachError):
    """gdb answered ^error."""


def _controller(command):
    """pygdbmi's GdbController, with gdb made safe to lose: gdb runs in its own session (a
    Ctrl-C at the terminal reaches qintrospect, which restores the VM, not gdb), and it is
    killed outright when qintrospect dies. gdb must never see EOF on its input first: its quit
    path detaches, and detaching resumes a VM that qintrospect may have found paused. So gdb's
    stdin is a pipe whose write end gdb itself also holds: it reads no EOF, it only dies."""
    import subprocess
    from pygdbmi.gdbcontroller import GdbController
    from pygdbmi.IoManager import IoManager

    class Controller(GdbController):
        def spawn_new_gdb_subprocess(self) -> int:
            read_end, write_end = os.pipe()
            try:
                self.gdb_process = subprocess.Popen(
                    self.command, shell=False, stdin=read_end, stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL, bufsize=0, start_new_session=True,
                    pass_fds=(write_end,), preexec_fn=_die_with_parent)
            except BaseException:
                os.close(write_end)
                raise
            finally:
                os.close(read_end)
            self.gdb_process.stdin = os.fdopen(write_end, "wb", buffering=0)
            self.io_manager = IoManager(self.gdb_process.stdin, self.gdb_process.stdout, None,
                                        self.time_to_check_for_additional_output_sec)
            return self.gdb_process.pid

        def exit(self) -> None:
            # SIGKILL, not SIGTERM: gdb's SIGTERM handler quits through detach
            if self.gdb_process is not None:
                self.gdb_process.kill()
                self.gdb_process.wait()
                for stream in (self.gdb_process.stdin, self.gdb_process.stdout):
                    try:
                        stream.close()
                    except OSError:
                        pass
                self.gdb_process = None

    return Controller(command=command, time_to_check_for_additional_output_sec=0)


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# The gdb that knows each target's registers: Debian's `gdb` is built for the host (x86)
# only; `gdb-multiarch` reads any target's description.
GDB_FOR = {"x86_64": "gdb", "aarch64": "gdb-multiarch", "riscv64": "gdb-multiarch"}
PACKAGE_OF = {"gdb": "gdb", "gdb-multiarch": "gdb-multiarch"}


class GdbStub:
    def __init__(self, address: SocketAddress, timeout: float = 10.0,
                 gdb_path: Optional[str] = None, arch: str = "x86_64"):
        self.address = address
        self.timeout = timeout
        self.arch = arch
        self.gdb_path = gdb_path or GDB_FOR.get(arch, "gdb-multiarch")
        self._controller = None
        self._proc = None
        self._buffer = bytearray()
        self._token = 100
        self._register_numbers: Dict[str, int] = {}
        self._phys_mode_found: Optional[str] = None
        self._connected = False
        self.reads = 0  # physical reads done, for -v and benchmarks

    # ---- connection ---------------------------------------------------------------------------

    def connect(self) -> "GdbStub":
        """Start gdb and `target remote` the stub. Connecting stops the VM (QEMU does that)."""
        import shutil
        if shutil.which(self.gdb_path) is None:
            package = PACKAGE_OF.get(self.gdb_path, "gdb")
            raise AttachError(f"{self.gdb_path} not found; install it (apt-get install "
                              f"{package})")
        self._controller = _controller([self.gdb_path, "--nx", "--quiet", "--interpreter=mi3"])
        self._proc = self._controller.gdb_process
        try:
            self._attach()
        except BaseException:
            self.close()   # no gdb left behind when attaching fails
            raise
        return self

    def _attach(self) -> None:
        # gdb's own start is not the VM answering: on a slow host (a TCG guest running KVM)
        # it takes seconds, so the first exchange gets GDB_START seconds whatever --timeout says
        for k, setting in enumerate(("confirm off", "pagination off", "width 0",
                                     "stack-cache off", "code-cache off",
                                     "remotetimeout %d" % max(1, int(self.timeout)),
                                     "tcp connect-timeout %d" % max(1, int(self.timeout)))):
            self.mi(f"-gdb-set {setting}", timeout=max(self.timeout, GDB_START) if k == 0
                    else None)
        where = describe_address(self.address)
        target = where if isinstance(self.address, str) else f"{self.address[0]}:{self.address[1]}"
        if isinstance(self.address, str):
            check_socket_path(self.address, "gdbstub socket",
                              f"is QEMU running with -gdb unix:{where},server=on ?")
        try:
            self.mi(f"-target-select remote {target}", timeout=self.timeout + 5)
        except GdbError as exc:
            raise AttachError(f"could not attach gdb to the gdbstub at {where}: {exc}. Is QEMU "
                              "started with -gdb, and is no other debugger attached?") from None
        except VMGoneError:
            raise AttachError(f"the gdbstub at {where} did not answer within "
                              f"{self.timeout:g} s; is it a QEMU gdbstub?") from None
        self._connected = True
        names = self.mi("-data-list-register-names").get("register-names", [])
        self._register_numbers = {n: i for i, n in enumerate(names) if n}
        missing = [r for r in CONTROL_REGISTERS if r not in self._register_numbers]
        first = {"aarch64": "TTBR0_EL1", "riscv64": "satp"}.get(self.arch)
        if first is not None:
            missing = [] if first in self._register_numbers else [first]
        if missing:
            raise AttachError(f"the gdbstub at {where} does not expose {', '.join(missing)}; "
                              f"qintrospect needs qemu-system-{self.arch}'s gdbstub")

    def close(self) -> None:
        """Put the stub's memory mode back and disconnect, leaving the VM stopped: the session
        resumes it through QMP if it was found running. Never `detach`: a gdbstub behind a
        serial line (nested rigs) never sees the connection end, and after a detach the next
        debugger's first query crashes that QEMU. Never `kill`: that would end QEMU."""
        if self._proc is None:
            return
        try:
            if self._connected:
                if self._phys_mode_found is not None:
                    self.monitor_packet(f"Qqemu.PhyMemMode:{self._phys_mode_found}")
                self.mi("-interpreter-exec console disconnect", timeout=5)
        except Exception:
            pass
        finally:
            self._phys_mode_found = None
            self._connected = False
            try:
                self._controller.exit()
            except Exception:
                pass
            self._proc = None

    # ---- MI plumbing ----------------------------------------------------------------------------

    def mi(self, command: str, timeout: Optional[float] = None) -> dict:
        """Send one MI command, return the payload of its result record (or raise)."""
        from pygdbmi.gdbmiparser import parse_response
        if self._proc is None or self._proc.poll() is not None:
            raise VMGoneError("gdb is not running (the gdbstub connection was lost)")
        self._token += 1
        token = self._token
        line = f"{token}{one_line(command)}\n"   # gdb takes the rest of a line as arguments
        try:
            self._proc.stdin.write(line.encode())
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise VMGoneError("gdb exited; the gdbstub connection was lost") from None
        deadline = time.monotonic() + (timeout or self.timeout)
        console: List[str] = []
        while True:
            line = self._readline(deadline, command)
            record = parse_response(line)
            if record.get("type") in ("console", "log") and record.get("payload"):
                console.append(record["payload"])
            if record.get("type") == "result" and record.get("token") == token:
                payload = record.get("payload") or {}
                if record.get("message") == "error":
                    raise GdbError(payload.get("msg", "gdb error") if isinstance(payload, dict)
                                   else str(payload))
                if not isinstance(payload, dict):
                    payload = {}
                payload["_console"] = console
                return payload
            if record.get("type") == "notify" and record.get("message") == "thread-group-exited":
                pass

    def _readline(self, deadline: float, command: str) -> str:
        """gdb's next line. The buffer grows in place and is searched only where it grew
        (a memory read is one line of twice its length in hex: whole lines of many MiB)."""
        fd = self._proc.stdout.fileno()
        end = self._buffer.find(b"\n")
        while end < 0:
            if len(self._buffer) > MAX_LINE:
                raise VMGoneError(f"gdb sent a line longer than {MAX_LINE >> 20} MiB in answer "
                                  f"to {command.split()[0]}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise VMGoneError(f"gdb gave no answer to {command.split()[0]} within "
                                  f"{self.timeout:g} s; the gdbstub or QEMU may be gone")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                raise VMGoneError("gdb exited; the gdbstub connection was lost")
            at = len(self._buffer)
            self._buffer += chunk
            end = self._buffer.find(b"\n", at)
        line = bytes(self._buffer[:end])
        del self._buffer[:end + 1]
        return line.decode(errors="replace").rstrip("\r")

    def monitor_packet(self, packet: str) -> str:
        """Send a raw packet with `maint packet` and return the stub's reply text."""
        out = self.mi(f'-interpreter-exec console "maint packet {packet}"')
        for text in out["_console"]:
            m = re.match(r'received: "(.*)"', text.strip())
            if m:
                return m.group(1)
        return ""

    # ---- what the walk needs --------------------------------------------------------------------

    def select_vcpu(self, index: int) -> None:
        """gdb's threads are QEMU's vCPUs, numbered from 1. Selecting one makes gdb read
        memory at its PC: in physical mode that address would be taken as guest-physical (a
        device, maybe), so the stub is put in virtual mode around it."""
        physical = self._phys_mode_found is not None
        if physical:
            self.monitor_packet("Qqemu.PhyMemMode:0")
        try:
            self.mi(f"-thread-select {index + 1}")
        except GdbError:
            raise AttachError(f"vCPU {index} is not known to the gdbstub") from None
        finally:
            if physical:
                self.monitor_packet("Qqemu.PhyMemMode:1")

    def flush_registers(self) -> None:
        """Forget gdb's cached registers (the VM ran since gdb last read them)."""
        self.mi('-interpreter-exec console "maint flush register-cache"')

    def has_register(self, name: str) -> bool:
        return name in self._register_numbers

    def registers(self, names=CONTROL_REGISTERS) -> Dict[str, int]:
        numbers = " ".join(str(self._register_numbers[n]) for n in names)
        values = self.mi(f"-data-list-register-values x {numbers}").get("register-values", [])
        by_number = {int(v["number"]): v["value"] for v in values}
        out = {}
        for name in names:
            text = by_number.get(self._register_numbers[name], "")
            try:
                out[name] = int(text, 16)
            except ValueError:
                raise AttachError(f"gdb printed {name} as {text!r}, not a number") from None
        return out

    def query_phys_mode(self) -> str:
        """The stub's memory mode now: "0" (virtual) or "1" (guest-physical)."""
        found = self.monitor_packet("qqemu.PhyMemMode")
        if found not in ("0", "1"):
            raise AttachError("this gdbstub has no physical-memory mode (qqemu.PhyMemMode "
                              f"answered {found!r}); qintrospect needs QEMU's gdbstub")
        return found

    def physical_mode(self, restore_to: Optional[str] = None) -> None:
        """Switch memory packets to guest-physical addresses; close() puts back `restore_to`
        (default: the mode found now; the mode persists in QEMU across connections)."""
        if self._phys_mode_found is None:
            self._phys_mode_found = restore_to or self.query_phys_mode()
        if self.monitor_packet("Qqemu.PhyMemMode:1") != "OK":
            raise AttachError("the gdbstub refused Qqemu.PhyMemMode:1")

    def read(self, address: int, length: int) -> bytes:
        """Read guest memory in the current mode (physical after physical_mode())."""
        try:
            out = self.mi(f"-data-read-memory-bytes {address:#x} {length}")
        except GdbError as exc:
            if _LOST.search(str(exc)):
                raise VMGoneError(f"the gdbstub connection was lost ({exc}); QEMU may have "
                                  "exited") from None
            raise MemoryReadError(f"gdbstub could not read {length} bytes at {address:#x}: {exc}",
                                  address) from None
        data = b"".join(bytes.fromhex(block["contents"]) for block in out.get("memory", []))
        if len(data) != length:
            raise MemoryReadError(f"gdbstub returned {len(data)} of {length} bytes at "
                                  f"{address:#x}", address)
        self.reads += 1
        return data
