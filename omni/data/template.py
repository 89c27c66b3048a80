"""The one chat template: supervised fine-tuning, the reward model, PPO and the chat loop all lay text out
this way, so a model sees at inference exactly the layout it was trained on:

    User: {message}\n
    Assistant: {reply}<EOS>\n

A single-turn example {"prompt", "response"} is the dialogue [(prompt, response)]; the reward model and PPO
read a response at its EOS, the last token of `prompt_ids(prompt) + response_ids(response)`.
"""
from __future__ import annotations

from typing import Sequence

USER, ASSISTANT = "User: ", "Assistant: "
ROLES = ("user", "assistant")


def encode_dialogue(tokenizer, turns: Sequence[tuple[str, str]], next_user: str | None = None
                    ) -> tuple[list[int], list[int]]:
    """Token ids of a dialogue and a mask that is 1 on the assistant's tokens (its replies and their EOS:
    what SFT trains on). `turns` are (user message, assistant reply) pairs; with `next_user`, the ids end
    with that message and the assistant's cue, ready for generation."""
    ids, mask = [], []

    def add(text_ids: list[int], trained: bool) -> None:
        ids.extend(text_ids)
        mask.extend([int(trained)] * len(text_ids))

    for user, reply in turns:
        add(tokenizer.encode(f"{USER}{user}\n{ASSISTANT}"), False)
        add(response_ids(tokenizer, reply), True)
        add(tokenizer.encode("\n"), False)
    if next_user is not None:
        add(tokenizer.encode(f"{USER}{next_user}\n{ASSISTANT}"), False)
    return ids, mask


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A single-turn prompt followed by the assistant's cue: what generation continues."""
    return encode_dialogue(tokenizer, [], prompt)[0]


def response_ids(tokenizer, response: str) -> list[int]:
    """A reply as the model emits it: its tokens, then EOS."""
    return tokenizer.encode(response) + [tokenizer.eos_id]


def messages_to_turns(messages: Sequence[dict]) -> list[tuple[str, str]]:
    """[{"role": "user"|"assistant", "content": str}, ...] alternating from a user message and ending with the
    assistant's -> (user, assistant) pairs. Raises ValueError naming the first message that breaks that."""
    if not messages or len(messages) % 2:
        raise ValueError(f"expected user/assistant message pairs, got {len(messages)} messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise ValueError(f"message {i} is not {{'role': ..., 'content': str}}")
        if msg.get("role") != ROLES[i % 2]:
            raise ValueError(f"message {i} has role {msg.get('role')!r}, expected {ROLES[i % 2]!r}")
    return [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages), 2)]
