"""An OpenAI-compatible stand-in that starts slowly and says nothing while it works, as vLLM does:
`python tests/slow_start_server.py PORT`. Its silent stretches are two named functions, so a stack
sampler must find them by name. It logs vLLM-style lines with process tags around them."""

from __future__ import annotations

import runpy
import sys
import time
from pathlib import Path


def build_the_import_graph() -> None:
    deadline = time.time() + 3.0
    while time.time() < deadline:  # busy, like an import compiling sources
        sum(range(10_000))


def compile_the_kernels() -> None:
    time.sleep(2.5)


print("(APIServer pid=1) INFO [api_utils.py] non-default args: {}", flush=True)
build_the_import_graph()
print("(EngineCore pid=2) INFO [core.py] Initializing a V1 LLM engine (v0.0.0)", flush=True)
print("(EngineCore pid=2) INFO [gpu_model_runner.py] Starting to load model fake...", flush=True)
compile_the_kernels()
print("(EngineCore pid=2) INFO [gpu_model_runner.py] Model loading took 7.12 GiB memory and 2.5 seconds", flush=True)
print("INFO:     Application startup complete.", flush=True)
sys.argv = ["fake_openai_server.py", sys.argv[1]]
runpy.run_path(str(Path(__file__).with_name("fake_openai_server.py")), run_name="__main__")
