"""Dump what a script sees of its environment, as JSON (cf. coverage.py's try_execfile.py)."""
import json
import os
import sys

import __main__

from sibling_helper import HELPER_VALUE  # a sibling import needs the script's directory on sys.path

info = {
    "name": __name__,
    "file": __file__,
    "argv": sys.argv,
    "path0": sys.path[0],
    "cwd": os.getcwd(),
    "globals": sorted(k for k in globals() if k not in ("json", "os", "sys", "__main__", "HELPER_VALUE", "info")),
    "package": __package__,
    "spec": None if __spec__ is None else __spec__.name,
    "main_is_self": __main__.__dict__ is globals(),
    "loader": type(__loader__).__name__,
    "cached": __cached__,
    "builtins": type(__builtins__).__name__,
    "helper": HELPER_VALUE,
    "profiling_env": os.environ.get("GRADSCOPE_PROFILING"),
}
print(json.dumps(info, sort_keys=True))
code = int(os.environ.get("ENV_DUMP_EXIT", "0"))
if code:
    sys.exit(code)
