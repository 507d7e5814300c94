"""`tunec generate` renders a task's templates with the answer choices compilation gave them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from tunec.cli import main
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.plan import read_plan
from tunec.compiler.shards import open_shard
from tunec.runtime.generate import build_prompt, generate
from tunec.runtime.run import RunOptions, run

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "recipes" / "demo" / "tokenizer"
MODEL = ("{kind: config, config: {model_type: llama, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, "
         "num_attention_heads: 2, num_key_value_heads: 1, vocab_size: 1024, max_position_embeddings: 256}}")
ROWS = [{"text": f"Review {i}: the kettle is {'great' if i % 2 else 'awful'}.", "label": "good" if i % 2 else "bad",
         "mood": "cheerful" if i % 2 else "grumpy"} for i in range(8)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("choices")
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "recipe.yaml").write_text(f"""
tokenizer: {{kind: local, path: {TOKENIZER}}}
seq_len: 256
tasks:
  listed:
    source: {{kind: jsonl, path: d.jsonl}}
    fields: {{text: text, label: label}}
    templates: [sentiment/choices]
    answer_choices: [bad, good]
  rendered:
    source: {{kind: jsonl, path: d.jsonl}}
    templates:
      - kind: inline
        name: mood
        prompt: "{{{{ text }}}}\\nPick one of: {{{{ answer_choices | join(' / ') }}}}\\nLabel:"
        completion: " {{{{ label }}}}"
    answer_choices: {{kind: jinja, template: "bad ||| good ||| {{{{ mood }}}}"}}
stages:
  - name: s
    objective: sft
    tasks: [listed, rendered]
    model: {MODEL}
    batch_tokens: 512
    max_steps: 1
""")
    out = folder / "build"
    compile_recipe(folder / "recipe.yaml", out, Options(workers=1))
    run(out, RunOptions(progress=False, device="cpu"))
    return out


def compiled_prompts(out: Path) -> list[str]:
    """The prompt (the untrained tokens before the completion, BOS dropped) of every compiled document, decoded."""
    plan = read_plan(out)
    tok = AutoTokenizer.from_pretrained(str(out / plan.tokenizer.path))
    prompts = []
    for shard in plan.stages[0].train.shards:
        arrays = open_shard(out / shard.path, shard.bytes)
        for ids, labels, pos in zip(arrays["input_ids"], arrays["labels"], arrays["position_ids"]):
            starts = [i for i, p in enumerate(pos.tolist()) if p == 0] + [len(ids)]
            for a, b in zip(starts, starts[1:]):
                trained = [i for i, label in enumerate(labels[a:b].tolist()) if label != -100]
                if trained:  # padding has none
                    prompts.append(tok.decode(ids[a:a + trained[0]].tolist(), skip_special_tokens=True))
    return prompts


def test_generate_renders_list_choices_as_compiled(trained):
    row = ROWS[3]
    g = generate(trained, task="listed", values={"text": row["text"]}, max_new_tokens=2, device="cpu")
    assert "Answer with exactly one of these labels, written as shown: bad, good." in g.prompt
    assert g.prompt in compiled_prompts(trained)


def test_generate_renders_jinja_choices_from_the_given_values(trained):
    row = ROWS[5]
    plan = read_plan(trained)
    asked = build_prompt(plan, "s", None, "rendered", None, {"text": row["text"], "mood": row["mood"]})
    assert asked.text == f"{row['text']}\nPick one of: bad / good / cheerful\nLabel:" and asked.messages is None
    assert asked.text in compiled_prompts(trained)
    with pytest.raises(TunecError, match="answer_choices: UndefinedError: 'mood' is undefined"):
        build_prompt(plan, "s", None, "rendered", None, {"text": row["text"]})


def test_cli_generate_with_answer_choices(trained):
    result = CliRunner().invoke(main, ["generate", str(trained), "--task", "listed", "--set", f"text={ROWS[2]['text']}",
                                       "--max-new-tokens", "2", "--no-color", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "written as shown: bad, good." in result.output and "undefined" not in result.output


def test_column_choices_cannot_come_from_set_and_say_so(trained):
    from tunec.compiler.recipe import ColumnChoices

    plan = read_plan(trained)
    listed = plan.tasks["listed"].model_copy(update={"answer_choices": ColumnChoices(kind="column", column="label")})
    plan = plan.model_copy(update={"tasks": {**plan.tasks, "listed": listed}})
    with pytest.raises(TunecError) as info:
        build_prompt(plan, "s", None, "listed", None, {"text": "x", "label": "good"})
    assert str(info.value) == ("task `listed`: answer choices column `label` is not a list of strings; "
                               "give the prompt with --prompt")
