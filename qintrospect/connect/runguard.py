"""The one place that pauses and resumes a VM, and that holds its lock and marker meanwhile.

Rules (README, "Safety"):
- Only what qintrospect did is undone: `cont` only after a pause of its own (its `stop`, or
  the stop its gdb connection caused), and only while nobody else resumed the VM since.
  `stop` is sent only to pause a running VM for a read, never to put a state "back": a VM
  its owner resumed while qintrospect was attached stays running.
- What is read from a paused VM holds together only while it stays paused. A pause of its
  own or one found (its owner's), either can end behind qintrospect's back: QEMU tells every
  monitor (RESUME), and a resume seen during a read is reported (check), never read through.
  A VM that runs while qintrospect reads it may reset under it: RESET, SHUTDOWN, POWERDOWN.
- The VM's lock (runstate) is held while the run state is relied on or changed, and the
  marker says, for a qintrospect killed meanwhile, what it found (`qintrospect resume`).

A monitor tells the guard of its events through `monitor.listeners` (a list of callables
taking the event's name), `monitor.poll()` takes in what QEMU already sent, unwaited, and
`monitor.sync()` makes one round trip. After each reply it calls `monitor.after_reply`: the
guard then ends a read an event spoiled at once (a scan through QMP stops mid-way).
"""

from typing import Callable, List, Optional

from . import runstate
from ..errors import QIError, VMGoneError
from .qmp import QmpCommandError

LIFECYCLE = ("RESET", "SHUTDOWN", "POWERDOWN")
WHAT = {"RESET": "reset (rebooted)", "SHUTDOWN": "shut down",
        "POWERDOWN": "was asked to power down", "RESUME": "was resumed by someone else"}


class RunGuard:
    """One attached VM's run state: `attach()`, then `pause()`/`resume()` around reads,
    `begin()`/`check()` around each command's reads, `leave()` at the end."""

    def __init__(self, connect: Callable, key: str, lock_key: Optional[str], timeout: float,
                 warnings: List[str]):
        """connect: makes a connected monitor (called again if the first breaks while
        leaving); key: the VM's marker name (runstate.vm_key); lock_key: its lock's name."""
        self._connect = connect
        self.monitor = None
        self.key = key
        self.lock_key = lock_key
        self.timeout = timeout
        self.warnings = warnings
        self.found: Optional[dict] = None    # query-status at attach
        self.ours = False                    # paused by us (our stop, or our gdb connecting)
        self.stable = False                  # the current read relies on the VM being paused
        self.reading = False                 # a command reads now (begin() .. end())
        self.changed: Optional[str] = None   # the event that spoiled the current read
        self.events = 0                      # events of any kind since mark()
        self.left_paused: Optional[dict] = None     # what a killed qintrospect left
        self.phys_mode_inherited: Optional[str] = None
        self._marker = False
        self._locked = False
        self._our_cont = False
        self._whose = ""
        self._debugger = False               # our gdb is attached to the VM's gdbstub
        self.resumed_by_other = False        # someone else resumed it while we were attached

    # ---- attaching and leaving ------------------------------------------------------------

    def attach(self, monitor) -> dict:
        """Take the lock, read the run state and write the marker; returns query-status."""
        self._listen(monitor)
        self._lock()
        self.found = self.status()
        self._note_marker(bool(self.found.get("running")))
        return self.found

    def _listen(self, monitor) -> None:
        self.monitor = monitor
        for hooks, hook in ((getattr(monitor, "listeners", None), self._event),
                            (getattr(monitor, "after_reply", None), self._after_reply)):
            if hooks is not None and hook not in hooks:
                hooks.append(hook)

    def leave(self, hold: bool = False) -> None:
        """Put back what we did (resume()); with hold, keep our pause (a nested translation
        holds an inner VM while it walks the outer one: resume_held() later). Never raises:
        what could not be done is said in warnings."""
        self.stable = self.reading = False
        if not self._locked and self.lock_key is not None:
            try:                          # a shell let go between commands: wait for the
                self.take_lock()          # other qintrospect before resuming under it
            except runstate.Busy as exc:
                self.warnings.append(f"{exc}; the VM is put back as found all the same")
            except (runstate.RunStateError, OSError):
                pass
        if hold:
            self._check_held()
            return
        if self._debugger and self.resumed_by_other:
            # QEMU's gdbstub stops a running VM at every packet it gets: after its owner
            # resumed it, our gdb's reads (and its disconnect) paused it again: ours to undo
            self.ours = True
        try:
            self.resume(reconnect=True)
        finally:
            self._release_marker()
            self.release_lock()

    def resume_held(self) -> None:
        """After leave(hold=True): resume() what is ours, let go of the marker and the lock."""
        try:
            self.resume(reconnect=True)
        finally:
            self._release_marker()
            self.release_lock()
            self.close_monitor()

    def _check_held(self) -> None:
        """A pause we hold across leave(hold=True) must still be there: if someone resumed
        the VM, it is theirs now, and what the hops after this one read may not go with
        what this one read."""
        if self.found is None or not self.ours:
            return
        try:
            running = bool(self.status().get("running"))
        except QIError:
            return
        if running:
            self.ours = False
            self.warnings.append("the VM was resumed by someone else while qintrospect held it "
                                 "paused; it is left running")

    def close_monitor(self) -> None:
        if self.monitor is not None:
            for hooks, hook in ((getattr(self.monitor, "listeners", None), self._event),
                                (getattr(self.monitor, "after_reply", None),
                                 self._after_reply)):
                if hooks is not None and hook in hooks:
                    hooks.remove(hook)
            self.monitor.close()
            self.monitor = None

    # ---- pausing and resuming -------------------------------------------------------------

    def status(self) -> dict:
        status = self.monitor.command("query-status")
        if not isinstance(status, dict):
            status = {}
        return status

    def pause(self, status: Optional[dict] = None) -> bool:
        """Pause the VM if it runs now (status: a query-status just read); True if we did."""
        if self.ours:
            return False
        status = self.status() if status is None else status
        if not status.get("running"):
            return False
        self.monitor.command("stop")
        self.ours = True
        return True

    def observe(self, monitor, status: dict) -> None:
        """Watch a VM held by someone else's debugger (qi inside gdb): its events, no lock, no
        marker, and never a pause or resume of ours."""
        self._listen(monitor)
        self.found = status
        self.begin(status)

    def debugger_attached(self) -> None:
        """Our gdb connected: QEMU's gdbstub stopped the VM. If it ran, that pause is ours."""
        self._debugger = True
        if self.found is not None and self.found.get("running"):
            self.ours = True

    def resume(self, reconnect: bool = False) -> None:
        """`cont`, if the VM is paused by us and nobody resumed it since (what QEMU already
        sent is looked at; a `cont` that crosses someone's own resume does nothing: QEMU
        resumes only a paused VM); our pause ends either way. With reconnect, a broken
        monitor (the interruption that brought us here) is replaced by a fresh one."""
        if not self.ours:
            return
        for attempt in range(2 if reconnect else 1):
            try:
                if self.monitor is None:
                    self._listen(self._connect())
                self.poll()
                if self.ours:
                    self.stable = False           # our own RESUME spoils nothing
                    self._our_cont = True
                    try:
                        self.monitor.command("cont")
                    finally:
                        self._our_cont = False
                self.ours = False
                return
            except QmpCommandError as exc:        # QEMU answered: no retry will change it
                self.ours = False
                self.warnings.append(f"{exc}; the VM is left as it is")
                return
            except QIError:
                if not reconnect:
                    raise
                self.close_monitor()
        self.warnings.append("could not resume the VM through QMP after detaching: it stays "
                             "paused; `qintrospect resume --qmp ...` resumes it")

    # ---- one command's reads --------------------------------------------------------------

    def begin(self, status: Optional[dict] = None) -> None:
        """A command starts reading: it relies on the VM staying paused if it is paused now
        (by us, or found so: status is a query-status just read)."""
        running = (status or self.found or {}).get("running") and not self.ours
        self.stable = not running
        self._whose = "paused by qintrospect" if self.ours else "found paused"
        self.changed = None
        self.reading = True

    def end(self) -> None:
        """The command's reads are over (what an event spoiled is still said by check())."""
        self.reading = False

    def _after_reply(self) -> None:
        if self.reading and self.changed is not None:
            self.check(sync=False)

    @property
    def live(self) -> bool:
        """The VM runs while we read (no pause of ours or its owner's)."""
        return self.found is not None and not self.stable

    def check(self, sync: bool = True) -> None:
        """Raise VMGoneError if an event spoiled what was read since begin(): for a paused VM,
        a resume by someone else; for any, a reset or shutdown. sync asks QEMU (a round trip
        after which every earlier event has arrived); else only what arrived is looked at."""
        if self.monitor is None or self.found is None:
            return
        if sync:
            self.monitor.sync()
        else:
            self.poll()
        event, self.changed = self.changed, None
        if event is None:
            return
        if event == "RESUME":
            raise VMGoneError(
                f"the VM was resumed by someone else while qintrospect read it ({self._whose}), "
                "so what was read may mix memory from before and after; it is left running. "
                "Run the command again (a running VM is paused for the reads)")
        raise VMGoneError(f"the guest {WHAT.get(event, event)} while qintrospect was reading "
                          "it, so what was read mixes memory from before and after; run the "
                          "command again, or attach with --gdb or --freeze for one consistent "
                          "view")

    def poll(self) -> None:
        poll = getattr(self.monitor, "poll", None)
        if poll is not None:
            poll()

    def mark(self) -> None:
        """Count events afresh (events_since_mark)."""
        self.poll()
        self.events = 0

    def events_since_mark(self) -> int:
        """Events QEMU sent since mark(), read without waiting: none since a paused VM's
        registers were read means they still hold."""
        self.poll()
        return self.events

    def _event(self, name) -> None:
        self.events += 1
        if name == "RESUME":
            if self._our_cont:
                return
            self.resumed_by_other = True
            if self.ours:
                self.ours = False         # resumed by someone else: their run state now
            if self.stable:
                self.changed = "RESUME"
        elif name in LIFECYCLE and self.found is not None:
            self.changed = self.changed or name

    # ---- the lock ---------------------------------------------------------------------------

    def _lock(self) -> None:
        try:
            self.take_lock()
        except (runstate.RunStateError, OSError) as exc:
            self.lock_key = None
            self.warnings.append(f"run-state lock not used ({exc}); another qintrospect on this "
                                 "VM at the same time could change its run state under this one")

    def take_lock(self) -> None:
        """Hold this VM's lock (again); see release_lock()."""
        if self.lock_key is not None and not self._locked:
            runstate.lock(self.lock_key, self.timeout)
            self._locked = True

    def release_lock(self) -> None:
        """Let another qintrospect work on this VM (a shell, between commands)."""
        if self.lock_key is not None and self._locked:
            runstate.unlock(self.lock_key)
            self._locked = False

    # ---- the marker ---------------------------------------------------------------------------

    def _note_marker(self, running: bool) -> None:
        """Read the marker a killed qintrospect may have left, then write ours."""
        try:
            marker = runstate.load(self.key)
            self.left_paused = runstate.left_paused(marker, running)
            self.phys_mode_inherited = runstate.phys_mode_left(marker)
            runstate.record(self.key, running, self.left_paused, self.phys_mode_inherited)
        except (runstate.RunStateError, OSError) as exc:
            self.warnings.append(f"run-state marker not used ({exc}); if qintrospect is killed "
                                 "while attached, the next run cannot say why the VM is paused")
            return
        self._marker = True
        if self.left_paused:
            self.warnings.append(
                f"this VM has been paused since {self.left_paused.get('since')} by a "
                f"qintrospect (pid {self.left_paused.get('pid')}) that was killed while "
                "attached; it found the VM running. `qintrospect resume` resumes it.")

    def note_phys_mode(self, original: str) -> None:
        """Write down the gdbstub memory mode to put back, before it is switched."""
        if self._marker:
            runstate.record(self.key, bool((self.found or {}).get("running")), self.left_paused,
                            original)
        self.phys_mode_inherited = None

    def _release_marker(self) -> None:
        if not self._marker:
            return
        try:
            runstate.release(self.key, self.left_paused, self.phys_mode_inherited)
        except (runstate.RunStateError, OSError) as exc:
            self.warnings.append(f"run-state marker not released: {exc}")
        self._marker = False
