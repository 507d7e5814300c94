"""Chat data: conversations rendered through the tokenizer's own chat template.

Training text equals inference text because it is made by the same template.
The loss covers assistant turns only. Their character spans are found without
``{% generation %}`` markers, by rendering prefixes of the conversation::

    before = render(messages[:i], add_generation_prompt=True)   # ...<|im_start|>assistant\\n
    upto   = render(messages[:i + 1])                           # ... + content<|im_end|>\\n
    span   = [len(before), len(upto) - trailing whitespace)      # content<|im_end|>

This holds for any template whose rendering of a conversation starts with
its rendering of every prefix (ChatML, Llama, Mistral, Gemma, Zephyr...). When a
template is not prefix-stable, the assistant's content is searched for in the
full text instead; when it cannot be found either, the row is an error (never
a fallback to training on everything).
"""

from __future__ import annotations

from typing import Any, Mapping

ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    """A conversation that cannot be read or whose assistant turns cannot be located."""


def to_messages(value: Any, roles: Mapping[str, str]) -> list[dict[str, str]]:
    """ShareGPT (``from``/``value``) or OpenAI (``role``/``content``) turns -> ``[{role, content}]``."""
    if not isinstance(value, list) or not value:
        raise ChatError(f"expected a non-empty list of turns, got {type(value).__name__}")
    out = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise ChatError(f"turn {i} is {type(turn).__name__}, not an object")
        if "from" in turn and "value" in turn:
            speaker, content = turn["from"], turn["value"]
        elif "role" in turn and "content" in turn:
            speaker, content = turn["role"], turn["content"]
        else:
            raise ChatError(f"turn {i} has neither `from`/`value` nor `role`/`content` (keys: {', '.join(turn)})")
        role = roles.get(speaker)
        if role is None:
            raise ChatError(f"turn {i}: speaker '{speaker}' is not in `roles` ({', '.join(sorted(roles))})")
        if not isinstance(content, str):
            raise ChatError(f"turn {i}: content is {type(content).__name__}, not text")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatError("the conversation has no assistant turn: nothing to train on")
    return out


def render(template: str, messages: list[dict], special: dict[str, str], add_generation_prompt: bool = False) -> str:
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt, **special
        )
    except jinja2.TemplateSyntaxError as exc:  # TemplateAssertionError (an unknown filter...) too
        raise ChatError(f"the tokenizer's chat template does not compile: {type(exc).__name__}: {exc.message} "
                        f"(its line {exc.lineno})") from None
    except jinja2.TemplateError as exc:  # `raise_exception(...)` in the template, an undefined name
        raise ChatError(f"the tokenizer's chat template failed: {type(exc).__name__}: {exc}") from None
    return rendered[0]


def assistant_spans(template: str, messages: list[dict], special: dict[str, str],
                    trained: list[bool]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans of the assistant turns marked in ``trained``.

    ``trained[i]`` says whether message ``i`` (an assistant turn) carries loss.
    """
    text = render(template, messages, special)
    spans = []
    search_from = 0
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        span = _by_prefix(template, messages, special, i, text)
        if span is None:
            at = text.find(msg["content"], search_from) if msg["content"] else -1
            if at < 0:
                raise ChatError(
                    f"assistant turn {i} cannot be located in the text the chat template renders "
                    "(the template is not prefix-stable and does not show the content verbatim)"
                )
            span = (at, at + len(msg["content"]))
        search_from = span[1]
        if trained[i]:
            spans.append(span)
    if not spans:
        raise ChatError("no assistant turn to train on")
    return text, spans


def _by_prefix(template, messages, special, i, text) -> tuple[int, int] | None:
    before = render(template, messages[:i], special, add_generation_prompt=True)
    upto = render(template, messages[: i + 1], special)
    if not (upto.startswith(before) and text.startswith(upto)):
        return None
    end = len(upto.rstrip())
    if end <= len(before):
        return None
    return len(before), end
