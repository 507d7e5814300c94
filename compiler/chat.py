"""Chat data: conversations rendered through the tokenizer's own chat template.

Training text equals inference text because it is made by the same template.
The loss covers assistant turns only: each one's text and the end-of-turn
token the template writes right after it (and the spaces it writes right before
it, which a BPE token usually shares with the first word). Templates are free to reshape a
conversation (fold the system prompt into a user turn, give only the final
reply a reasoning block, append a trailer), so turns are never located by
rendering prefixes or by searching for the reply's text (a user saying
"Please say hello" holds the reply "hello" too). Instead the conversation is
rendered a second time with a marker in place of every assistant text::

    real    <|im_start|>user\\nPlease say hello<|im_end|>\\n<|im_start|>assistant\\nhello<|im_end|>\\n
    marked  <|im_start|>user\\nPlease say hello<|im_end|>\\n<|im_start|>assistant\\n\\ue000tunec-0-1\\ue001<|im_end|>\\n
    span                                                                         ^^^^^^^^^^^^^^^

The text around the markers must equal the real rendering exactly (a template
that changes the rest of the conversation with the replies' text cannot be
located, and is an error naming the turn). A template with ``{% generation %}``
blocks says itself what is trained, and its blocks are used as they are.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any, Mapping

ROLES = ("system", "user", "assistant")
# Private-use characters: no template writes them and `trim` keeps them.
_MARK = "\ue000tunec-{}\ue001"
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SPACES = " \t"  # what may sit between a reply and its end-of-turn token (Llama 2 writes "text </s>")


class ChatError(ValueError):
    """A conversation that cannot be read or whose assistant turns cannot be located."""


def to_messages(value: Any, roles: Mapping[str, str], reply: bool = True) -> list[dict[str, str]]:
    """ShareGPT (``from``/``value``) or OpenAI (``role``/``content``) turns -> ``[{role, content}]``.

    ``reply``: the conversation must hold an assistant turn (training data); without it, a
    conversation to continue (``tunec generate``) must end with a user turn instead.
    """
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
    if reply and not any(m["role"] == "assistant" for m in out):
        raise ChatError("the conversation has no assistant turn: nothing to train on")
    if not reply and out[-1]["role"] != "user":
        raise ChatError(f"the conversation ends with the {out[-1]['role']}'s turn; end it with a user turn, "
                        "which the model answers")
    return out


def with_system(system: str | None, messages: list[dict]) -> list[dict]:
    """The task's system prompt (when it has one) as the first turn: training and ``tunec generate`` both call this."""
    return ([{"role": "system", "content": system}] if system is not None else []) + messages


def exchange(system: str | None, shots: list[tuple[str, str]], prompt: str) -> list[dict]:
    """A template task's conversation up to its reply: the system prompt, each few-shot exemplar as
    an exchange, then the prompt as the user's turn (texts stripped, as the model sees them)."""
    messages = []
    for p, c in shots:
        messages += [{"role": "user", "content": p.strip()}, {"role": "assistant", "content": c.strip()}]
    return with_system(system, messages + [{"role": "user", "content": prompt.strip()}])


def render(template: str, messages: list[dict], special: Mapping[str, str], add_generation_prompt: bool = False,
           generation: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The template's text for ``messages``, and its ``{% generation %}`` blocks' character spans
    (when ``generation`` is asked for)."""
    import jinja2
    from transformers.utils.chat_template_utils import render_jinja_template

    options: dict[str, Any] = dict(special)  # bos_token, eos_token...: names the templates read
    try:
        # (text per conversation, generation blocks per conversation); annotated as a str upstream
        result: Any = render_jinja_template(
            conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=generation, **options,
        )
    except jinja2.TemplateSyntaxError as exc:  # TemplateAssertionError (an unknown filter...) too
        raise ChatError(f"the tokenizer's chat template does not compile: {type(exc).__name__}: {exc.message} "
                        f"(its line {exc.lineno})") from None
    except jinja2.TemplateError as exc:  # `raise_exception(...)` in the template, an undefined name
        raise ChatError(f"the tokenizer's chat template failed: {type(exc).__name__}: {exc}") from None
    rendered, blocks = result
    return rendered[0], [(int(s), int(e)) for s, e in blocks[0]] if generation else []


@functools.lru_cache(maxsize=8)
def end_tokens(tokenizer_json: str, special: tuple[tuple[str, str], ...] = ()) -> tuple[str, ...]:
    """Texts of the tokenizer's special tokens, longest first: the end-of-turn token after a reply is one."""
    added = json.loads(tokenizer_json).get("added_tokens") or []
    texts = {t["content"] for t in added if t.get("special") and t.get("content")}
    texts |= {v for _, v in special if v}
    return tuple(sorted(texts, key=lambda t: (-len(t), t)))


def assistant_spans(template: str, messages: list[dict], special: Mapping[str, str], trained: list[bool],
                    end: tuple[str, ...] = ()) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans of the assistant turns marked in ``trained``.

    ``trained[i]`` says whether message ``i`` (an assistant turn) carries loss;
    ``end`` holds the tokenizer's special token texts (:func:`end_tokens`).
    A span is the reply's text and the end-of-turn token after it (or the
    template's ``{% generation %}`` block). Turns are counted as a reader
    counts them: the first assistant reply is "assistant turn 1".
    """
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for k, i in enumerate(replies, 1):
        if not messages[i]["content"].strip():
            raise ChatError(f"assistant turn {k} is empty: nothing to train on (drop the turn or the row)")
    if _GENERATION.search(template):
        text, located = _by_generation_blocks(template, messages, special, replies)
    else:
        text, located = _by_markers(template, messages, special, replies, end)
    spans = [span for i, span in zip(replies, located) if trained[i]]
    if not spans:
        raise ChatError("no assistant turn to train on")
    return text, spans


def prompt_before_reply(template: str, messages: list[dict], special: Mapping[str, str]) -> tuple[str, str]:
    """``(prompt, space)``: the text a model sees before the reply to ``messages`` (which end with a
    user turn), exactly as training rendered it with the reply in place, and the spaces the template
    puts before the reply (kept apart: a BPE tokenizer merges them with the reply's first word,
    so the model was trained to write them itself, like a completion's leading space).

    Templates that render the final reply differently (an empty reasoning block
    before it) are honoured, as the generation prompt alone would not be.
    """
    mark = _free_mark(messages, 0)
    marked, _ = render(template, messages + [{"role": "assistant", "content": mark}], special)
    if marked.count(mark) != 1:
        raise ChatError("the chat template does not show the assistant's reply verbatim: "
                        "the prompt before it cannot be rendered")
    prompt = marked[: marked.index(mark)]
    kept = prompt.rstrip(_SPACES)
    return kept, prompt[len(kept):]


def _free_mark(messages: list[dict], k: int) -> str:
    seen = "".join(m["content"] for m in messages)
    n = 0
    while _MARK.format(f"{n}-{k}") in seen:  # a conversation that holds a mark already
        n += 1
    return _MARK.format(f"{n}-{k}")


def _by_markers(template, messages, special, replies, end) -> tuple[str, list[tuple[int, int]]]:
    text, _ = render(template, messages, special)
    marks = {i: _free_mark(messages, k) for k, i in enumerate(replies, 1)}
    marked, _ = render(template, [dict(m, content=marks[i]) if i in marks else m for i, m in enumerate(messages)],
                       special)
    # Split the marked text into literal pieces around the marks, in order.
    pieces, rest = [], marked
    for k, i in enumerate(replies, 1):
        if rest.count(marks[i]) != 1:
            raise ChatError(f"assistant turn {k} cannot be located: the chat template does not show its text "
                            "verbatim, once (it changes or drops the text of some replies)")
        before, rest = rest.split(marks[i])
        pieces.append(before)
    pieces.append(rest)
    spans, pos = [], 0
    for k, i in enumerate(replies, 1):
        if not text.startswith(pieces[k - 1], pos):
            raise ChatError(f"assistant turn {k} cannot be located: the chat template renders the conversation "
                            "differently when the replies' text changes, so no span is exact")
        pos += len(pieces[k - 1])
        content, after, last = messages[i]["content"], pieces[k], k == len(replies)
        # The template may trim the text (Gemma, Llama 3 do): accept the variant that the real text holds.
        for shown in dict.fromkeys([content, content.strip(), content.lstrip(), content.rstrip()]):
            tail = pos + len(shown)
            if text.startswith(shown, pos) and (text[tail:] == after if last else text.startswith(after, tail)):
                break
        else:
            raise ChatError(f"assistant turn {k} cannot be located: the chat template changes its text")
        # Spaces the template writes before the reply are the reply's: generation starts before them
        # (see prompt_before_reply), so the model must learn to write them.
        start = len(text[:pos].rstrip(_SPACES))
        spans.append((start, _end_of_turn(text, tail, end, k)))
        pos = tail
    return text, spans


def _end_of_turn(text: str, at: int, end: tuple[str, ...], k: int) -> int:
    """Where the end-of-turn token after a reply (ending at ``at``) ends."""
    j = at
    while j < len(text) and text[j] in _SPACES:
        j += 1
    for token in end:
        if text.startswith(token, j):
            return j + len(token)
    raise ChatError(f"assistant turn {k}: the chat template writes no end-of-turn token after it "
                    f"(it continues {text[at:at + 20]!r}), so the model would never learn to stop; "
                    "use a template that ends replies with a special token")


def _by_generation_blocks(template, messages, special, replies) -> tuple[str, list[tuple[int, int]]]:
    text, blocks = render(template, messages, special, generation=True)
    if len(blocks) != len(replies):
        raise ChatError(f"the chat template's {{% generation %}} blocks ({len(blocks)}) do not match the "
                        f"conversation's assistant turns ({len(replies)})")
    for k, (i, (s, e)) in enumerate(zip(replies, blocks), 1):
        if messages[i]["content"].strip() not in text[s:e]:
            raise ChatError(f"assistant turn {k} cannot be located: the chat template's {{% generation %}} "
                            "block does not hold its text")
    return text, [(s, e) for s, e in blocks]
