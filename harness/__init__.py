"""SLM memory harness: allocator impact and the first-token path."""
__version__ = "0.1.0"

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout: docker/, scripts/, the wheelhouse
