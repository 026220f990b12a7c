"""Model specs and loading: synthetic Phi-3-family models (offline) or real `from_pretrained` loading.

This module is imported by the probe inside containers: it depends only on the standard library,
torch, transformers and tokenizers — never on the driver side of the harness.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SYNTHETIC_PREFIX = "synthetic:"

# Real architecture shapes. phi3-mini is microsoft/Phi-3-mini-4k-instruct's config.json.
PHI3_MINI = dict(
    hidden_size=3072,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=8192,
    vocab_size=32064,
    max_position_embeddings=4096,
    original_max_position_embeddings=4096,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    sliding_window=2047,
    bos_token_id=1,
    eos_token_id=32000,
    pad_token_id=32000,
    hidden_act="silu",
    tie_word_embeddings=False,
)

SYNTHETIC_SPECS: dict[str, dict[str, Any]] = {
    # Small enough for a few seconds per run on 2 CPU cores; same family and code path as phi3-mini.
    "tiny": {**PHI3_MINI, **dict(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=688, vocab_size=4096, eos_token_id=4000, pad_token_id=4000,
    )},
    "phi3-mini": dict(PHI3_MINI),
}

# The dtype a saved synthetic directory is written in (phi3-mini as published: bfloat16).
SAVED_DTYPES = {"tiny": "float32", "phi3-mini": "bfloat16"}

SPECIAL_TOKENS = {"unk": "<unk>", "bos": "<s>", "eos": "<|endoftext|>"}

# Text the offline tokenizer is trained on: small, embedded, deterministic.
_CORPUS = """Explain NUMA-aware inference in 2 short bullet points.
Memory allocators such as glibc malloc, jemalloc, tcmalloc and mimalloc differ in how they cache
freed blocks per thread, how they return memory to the operating system and how they fragment.
A small language model generates one token at a time: the first token needs a full prefill over the
prompt, every later token reuses the key and value cache. Latency of the first token matters for
interactive serving, while the time per output token sets the streaming speed users perceive.
The quick brown fox jumps over the lazy dog. Servers start, load weights, compile graphs, allocate
the KV cache and then answer requests; the first request after start-up is often slower.
"""


@dataclass(frozen=True)
class ModelSpec:
    """What `--model` names: a synthetic architecture, a local directory or a hub id."""

    name: str
    kind: str  # "synthetic" | "local" | "hub"
    synthetic_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ModelError(ValueError):
    """A model name or directory that cannot be used."""


def parse_model(name: str) -> ModelSpec:
    if name.startswith(SYNTHETIC_PREFIX):
        key = name[len(SYNTHETIC_PREFIX):]
        if key not in SYNTHETIC_SPECS:
            known = ", ".join(SYNTHETIC_PREFIX + k for k in SYNTHETIC_SPECS)
            raise ModelError(f"unknown synthetic model {name!r} (known: {known})")
        return ModelSpec(name=name, kind="synthetic", synthetic_key=key)
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ModelError(f"model directory {name!r} has no config.json")
        return ModelSpec(name=os.path.abspath(name), kind="local")
    if name.count("/") == 1 and all(part.strip() for part in name.split("/")) and not name.startswith("."):
        return ModelSpec(name=name, kind="hub")
    raise ModelError(f"unknown model {name!r}: use synthetic:tiny, synthetic:phi3-mini, a hub id "
                     "(org/name) or an existing local model directory")


def phi3_config(key: str, dtype: str = "float32"):
    from transformers import Phi3Config

    cfg = dict(SYNTHETIC_SPECS[key])
    config = Phi3Config(**cfg)
    config.architectures = ["Phi3ForCausalLM"]
    config.dtype = dtype
    return config


def build_tokenizer(vocab_size: int, eos_id: int):
    """An offline byte-level BPE tokenizer whose vocabulary is exactly `vocab_size` entries.

    Trained on the embedded corpus, then padded with plain ASCII filler tokens so that every id a
    random-weight model can emit decodes to text. The EOS token sits at `eos_id` as in Phi-3.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS["unk"], SPECIAL_TOKENS["bos"]]
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 600), special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)

    learned = json.loads(tok.to_str())
    vocab: dict[str, int] = learned["model"]["vocab"]
    merges = learned["model"]["merges"]
    filler = 0
    while len(vocab) < vocab_size:
        next_id = len(vocab)
        token = SPECIAL_TOKENS["eos"] if next_id == eos_id else f"w{filler}"
        if token in vocab:
            filler += 1
            continue
        vocab[token] = next_id
        if token != SPECIAL_TOKENS["eos"]:
            filler += 1
    learned["model"]["vocab"] = vocab
    learned["model"]["merges"] = merges
    learned["added_tokens"] = [
        {"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for t in (SPECIAL_TOKENS["unk"], SPECIAL_TOKENS["bos"], SPECIAL_TOKENS["eos"])
    ]
    full = Tokenizer.from_str(json.dumps(learned))
    return PreTrainedTokenizerFast(
        tokenizer_object=full,
        unk_token=SPECIAL_TOKENS["unk"], bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"], pad_token=SPECIAL_TOKENS["eos"],
        model_max_length=SYNTHETIC_SPECS["tiny"]["max_position_embeddings"],
    )


def synthetic_tokenizer(key: str):
    spec = SYNTHETIC_SPECS[key]
    return build_tokenizer(spec["vocab_size"], spec["eos_token_id"])


def build_synthetic_model(key: str, device: str, dtype: Any, seed: int = 0):
    """Random weights with a fixed seed: every run of every allocator computes the same thing."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = phi3_config(key, dtype=str(dtype).replace("torch.", ""))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_synthetic_model_dir(key: str, out_dir: str | os.PathLike, seed: int = 0, dtype: str | None = None,
                             weights: bool = True, device: str | None = None) -> Path:
    """Write a loadable model directory (config, tokenizer, optionally random safetensors weights).

    Used to serve synthetic models with vLLM (which may use `--load-format dummy` when weights=False)
    and by tests of the real `from_pretrained` path.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = synthetic_tokenizer(key)
    tokenizer.save_pretrained(out)
    dtype = dtype or SAVED_DTYPES[key]
    torch_dtype = getattr(torch, dtype)
    if weights:
        # Random init of billions of parameters is minutes on a CPU and seconds on a GPU.
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = build_synthetic_model(key, device, torch_dtype, seed=seed)
        model.save_pretrained(out, safe_serialization=True)
    else:
        config = phi3_config(key, dtype=dtype)
        config.save_pretrained(out)
    gen = {"bos_token_id": SYNTHETIC_SPECS[key]["bos_token_id"], "eos_token_id": SYNTHETIC_SPECS[key]["eos_token_id"],
           "pad_token_id": SYNTHETIC_SPECS[key]["pad_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    (out / "SYNTHETIC.txt").write_text(f"synthetic:{key} random weights, seed {seed}; not a trained model\n")
    return out


def load_model_and_tokenizer(spec: ModelSpec, device: str, dtype: Any, seed: int = 0):
    """Returns (model, tokenizer). Hub/local models go through the real `from_pretrained` code."""
    if spec.kind == "synthetic":
        assert spec.synthetic_key is not None
        return build_synthetic_model(spec.synthetic_key, device, dtype, seed), synthetic_tokenizer(spec.synthetic_key)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.name)
        model = AutoModelForCausalLM.from_pretrained(spec.name, dtype=dtype).to(device)
    except OSError as exc:  # hub id not reachable offline, or a broken directory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {spec.name!r}: {first}") from exc
    return model.eval(), tokenizer
