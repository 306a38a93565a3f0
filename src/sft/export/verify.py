"""Load an export in this (fresh) process and record its logits and greedy generations, for the export check.

    python -m sft.export.verify EXPORT_FOLDER WORK_FOLDER

WORK_FOLDER/inputs.json holds `ids` (probe token ids) and `prompts` (token ids to continue greedily); this writes
WORK_FOLDER/logits.safetensors and WORK_FOLDER/generated.json. `sft.export` runs it in a subprocess, so nothing of
the training process (its in-memory model, patched modules, cached state) can make a broken export look right.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def main(folder: str, work: str) -> None:
    from sft.evaluate import generate
    from sft.export.write import logits_of
    from sft.generate import load_for_inference

    model, tokenizer, stop = load_for_inference(Path(folder))
    inputs = json.loads((Path(work) / "inputs.json").read_text())
    save_file({"logits": logits_of(model, torch.tensor(inputs["ids"]))}, str(Path(work) / "logits.safetensors"))
    texts = generate(model, tokenizer, inputs["prompts"], 16, 1, stop) if inputs["prompts"] else []
    (Path(work) / "generated.json").write_text(json.dumps(texts))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
