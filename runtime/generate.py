"""``tunec generate``: try a trained stage on a prompt rendered the way its training data was.

The prompt is either raw text (``--prompt``) or the ``prompt`` block of one of
the task's templates rendered from ``--set column=value`` pairs, with the very
Jinja text the compiler used (the plan carries it) in the same sandbox. It is
tokenized the way the compiler tokenized documents (the tokenizer's own special
tokens, nothing added) and, for a task trained in chat format (or with
``--chat``), wrapped as a user turn in the tokenizer's chat template with the
assistant's turn opened. The model continues it::

    $ tunec generate build/demo --task plurals --template spell_plural --set word=plamposh
    What is the plural of "plamposh"?« plamposhes»
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2
import torch

from tunec.compiler.errors import TunecError, did_you_mean
from tunec.compiler.plan import Plan, read_plan
from tunec.compiler.sandbox import OutOfTime, RenderLimit
from tunec.compiler.templates import Renderer, RenderError, TemplateSource, make_env, render_string
from tunec.compiler.units import DataError, template_context

from . import outputs
from .model import pick_device


@dataclass(frozen=True)
class Generation:
    prompt: str
    completion: str


def render_prompt(plan: Plan, task: str, template: str | None, values: dict[str, str]) -> str:
    """The ``prompt`` block of ``task``'s template ``template`` (default: its first) on ``values``."""
    if task not in plan.tasks:
        raise TunecError(f"no task '{task}' in the plan{did_you_mean(task, plan.tasks)}")
    templates = plan.tasks[task].templates
    names = [t.name for t in templates]
    chosen = templates[0] if template is None else next((t for t in templates if t.name == template), None)
    if chosen is None:
        raise TunecError(f"task `{task}` has no template '{template}'{did_you_mean(template, names)}; "
                         f"templates: {', '.join(names)}")
    columns = plan.tasks[task].columns
    for name in sorted(set(values) - set(columns or values)):
        raise TunecError(f"--set {name}: task `{task}` has no column `{name}`{did_you_mean(name, columns)}; "
                         f"columns: {', '.join(columns)}")
    if getattr(chosen, "kind", "blocks") != "blocks":
        raise TunecError(f"template '{chosen.name}' is a {chosen.kind} template; give the prompt with --prompt")
    index = templates.index(chosen)
    # The very context compilation gives a row (the columns, plus the task's answer
    # choices), so the prompt is the one the model was trained on.
    try:
        renderer = Renderer([TemplateSource(t.name, t.source, f"plan.json: task `{task}`", kind=t.kind,
                                            answer_choices=t.answer_choices, separator=t.separator)
                             for t in templates])
        context, _ = template_context(plan.tasks[task].answer_choices, None, renderer, index, dict(values), seed=0)
        return renderer.render_prompt(index, context)
    except RenderError as exc:
        if exc.message.startswith("UndefinedError: "):
            hint = f" (columns: {', '.join(columns)})" if columns else ""
            raise TunecError(f"template '{chosen.name}' of task `{task}`: {exc.message.split(': ', 1)[1]}; "
                             f"give it with --set NAME=VALUE{hint}") from None
        raise TunecError(f"template '{chosen.name}' of task `{task}`: {exc.message}") from None
    except DataError as exc:  # answer choices from a column, which --set cannot give as a list
        raise TunecError(f"task `{task}`: {exc}; give the prompt with --prompt") from None


def build_prompt(plan: Plan, stage: str, prompt: str | None, task: str | None, template: str | None,
                 values: dict[str, str]) -> tuple[str, bool, str | None]:
    """``(text, chat, system)``: the prompt, whether its task was trained through the chat
    template, and the task's system prompt (chat tasks that have one)."""
    if prompt is not None and (values or template or task):
        raise TunecError("give either --prompt TEXT or --set COLUMN=VALUE (with --task/--template), not both")
    if prompt is not None:
        return prompt, False, None
    if not values:
        raise TunecError("nothing to generate from: give --prompt TEXT, or --set COLUMN=VALUE to fill a "
                         "task's template")
    task = task or plan.stage(stage).settings.tasks[0]
    text = render_prompt(plan, task, template, values)
    info = plan.tasks[task]
    if info.format != "chat":
        return text, False, None
    system = None
    if info.system:
        try:
            system = render_string(make_env().from_string(info.system), dict(values))  # bounded, as compiled
        except (jinja2.TemplateError, RenderLimit, OutOfTime) as exc:
            raise TunecError(f"system prompt of task `{task}`: {exc}; give its columns with --set") from None
    return text.strip(), True, system  # chat tasks trained on the stripped prompt


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
             device: str = "auto") -> Generation:
    from transformers import AutoTokenizer

    out = Path(out)
    plan = read_plan(out)
    stage = stage or plan.stages[-1].name
    plan.stage(stage)  # a known stage, or a located error
    text, task_chat, system = build_prompt(plan, stage, prompt, task, template, values or {})
    chat = chat or task_chat
    tokenizer = AutoTokenizer.from_pretrained(str(out / plan.tokenizer.path), local_files_only=True)
    if chat:
        if not tokenizer.chat_template:
            raise TunecError("--chat: the build's tokenizer has no chat template")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    stop = [plan.tokenizer.eos_id] + (end_of_turn_ids(tokenizer) if chat else [])
    dev = pick_device(device)
    model = outputs.load_for_inference(out, stage).to(dev).eval()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)["input_ids"].to(dev)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             eos_token_id=stop, pad_token_id=plan.tokenizer.pad_id, **sampling)
    completion = tokenizer.decode(new[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
    return Generation(text, completion)
