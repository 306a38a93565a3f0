"""`sft sweep`: many runs of one base config over a search space, each trial an `sft train` in its own process."""

from sft.sweep.results import write_results
from sft.sweep.runner import Runner, execute, read_metrics, run_sweep
from sft.sweep.space import SweepFile, corners, grid, load_sweep, sample, trial_hash, trial_overrides
