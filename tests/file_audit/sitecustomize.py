"""Test instrument (on PYTHONPATH only in tests): records every file a Python process opens for reading and every
module it imports, into $FILE_AUDIT_DIR/<pid>.json at exit, with the name of the module it ran as __main__."""

import atexit
import json
import os
import sys

_DIR = os.environ.get("FILE_AUDIT_DIR")
_READ: set[str] = set()


def _hook(event, args):
    if event != "open" or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    mode, flags = (args[1], args[2]) if len(args) > 2 else (None, 0)
    writes = any(c in (mode or "") for c in "wax+") if mode else bool((flags or 0) & (os.O_WRONLY | os.O_RDWR))
    if not writes:
        _READ.add(os.path.abspath(os.fsdecode(args[0])))


def _dump():
    main = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None)
    modules = [m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)]
    with open(os.path.join(_DIR, f"{os.getpid()}.json"), "w") as f:
        json.dump({"main": main, "cwd": os.getcwd(), "read": sorted(_READ), "modules": sorted(modules)}, f)


if _DIR:
    sys.addaudithook(_hook)
    atexit.register(_dump)
