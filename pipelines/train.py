"""Fine-tune a model from a run config: data -> model -> tokens -> LoRA SFT -> evaluate -> export.

    python pipelines/train.py configs/tiny.yaml
    python pipelines/train.py configs/qwen2_5_0_5b/lora.yaml data.train=my.jsonl train.learning_rate=1e-4
    accelerate launch --num_processes 8 pipelines/train.py configs/qwen2_5_0_5b/lora.yaml

The stages are the functions composed in `sft.pipeline.train_run`; this script is the same as `sft train`.
"""

import sys

from sft.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
