"""Exit in the way argv[1] says: an int code, a message, None, or an exception."""
import sys

how = sys.argv[1]
if how == "msg":
    sys.exit("fatal: the script gave up")
if how == "none":
    sys.exit()
if how == "kbd":
    raise KeyboardInterrupt
sys.exit(int(how))
