"""Cross-check with lm-evaluation-harness: the same task expressed both ways gives the same acc and acc_norm.

The records `tunec eval` scored (its predictions: prompt, choices, the right
answer) become an lm-evaluation-harness ``multiple_choice`` task over a local
JSON-lines file, with the records' ``choice_prefix`` as its target delimiter;
the harness scores it with the same trained model through its own
transformers wrapper (``HFLM``). Optional: skipped when ``lm_eval`` is not
importable (it is not a dependency of tunec).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_eval_auto import compiled

from tunec.cli import main
from tunec.runtime.run import RunOptions, run

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness (`lm-eval`) is not installed")


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> Path:
    out = compiled(tmp_path_factory.mktemp("lm_eval"))
    run(out, RunOptions(progress=False, device="cpu", eval_accuracy=False))
    result = CliRunner().invoke(main, ["eval", str(out), "--stage", "first", "--device", "cpu"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
@pytest.mark.parametrize("task", ["reviews", "critic"])
def test_lm_eval_gives_the_same_acc_and_acc_norm(scored, task, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    found = [json.loads(line) for line in
             (scored / "runs" / "first" / "predictions" / f"{task}.jsonl").read_text().splitlines()]
    (prefix,) = {p["choice_prefix"] for p in found}
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"prompt": p["prompt"], "choices": p["choices"], "answer": p["answer"]})
                               + "\n" for p in found))
    name = f"tunec_crosscheck_{task}"
    (tmp_path / f"{name}.yaml").write_text(json.dumps({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(records)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{prompt}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "target_delimiter": prefix,
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))

    model = AutoModelForCausalLM.from_pretrained(str(scored / "runs" / "first" / "model")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(scored / "tokenizer"))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1, max_length=128, device="cpu")
    results = simple_evaluate(model=lm, tasks=[name], task_manager=TaskManager(include_path=str(tmp_path)),
                              log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0)
    theirs = results["results"][name]
    saved = json.loads((scored / "runs" / "first" / "eval.json").read_text())["stage"]["tasks"][task]
    assert theirs["acc,none"] == pytest.approx(saved["acc"], abs=1e-9)
    assert theirs["acc_norm,none"] == pytest.approx(saved["acc_norm"], abs=1e-9)
    # and record by record: the same log-likelihoods
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    assert len(samples) == len(found)
    for sample, p in zip(samples, found):
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        assert lls == pytest.approx(p["loglikelihoods"], abs=1e-4)
