"""An independent check of trl_vs_sft.py's (x): plain TRL as an expert writes it, nothing from sft or common.

    python benchmarks/plain_trl.py [--fp32|--bf16] [--bf16-weights]   # one run; prints real tokens/s, held-out loss

The harness's model (random Llama d=512, 8 layers, seed 0), data (alpaca_en_demo through Qwen2.5's template, ids
folded into 32k, shuffled with seed 0: 32 held-out rows, then 64 train rows) and settings (one epoch, lr 2e-4, 2
packed rows of <= 768 per step, no checkpointing, LoRA r=16 all-linear), written from scratch. Precision as an
expert picks it: bf16 autocast where the CPU has bf16 matmul kernels (AMX, AVX512-BF16), else fp32.
"""

import json
import os
import random
import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import SFTConfig, SFTTrainer

fixtures = Path(os.environ.get("SFT_SHARED_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
qwen = AutoTokenizer.from_pretrained(fixtures / "tokenizers/qwen2_5")
rows = []
for r in json.loads((fixtures / "datasets/llamafactory/alpaca_en_demo.json").read_text()):
    user = [{"role": "user", "content": (r["instruction"] + "\n" + r["input"]).strip()}]
    prompt = qwen.apply_chat_template(user, tokenize=True, add_generation_prompt=True)["input_ids"]
    full = qwen.apply_chat_template(user + [{"role": "assistant", "content": r["output"]}], tokenize=True)["input_ids"]
    full = full[:-1] if qwen.decode(full[-1:]) == "\n" else full  # the newline after <|im_end|> is not trained
    ids = [2 + i % 31998 for i in full]
    rows.append({"input_ids": ids, "labels": [-100] * len(prompt) + ids[len(prompt) :]})
random.Random(0).shuffle(rows)
held_out, train = rows[:32], rows[32:96]

shape = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8}
special = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None}
config = LlamaConfig(vocab_size=32000, num_key_value_heads=8, max_position_embeddings=8192, **shape, **special,
                     tie_word_embeddings=False, use_cache=False)  # fmt: skip
config._attn_implementation = "sdpa"
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.bfloat16 if "--bf16-weights" in sys.argv else torch.float32)
vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, 32000)}}
tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                    pad_token="<pad>", eos_token="<eos>")  # fmt: skip

ends, tokens = [], []
clock = type("Clock", (TrainerCallback,), {"on_step_end": lambda self, *a, **k: ends.append(time.perf_counter())})
bf16 = "--bf16" in sys.argv or ("--fp32" not in sys.argv and torch.ops.mkldnn._is_mkldnn_bf16_supported())
args = SFTConfig("/tmp/plain_trl", max_length=768, packing=True, bf16=bf16, use_cpu=True,
                 activation_checkpointing=False, per_device_train_batch_size=2, num_train_epochs=1, learning_rate=2e-4,
                 seed=0, logging_steps=1000, save_strategy="no", report_to="none")  # fmt: skip
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
torch.manual_seed(0)  # the LoRA init draws from it
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train), processing_class=tokenizer,
                     peft_config=lora, callbacks=[clock()])  # fmt: skip
step = trainer.training_step  # padding-free: every position of the flattened batch is a real token


def counted(model, inputs, *args, **kwargs):
    tokens.append(inputs["input_ids"].numel())
    return step(model, inputs, *args, **kwargs)


trainer.training_step = counted
trainer.train()

trainer.model.eval()
with torch.no_grad():  # mean loss per trained token, each held-out row alone
    losses = [(trainer.model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss.item(),
               sum(x != -100 for x in r["labels"][1:])) for r in held_out]  # fmt: skip
loss = sum(a * n for a, n in losses) / sum(n for _, n in losses)
speed = sum(tokens[2:]) / (ends[-1] - ends[1])  # after 2 warm-up steps, as the harness
print(json.dumps({"real_tokens_per_s": speed, "steps": len(ends), "real_tokens": sum(tokens), "heldout_loss": loss,
                  "bf16": bf16}))  # fmt: skip
