"""SLM memory harness: allocator impact and the first-token path."""
__version__ = "0.1.0"
