"""`python -m harness.serve ...` runs the serve command on its own (before cli.py registers it)."""

from harness.serve.command import serve

serve()
