"""``tunec generate``: try a trained stage on a prompt rendered the way its training data was.

The prompt is raw text (``--prompt``), the prompt of one of the task's templates
rendered from ``--set column=value`` pairs with the very Jinja text the compiler
used (the plan carries it) in the same sandbox, or, for a chat task, a
conversation (``--messages FILE.json``, ``--message ROLE=TEXT``). A task
trained in chat format (or any prompt with ``--chat``) is built into a
conversation by the compiler's own functions (system prompt, user turn) and
rendered by the chat template up to where the reply starts, exactly as
training rendered it with the reply in place; the text is tokenized by the
compiler's encoder. The ids are those of the compiled document up to its
first trained token. The model continues them::

    $ tunec generate build/demo --task plurals --template spell_plural --set word=plamposh
    What is the plural of "plamposh"?« plamposhes»
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch

from tunec.compiler.chat import ROLES, ChatError, exchange, prompt_before_reply, to_messages, with_system
from tunec.compiler.errors import TunecError, did_you_mean
from tunec.compiler.plan import Plan, read_plan
from tunec.compiler.recipe import DEFAULT_ROLES
from tunec.compiler.sandbox import OutOfTime, RenderLimit
from tunec.compiler.templates import Renderer, RenderError, TemplateSource, make_env, render_string
from tunec.compiler.tokens import encode_texts, tokenizer_info
from tunec.compiler.units import DataError, template_context

from . import outputs
from .model import pick_device


@dataclass(frozen=True)
class Generation:
    prompt: str
    completion: str


def render_prompt(plan: Plan, task: str, template: str | None, values: dict[str, str]) -> str:
    """The prompt of ``task``'s template ``template`` (default: its first) on ``values``: the
    ``prompt`` block, or what comes before ``|||`` in a promptsource template."""
    if task not in plan.tasks:
        raise TunecError(f"no task '{task}' in the plan{did_you_mean(task, plan.tasks)}")
    templates = plan.tasks[task].templates
    if not templates:
        raise TunecError(f"task `{task}` reads its conversations from a column; give one with --messages FILE.json "
                         "or --message ROLE=TEXT (repeated)")
    names = [t.name for t in templates]
    if template is None:
        chosen = templates[0]
    else:
        found = next((t for t in templates if t.name == template), None)
        if found is None:
            raise TunecError(f"task `{task}` has no template '{template}'{did_you_mean(template, names)}; "
                             f"templates: {', '.join(names)}")
        chosen = found
    columns = plan.tasks[task].columns
    if columns:  # none recorded: any value goes to the template
        for name in sorted(set(values) - set(columns)):
            raise TunecError(f"--set {name}: task `{task}` has no column `{name}`{did_you_mean(name, columns)}; "
                             f"columns: {', '.join(columns)}")
    index = templates.index(chosen)
    # The very context compilation gives a row (the columns, plus the task's answer
    # choices), so the prompt is the one the model was trained on.
    try:
        renderer = Renderer([TemplateSource(t.name, t.source, f"plan.json: task `{task}`", kind=t.kind,
                                            answer_choices=t.answer_choices, separator=t.separator)
                             for t in templates])
        context, _ = template_context(plan.tasks[task].answer_choices, None, renderer, index, dict(values), seed=0)
        if chosen.kind != "promptsource":
            return renderer.render_prompt(index, context)
        # A promptsource template is one text: rendered whole, as compiled (its target's columns too).
        pair = renderer.render(index, context, seed=0)
        if pair is None:
            raise TunecError(f"template '{chosen.name}' of task `{task}` renders no target for these values "
                             "(it does not apply to them)")
        return pair[0]
    except RenderError as exc:
        if exc.message.startswith("UndefinedError: "):
            hint = f" (columns: {', '.join(columns)})" if columns else ""
            raise TunecError(f"template '{chosen.name}' of task `{task}`: {exc.message.split(': ', 1)[1]}; "
                             f"give it with --set NAME=VALUE{hint}") from None
        raise TunecError(f"template '{chosen.name}' of task `{task}`: {exc.message}") from None
    except DataError as exc:  # answer choices from a column, which --set cannot give as a list
        raise TunecError(f"task `{task}`: {exc}; give the prompt with --prompt") from None


@dataclass(frozen=True)
class Asked:
    """What the model is asked: a prompt's text (completion format), or a conversation that ends
    with the user's turn (chat), which the chat template renders as training rendered it."""

    text: str | None = None
    messages: list[dict] | None = None


def build_prompt(plan: Plan, stage: str, prompt: str | None = None, task: str | None = None,
                 template: str | None = None, values: dict[str, str] | None = None,
                 conversation: list[dict] | None = None, chat: bool = False) -> Asked:
    """What to ask the model, built by the compiler's own functions from ``--prompt`` (raw text,
    a user turn for a chat task or with ``chat``), ``--set`` values (the task's template) or a
    ``conversation`` (a chat task's turns); a chat task's system prompt comes first, as in training,
    rendered from ``--set`` values (with ``--prompt`` or a conversation, those only)."""
    values = values or {}
    given = [name for name, v in (("--prompt", prompt), ("--messages/--message", conversation)) if v is not None]
    if len(given) > 1 or (given and template):
        raise TunecError("give one of --prompt TEXT, --messages FILE / --message ROLE=TEXT, or --set COLUMN=VALUE "
                         "(with --template)")
    if not given and not values:
        raise TunecError("nothing to generate from: give --prompt TEXT, or --set COLUMN=VALUE to fill a "
                         "task's template (a chat task's conversation: --messages FILE.json or --message ROLE=TEXT)")
    tasks = plan.stage(stage).settings.tasks
    if task is not None and task not in plan.tasks:
        raise TunecError(f"no task '{task}' in the plan{did_you_mean(task, plan.tasks)}")
    if task is None and (chat or conversation is not None):  # the stage's chat task gives the system prompt
        task = next((t for t in tasks if plan.tasks[t].format == "chat"), None)
        if task is None and conversation is not None:
            raise TunecError(f"stage '{stage}' trains no chat task: a conversation needs one; give --prompt")
    task = task or tasks[0]
    info = plan.tasks[task]
    if conversation is not None:
        if info.format != "chat":
            raise TunecError(f"--messages/--message: task `{task}` is not a chat task; give --prompt or --set")
        try:
            turns = to_messages(conversation, {**DEFAULT_ROLES, **{r: r for r in ROLES}}, reply=False)
        except ChatError as exc:
            raise TunecError(f"--messages/--message: {exc}") from None
        return Asked(messages=with_system(_system(info, task, values), turns))
    if prompt is not None and values and info.format != "chat":  # a chat task's system prompt may read them
        raise TunecError("give either --prompt TEXT or --set COLUMN=VALUE (with --task/--template), not both")
    text = prompt if prompt is not None else render_prompt(plan, task, template, values)
    if info.format != "chat" and not chat:
        return Asked(text=text)
    system = _system(info, task, values) if info.format == "chat" else None
    return Asked(messages=exchange(system, [], text))  # as compiled: no exemplars at inference


def _system(info, task: str, values: dict[str, str]) -> str | None:
    if not info.system:
        return None
    try:
        return render_string(make_env().from_string(info.system), dict(values))  # bounded, as compiled
    except (jinja2.TemplateError, RenderLimit, OutOfTime) as exc:
        raise TunecError(f"system prompt of task `{task}`: {exc}; give its columns with --set") from None


def prompt_ids(asked: Asked, tokenizer) -> tuple[str, list[int]]:
    """The prompt's text and token ids, made as the compiler made its documents: a chat conversation
    rendered up to where the reply starts (``prompt_before_reply``), tokenized by the compiler's
    encoder (special tokens as compiled, the template's own for chat)."""
    info = tokenizer_info(tokenizer)
    if asked.messages is None:
        assert asked.text is not None
        text, add_special = asked.text, True
    else:
        if not info.chat_template:
            raise TunecError("--chat: the build's tokenizer has no chat template")
        try:
            text, _ = prompt_before_reply(info.chat_template, asked.messages, dict(info.special_tokens))
        except ChatError as exc:
            raise TunecError(f"chat: {exc}") from None
        add_special = False
    (enc,) = encode_texts(tokenizer.backend_tokenizer, info, [text], [[]], add_special=add_special, append_eos=False)
    return text, enc.ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token the chat template puts right after an assistant's text (``<|im_end|>``, EOS...).

    Found by rendering a one-exchange conversation: generation stops there, as
    the model learned to end its turns.
    """
    marker = "tunec-end-of-turn-probe"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    after = text[text.index(marker) + len(marker):] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    return ids[:1]


def generate(out: str | Path, stage: str | None = None, prompt: str | None = None, task: str | None = None,
             template: str | None = None, values: dict[str, str] | None = None, chat: bool = False,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             device: str = "auto", conversation: list[dict] | None = None) -> Generation:
    from transformers import AutoTokenizer

    out = Path(out)
    plan = read_plan(out)
    stage = stage or plan.stages[-1].name
    plan.stage(stage)  # a known stage, or a located error
    asked = build_prompt(plan, stage, prompt, task, template, values or {}, conversation, chat)
    tokenizer = AutoTokenizer.from_pretrained(str(out / plan.tokenizer.path), local_files_only=True)
    text, prompt_tokens = prompt_ids(asked, tokenizer)
    stop = [plan.tokenizer.eos_id] + (end_of_turn_ids(tokenizer) if asked.messages is not None else [])
    dev = pick_device(device)
    model = outputs.load_for_inference(out, stage).to(dev).eval()
    ids = torch.tensor([prompt_tokens], device=dev)
    torch.manual_seed(seed)
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0
                else {"do_sample": False})
    with torch.no_grad():
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             eos_token_id=stop, pad_token_id=plan.tokenizer.pad_id, **sampling)
    completion: str = tokenizer.decode(new[0, ids.shape[1]:].tolist(),  # type: ignore[assignment]  # one sequence
                                       skip_special_tokens=True)
    return Generation(text, completion)
