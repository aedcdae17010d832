"""One way to make and run a HiGHS solver, shared by the exact MILP and the heuristic's LP.

HiGHS keeps one thread scheduler per process, created by the first solve with that
solve's ``threads`` option. From highspy 1.16 on, a later solve that asks for another
thread count fails at once (``run()`` returns ``kError``, model status "Not Set", and
the log says "Option 'threads' is set to 1 but the scheduler has already been
initialized to use 2 threads"). Every solver here therefore asks for the same count,
``THREADS``, and every run's own status is checked, so a failure reports what HiGHS
said rather than a guess.
"""

from __future__ import annotations

from importlib.metadata import version

import highspy

from raymoe.placement.errors import SolverError

THREADS = 1  # one thread per solve, in every solver of this package (see the module doc)


def new_solver(**options) -> highspy.Highs:
    """A silent HiGHS instance with ``THREADS`` threads and ``options`` (name -> value) set.

    Raises SolverError naming the option when HiGHS refuses one."""
    highs = highspy.Highs()
    for name, value in {"output_flag": False, "threads": THREADS, **options}.items():
        if highs.setOptionValue(name, value) != highspy.HighsStatus.kOk:
            raise SolverError("HiGHS", "option refused", f"option {name!r} = {value!r} was refused")
    return highs


def run(highs: highspy.Highs, solver: str) -> highspy.HighsModelStatus:
    """Run ``highs`` and return its model status.

    Raises SolverError with the run status and the model status when HiGHS reports an
    error (for example a thread scheduler created by another solve with other options)."""
    run_status = highs.run()
    status = highs.getModelStatus()
    if run_status == highspy.HighsStatus.kError:
        raise SolverError(solver, highs.modelStatusToString(status),
                          f"highspy {version('highspy')}: run() returned kError; set output_flag to see "
                          "HiGHS's log")
    return status
