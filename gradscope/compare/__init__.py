"""``gradscope compare``: rerun the script with clipping injected and compare it with the unclipped run.

:mod:`~gradscope.compare.plan` validates and lays out the arms (with
:mod:`~gradscope.compare.trust` checking what they will run against the record), :mod:`~gradscope.compare.arms` runs
them as subprocesses and reads their stores, :mod:`~gradscope.compare.metrics` measures them, and
:mod:`~gradscope.compare.view` shows the result. Never imports torch.
"""

from gradscope.compare.arms import ArmObserver, CompareResult, arm_argv, run_arm, run_compare
from gradscope.compare.plan import CompareOptions, Plan, plan_compare

__all__ = ["ArmObserver", "CompareOptions", "CompareResult", "Plan", "arm_argv", "plan_compare", "run_arm",
           "run_compare"]
