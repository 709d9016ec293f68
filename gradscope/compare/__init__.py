"""``gradscope compare``: rerun the script with clipping injected and compare it with the unclipped run.

Runs the arms as subprocesses and reads their stores; never imports torch.
"""

from gradscope.compare.arms import ArmObserver, CompareOptions, arm_argv, plan_compare, run_compare

__all__ = ["ArmObserver", "CompareOptions", "arm_argv", "plan_compare", "run_compare"]
