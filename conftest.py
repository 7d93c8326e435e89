# Lets tests import the repo's vm/ helpers (the launcher, the oracle guest) as `vm.*`.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
