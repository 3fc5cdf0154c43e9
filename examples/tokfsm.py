"""The TokFSM experiment from Python (same as `codelens fsm [--quick]`).

python examples/tokfsm.py            # full mode
python examples/tokfsm.py --quick    # small FSM, a few minutes on a CPU
"""

import sys

from codelens.experiments.tokfsm import FULL, QUICK, run_experiment, summary_line

experiment = QUICK if "--quick" in sys.argv else FULL
report = run_experiment(experiment)
print(summary_line(report))
print(f"report written to {experiment.run_dir}/report.md")
