# Lets tests import the repo's vm/ helpers (the launcher, the oracle guest) as `vm.*`.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# A suite started in the background by a shell without job control (scripts/test's side runs,
# `nohup ... &`) inherits SIGINT ignored, and so would every qintrospect and QEMU it starts:
# the tests that interrupt one (Ctrl-C mid-scan, the shell's Ctrl-C) would wait in vain.
# Python's own handler here gives the children the default action back (exec resets it).
import signal  # noqa: E402

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
