"""The parts of benchmarks/upgrade_under_load.py: `processes` (what it starts, always stopped), `source` (the code
under measurement), `systems` (supervise and the baselines it is compared with), `samples` and `measurement` (a
run under load, split by window), `rollbacks`, `fds` and `wrk` (the other measurements), `report` and `targets`."""
