"""The demo model's chat format: ChatML, as a Jinja template and as the same rule in Python.

    <|im_start|>{role}\\n{content}<|im_end|>\\n      (one block per message)
    <|im_start|>assistant\\n                         (generation prompt)

The Python renderer is what the corpus and the trainer use; `tests/demo/test_demo.py` checks that
`tokenizer.apply_chat_template` gives exactly the same text.
"""

from __future__ import annotations

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
# Order fixes the ids: <|endoftext|> = 0, <|im_start|> = 1, <|im_end|> = 2, <|pad|> = 3.
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

Message = dict[str, str]


def render_message(message: Message) -> str:
    return f"{IM_START}{message['role']}\n{message['content']}{IM_END}\n"


def render_chat(messages: list[Message], add_generation_prompt: bool = False) -> str:
    """Same text as `CHAT_TEMPLATE` renders."""
    text = "".join(render_message(m) for m in messages)
    return text + f"{IM_START}assistant\n" if add_generation_prompt else text


def assistant_spans(messages: list[Message]) -> list[tuple[int, int]]:
    """Character spans [start, end) of each assistant reply in `render_chat(messages)`.

    A span covers the content and the closing `<|im_end|>` (what the model must generate),
    not the `<|im_start|>assistant\\n` header (part of the prompt).
    """
    spans, pos = [], 0
    for m in messages:
        block = render_message(m)
        if m["role"] == "assistant":
            start = pos + len(IM_START) + len(m["role"]) + 1
            spans.append((start, start + len(m["content"]) + len(IM_END)))
        pos += len(block)
    return spans
