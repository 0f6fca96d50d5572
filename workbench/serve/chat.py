"""The chat template of our tokenizer: how a list of OpenAI-style messages becomes one prompt.

Every task and every prompt set asks in the same shape, ``User: <question>\nAssistant:``
(``workbench.tasks.chat_prompt``), and the model was trained on documents that start with ``<|bos|>``.
A conversation is that shape repeated, one line per turn, ending with the open ``Assistant:`` that the
model completes:

.. code-block:: text

    <|bos|>System: You answer in Roman numerals.
    User: Write 1 4.
    Assistant: <think>...</think> <answer>XIV</answer>
    User: And 1 5?
    Assistant:

``system`` messages come first (each a ``System:`` line), ``user`` and ``assistant`` messages alternate in
the order given. A conversation without a system message and with one user turn renders exactly as a task's
prompt, so the chat endpoint and the prompt-set endpoint ask the same question the same way. An earlier
turn is a shared token prefix of the next request, which is what the prefix cache reuses.
Simplifications: no tool or function roles, and content is plain text (a list of text parts is joined).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workbench.tasks.task import PROMPT_TEMPLATE

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


class ChatError(ValueError):
    """Messages that cannot be rendered; ``field`` names the message at fault (for an API's error)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def message_text(content: Any, where: str) -> str:
    """A message's content as text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ChatError(f"{where}: content must be a string or a list of text parts", where)


def render_chat(messages: Sequence[dict[str, Any]]) -> str:
    """The prompt text (without ``<|bos|>``) of a conversation that the assistant is to continue."""
    if not messages:
        raise ChatError("messages is empty; send at least one user message", "messages")
    lines: list[str] = []
    seen_turn = False
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role not in ROLES:
            raise ChatError(f"{where}.role is {role!r}; use one of {sorted(ROLES)}", f"{where}.role")
        text = message_text(m.get("content", ""), f"{where}.content").strip()
        if role == "system":
            if seen_turn:
                raise ChatError(f"{where}: a system message must come before the conversation", f"{where}.role")
            lines.append(f"System: {text}")
            continue
        seen_turn = True
        lines.append(f"{ROLES[role]}: {text}")
    if messages[-1].get("role") != "user":
        raise ChatError(
            "the last message must be the user's (the assistant answers it)", f"messages[{len(messages) - 1}]"
        )
    # the last user turn takes the tasks' exact shape, so a one-question chat is a task's prompt
    last = lines.pop()[len("User: ") :]
    return "\n".join([*lines, PROMPT_TEMPLATE.format(question=last)])


__all__ = ["ChatError", "ROLES", "message_text", "render_chat"]
