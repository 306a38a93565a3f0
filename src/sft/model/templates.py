"""Chat templates by name, for base models whose tokenizer has none, and the special tokens each one writes."""

# ChatML, the template Qwen2.5 and many others use; the answer ends with <|im_end|>, the end-of-turn token.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Named templates for models whose tokenizer has none (base models): the template and the special tokens it writes.
NAMED_TEMPLATES = {"chatml": (CHATML_TEMPLATE, ["<|im_start|>", "<|im_end|>"])}
TEMPLATE_TOKENS = {token for _, tokens in NAMED_TEMPLATES.values() for token in tokens}
