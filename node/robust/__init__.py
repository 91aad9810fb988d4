"""Byzantine robustness of the reduce (docs/algorithms.md §11): per-sender bounds (bounds.py), robust combinations
(combine.py), the round's pipeline (pipeline.py), its accountability report (report.py) and the replicated state they
keep between rounds (state.py). Configured by a recipe's ``reduce`` (node/config.py, ``ReduceConfig``); off by
default, when none of it runs."""
