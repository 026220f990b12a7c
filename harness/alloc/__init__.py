"""Experiment A: the same generation under glibc malloc and other allocators (LD_PRELOAD), one fresh probe
process per run, compared by the statistics of harness.measure."""
