"""What a stage leaves in ``runs/<stage>/``: weights in the dtype they ran in, generation stop ids,
portable adapters, model cards. Tiny models built from a config, on the CPU, offline.

One build is trained once per module: `chat` (full fine-tuning on a chat task through the demo
tokenizer's ChatML template) and `lora` (a LoRA adapter on `chat`'s output, merged copy saved).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny import DEMO

from tunec import __version__
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.plan import read_plan
from tunec.compiler.recipe import ConfigModel
from tunec.runtime import model as models
from tunec.runtime import outputs
from tunec.runtime.run import RunOptions, run

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024, "max_position_embeddings": 256}
RECIPE = f"""
tokenizer: {{kind: local, path: {DEMO}/tokenizer}}
seq_len: 256
seed: 3
tasks:
  chat:
    source: {{kind: jsonl, path: {{train: {DEMO}/data/reviews/train.jsonl, test: {DEMO}/data/reviews/test.jsonl}}}}
    fields: {{text: review, label: sentiment}}
    format: {{kind: chat}}
    templates: [sentiment/one_word]
    train: {{stop: 60}}
    eval: {{split: test, stop: 10}}
stages:
  - name: chat
    objective: sft
    tasks: [chat]
    model: {{kind: config, config: {json.dumps(TINY)}}}
    lr: 0.003
    batch_tokens: 1024
    max_steps: 3
  - name: lora
    objective: sft
    tasks: [chat]
    model: {{kind: stage, stage: chat}}
    peft: {{kind: lora, r: 4, alpha: 8, dropout: 0.0, save_merged: true}}
    lr: 0.003
    batch_tokens: 1024
    max_steps: 2
"""
EOS, END_OF_TURN = 0, 3  # the demo tokenizer's <|endoftext|> and <|im_end|>


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("outputs")
    (folder / "recipe.yaml").write_text(RECIPE)
    out = folder / "build"
    compile_recipe(folder / "recipe.yaml", out, Options(workers=1))
    run(out, RunOptions(progress=False, device="cpu"))
    return out


def _ids(n: int = 12) -> torch.Tensor:
    return torch.randint(4, 1024, (1, n), generator=torch.Generator().manual_seed(0))


# ----------------------------------------------------------------- 1. the dtype of saved weights


def test_save_dtype_is_the_dtype_the_forward_pass_ran_in():
    assert models.save_dtype(torch.device("cpu")) == torch.float32
    assert models.save_dtype(torch.device("cuda", 0)) == torch.bfloat16  # a device object needs no GPU
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        assert models.save_dtype(device) == models.compute_dtype(device)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_saved_model_loads_unchanged_in_its_dtype(tmp_path, dtype):
    """A real save and load: the config says the dtype, transformers loads it as is, same logits."""
    from transformers import AutoModelForCausalLM

    model, _ = models.build_from_config(ConfigModel(kind="config", config=TINY), 0, "sdpa")
    paths = outputs.save_model(tmp_path, "s", model, lora=False, save_merged=False, base=None,
                               tokenizer_dir=DEMO / "tokenizer", dtype=dtype)
    folder = tmp_path / paths["model"]
    assert json.loads((folder / "config.json").read_text())["dtype"] == str(dtype).removeprefix("torch.")
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert loaded.dtype == dtype
    expected = model.to(dtype).eval()
    with torch.no_grad():
        assert torch.equal(loaded(_ids()).logits, expected(_ids()).logits)


def test_a_cpu_run_saves_float32_and_keeps_the_lora_base_in_float32(trained):
    for folder in ("chat/model", "lora/merged"):
        assert json.loads((trained / "runs" / folder / "config.json").read_text())["dtype"] == "float32"


# ----------------------------------------------------------------- 2. where generation stops


def test_stop_ids_keep_the_model_own_and_add_end_of_turn():
    assert models.stop_ids(0, None, []) == [0]
    assert models.stop_ids(0, 5, [3]) == [0, 5, 3]
    assert models.stop_ids(2, [7, 2], [7, 9]) == [2, 7, 9]


def test_set_special_tokens_keeps_a_pretrained_model_own_stop_ids():
    model, _ = models.build_from_config(ConfigModel(kind="config", config=TINY), 0, "sdpa")
    model.generation_config.eos_token_id = [11, 12]  # as a chat model from the hub lists them
    models.set_special_tokens(model, None, EOS, 1, [END_OF_TURN])
    assert model.generation_config.eos_token_id == [EOS, 11, 12, END_OF_TURN]
    assert model.config.eos_token_id == EOS
    # a model built from a config has only its config class's defaults (llama: 2), which mean nothing here
    models.set_special_tokens(model, None, EOS, 1, [END_OF_TURN], keep_own=False)
    assert model.generation_config.eos_token_id == [EOS, END_OF_TURN]


def test_a_pretrained_model_keeps_its_own_stop_ids_through_a_run(tmp_path):
    from transformers import AutoModelForCausalLM

    pretrained, _ = models.build_from_config(ConfigModel(kind="config", config=TINY), 0, "sdpa")
    pretrained.generation_config.eos_token_id = [11, 12]  # as a chat model from the hub lists them
    pretrained.save_pretrained(tmp_path / "pretrained")
    recipe = RECIPE.split("  - name: lora")[0].replace(
        f"{{kind: config, config: {json.dumps(TINY)}}}", f"{{kind: local, path: {tmp_path / 'pretrained'}}}")
    (tmp_path / "recipe.yaml").write_text(recipe.replace("max_steps: 3", "max_steps: 1"))
    compile_recipe(tmp_path / "recipe.yaml", tmp_path / "build", Options(workers=1))
    run(tmp_path / "build", RunOptions(progress=False, device="cpu"))
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "build" / "runs" / "chat" / "model")
    assert saved.generation_config.eos_token_id == [EOS, 11, 12, END_OF_TURN]
    card = (tmp_path / "build" / "runs" / "chat" / "model" / "README.md").read_text()
    assert "| base model | `../pretrained` (a local folder, relative to the build folder) |" in card


@pytest.mark.parametrize("folder", ["chat/model", "lora/merged"])
def test_transformers_generate_stops_at_the_chat_end_of_turn(trained, folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(trained / "runs" / folder).eval()
    assert model.generation_config.eos_token_id == [EOS, END_OF_TURN]
    # Steer the model to say <|im_end|> whatever it sees: generate must stop after that one token
    # (the saved generation config is all that tells it to), where it would otherwise run to the limit.
    bonus = torch.zeros(model.config.vocab_size)
    bonus[END_OF_TURN] = 1e4
    model.lm_head.register_forward_hook(lambda module, args, logits: logits + bonus)
    ids = _ids(6)
    new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert new[0, ids.shape[1]:].tolist() == [END_OF_TURN]


def test_end_of_turn_only_for_stages_that_train_chat_tasks(trained, tmp_path):
    plan = read_plan(trained)
    assert outputs.end_of_turn(trained, plan, plan.stages[0]) == [END_OF_TURN]
    (tmp_path / "recipe.yaml").write_text(RECIPE.replace("    format: {kind: chat}\n", ""))  # completion format
    plain = compile_recipe(tmp_path / "recipe.yaml", tmp_path / "build", Options(workers=1))
    assert outputs.end_of_turn(tmp_path / "build", plain, plain.stages[0]) == []


# ----------------------------------------------------------------- 3. adapters that travel


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft asking transformers
def test_adapter_loads_after_the_build_folder_moved(trained, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    first, moved = tmp_path / "first", tmp_path / "elsewhere" / "moved"
    shutil.copytree(trained, first)
    shutil.copytree(first, moved)
    shutil.rmtree(first)  # nothing may point back into it

    config = json.loads((moved / "runs" / "lora" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "runs/chat/model"
    result = outputs.read_result(moved, "lora")
    assert result.base.path == "runs/chat/model" and result.adapter == "runs/lora/adapter"
    assert str(tmp_path) not in (moved / "runs" / "lora" / "adapter" / "adapter_config.json").read_text()

    # tunec's loader: the base from result.json, relative to the build folder, and the adapter on it
    base, _ = outputs.load_base(moved, result.base, "sdpa")
    ours = models.load_adapter(base, outputs.resolve(moved, result.adapter), trainable=False).eval()
    # peft's own: from the build folder, its relative base path resolves
    monkeypatch.chdir(moved)
    theirs = AutoPeftModelForCausalLM.from_pretrained("runs/lora/adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, theirs(_ids()).logits)
        merged = outputs.load_for_inference(moved, "lora").eval()
        torch.testing.assert_close(merged(_ids()).logits, theirs(_ids()).logits, rtol=1e-4, atol=1e-4)


def test_base_target_is_a_hub_id_or_relative_to_the_build(tmp_path):
    from tunec.compiler.recipe import HubModel, LocalModel

    out = tmp_path / "build"
    assert outputs.base_target(out, HubModel(kind="hub", id="org/model")) == "org/model"
    assert outputs.base_target(out, LocalModel(kind="local", path="runs/a/model")) == "runs/a/model"
    outside = LocalModel(kind="local", path=str(tmp_path / "models" / "m"))  # the plan's absolute path
    assert outputs.base_target(out, outside) == "../models/m"


# ----------------------------------------------------------------- 4. model cards


def test_model_cards_say_what_the_plan_and_the_result_say(trained):
    plan = read_plan(trained)
    for stage, folders in (("chat", ["model"]), ("lora", ["adapter", "merged"])):
        sp, result = plan.stage(stage), outputs.read_result(trained, stage)
        records = [json.loads(line) for line in (trained / "runs" / stage / "metrics.jsonl").read_text().splitlines()]
        final_loss = [r["loss"] for r in records if "loss" in r][-1]
        assert result.train_loss == final_loss
        for folder in folders:
            card = (trained / "runs" / stage / folder / "README.md").read_text()
            assert card.startswith("---\nlibrary_name: " + ("peft" if folder == "adapter" else "transformers"))
            expected = [
                f"# {stage}\n",
                f"| recipe | `recipe.yaml`, sha256 `{plan.recipe.sha256}` |",
                f"| recipe hash | `{plan.recipe.hash}`",
                f"| stage | `{stage}` |",
                "| objective | `sft`: loss on completion tokens only |",
                f"| tunec | {__version__} |",
                f"| steps | {result.steps:,} of {result.rows_per_step:,} rows |",
                f"| tokens | {result.tokens:,} ({result.trained_tokens:,} trained) |",
                f"| final training loss | {final_loss:.4f} |",
                f"| eval loss | {result.eval_loss['all']:.4f} |",
                f"| chat | {result.eval_loss['chat']:.4f} |",
            ]
            counts = sp.tasks["chat"]
            expected.append(f"| chat | {counts.examples:,} | {counts.tokens:,} | {counts.trained_tokens:,} | "
                            f"{counts.trained_share:.1%} |")
            for line in expected:
                assert line in card, (folder, line, card)
        assert ("random weights from a `llama` config (seed 3)" in
                (trained / "runs" / "chat" / "model" / "README.md").read_text())
    adapter_card = (trained / "runs" / "lora" / "adapter" / "README.md").read_text()
    assert "| base model | the model stage `chat` trained |" in adapter_card
    assert "| adapter applies to | `runs/chat/model` |" in adapter_card
    assert "a LoRA adapter (r 4, alpha 8, dropout 0)" in adapter_card
    assert not (trained / "runs" / "lora" / "base").exists()  # chat's model/ is the base: nothing copied


@pytest.mark.parametrize("kind, missing", [("full", "model"), ("lora", "base")])
def test_a_result_without_its_folder_is_a_user_error(tmp_path, kind, missing):
    # result.json is on disk: a damaged one names what is missing instead of failing inside Path / None
    result = outputs.StageResult(stage="s", fingerprint="x", kind=kind, steps=1, rows_per_step=1, tokens=1,
                                 trained_tokens=1, train_loss=None, eval_loss={}, wall_s=0.0)
    outputs.run_dir(tmp_path, "s").mkdir(parents=True)
    outputs.write_result(tmp_path, result)
    with pytest.raises(TunecError, match=f"names no `{missing}`"):
        outputs.load_for_inference(tmp_path, "s")
