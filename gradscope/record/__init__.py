"""Recording: run the user's script as ``python`` would, with hooks that measure every optimizer step.

The only part of gradscope that imports torch; importing this package itself does not.
"""
