"""Shared measurement: statistics, the results directory and its records, the environment, allocator
libraries, the stopping rule, signals. Neither experiment owns it; both use it."""
