"""Tiny Hugging Face checkpoints' tokenizer files, built offline: a byte-level BPE trained in the test."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>"]

# SmolLM2-Instruct's template, as its tokenizer_config.json spells it (Jinja sees the "\n" escapes).
SMOLLM2_TEMPLATE = (
    r"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    r"{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    r"trained by Hugging Face<|im_end|>\n' }}"
    r"{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    r"{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The chat template published with Mixtral-8x7B-Instruct-v0.1 (it refuses system messages).
MIXTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

CORPUS = [
    "Hello there! How are you today? I am a helpful assistant, trained to answer questions.",
    "system user assistant Write a story about a cat. Once upon a time, there was a dog.",
    "日本語のテキスト、中文文本，한국어 텍스트 😀🍕🎉 Привет мир",
    "def f(x):\n    return x + 1\n\n[INST] instructions [/INST]",
]


def train_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 10, trainer)
    return tokenizer


def save_checkpoint_tokenizer(tokenizer: Tokenizer, out: Path, template: str, **special: str) -> Path:
    """Save like transformers 5 does (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special)
    fast.chat_template = template
    fast.save_pretrained(out)
    return out


def move_template_into_config(directory: Path) -> Path:
    """Older checkpoints keep the template in tokenizer_config.json."""
    template_file = directory / "chat_template.jinja"
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = template_file.read_text()
    config_file.write_text(json.dumps(config))
    template_file.unlink()
    return directory
