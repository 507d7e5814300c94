"""Cost estimates (compiler/estimate.py) against reality: parameters counted exactly on models built on
torch's meta device, FLOPs against torch's FlopCounterMode, and the numbers in a compiled plan."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from tunec.compiler.estimate import estimate, flops, params, shape_of  # noqa: E402
from tunec.compiler.recipe import LoraPeft  # noqa: E402

LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
CONFIGS = {
    "llama": LLAMA,
    "llama-tied-bias": dict(LLAMA, tie_word_embeddings=True, attention_bias=True, mlp_bias=True, head_dim=24),
    "qwen2": dict(LLAMA, model_type="qwen2"),
    "qwen3": dict(LLAMA, model_type="qwen3", head_dim=32),
    "mistral": dict(LLAMA, model_type="mistral"),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=128),
    # Qwen2.5-0.5B's architecture (its config.json's sizes): 494,032,768 parameters
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                         max_position_embeddings=32768),
}
LORAS = {
    "none": None,
    "all-linear": LoraPeft(kind="lora", r=4),
    "some": LoraPeft(kind="lora", r=8, target_modules=["q_proj", "v_proj", "down_proj", "c_attn", "c_fc"]),
}


def _config(spec: dict):
    from transformers import AutoConfig

    args = dict(spec)
    return AutoConfig.for_model(args.pop("model_type"), **args)


def _model(spec: dict, lora: LoraPeft | None, device: str = "meta", attn: str = "eager"):
    from transformers import AutoModelForCausalLM

    from tunec.runtime.model import add_lora

    with torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_config(spec), dtype=torch.float32, attn_implementation=attn)
        if lora is not None:
            model = add_lora(model, lora, 0)
    return model


@pytest.mark.parametrize("lora", list(LORAS))
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_parameter_counts_equal_a_meta_model_exactly(arch, lora):
    spec, peft = CONFIGS[arch], LORAS[lora]
    model = _model(spec, peft)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = shape_of(_config(spec).to_dict())
    assert shape is not None
    assert params(shape, peft) == (total, trainable, trainable if peft else 0)


def _packed(lengths: list[list[int]], seq_len: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (len(lengths), seq_len), generator=g)
    pos = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for r, row in enumerate(lengths):
        at = 0
        for n in row:
            pos[r, at:at + n] = torch.arange(n)
            at += n
        if at < seq_len:  # the padding that closes the row: a pseudo-document from 0
            pos[r, at:] = torch.arange(seq_len - at)
    return ids, pos


def _measured(model, ids, pos) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from tunec.runtime.model import loss_sum, packed_logits

    with FlopCounterMode(display=False) as counter:
        loss_sum(packed_logits(model, ids, pos, "eager"), ids).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("lora", ["none", "all-linear", "some"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_flops_match_the_flop_counter_on_a_packed_batch(arch, lora, one_thread):
    """Forward and backward of a packed batch (eager attention, so that the counter sees it): the dense
    attention of the block-diagonal mask, and the per-document count against each document run alone."""
    spec, peft = CONFIGS[arch], LORAS[lora]
    model = _model(spec, peft, device="cpu")
    shape = shape_of(_config(spec).to_dict())
    assert shape is not None
    seq_len, lengths = 64, [[20, 30, 14], [50], [9, 9, 9, 9, 9, 9, 10]]
    ids, pos = _packed(lengths, seq_len, 512)
    linear, _ = flops(shape, peft, ids.numel(), 0)
    _, dense = flops(shape, peft, 0, len(lengths) * seq_len**2)
    measured = _measured(model, ids, pos)
    assert abs(linear + dense - measured) <= 0.1 * measured, (linear + dense, measured)

    docs = [n for row in lengths for n in row]
    alone = 0
    at = 0
    flat = ids.reshape(-1)
    for n in docs:
        alone += _measured(model, flat[at:at + n][None], torch.arange(n)[None])
        at += n
    by_doc = sum(flops(shape, peft, sum(docs), float(sum(n * n for n in docs))))
    assert abs(by_doc - alone) <= 0.1 * alone, (by_doc, alone)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from tiny import DEMO

    from tunec.compiler.build import Options, compile_recipe

    out = tmp_path_factory.mktemp("demo") / "b"
    return compile_recipe(DEMO / "demo.yaml", out, Options(workers=1)), out


def test_the_demo_plan_holds_estimates(demo):
    """Compile the demo: each stage has an estimate whose counts follow from the plan and the model."""
    from tunec.compiler.recipe import ConfigModel

    plan, out = demo
    saved = json.loads((out / "plan.json").read_text())
    sp = plan.stages[0]
    est = sp.estimate
    assert est is not None and saved["stages"][0]["estimate"]["params_total"] == est.params_total
    assert est.steps == 100  # the recipe says: 6 epochs of 266 rows, 16 rows a step
    assert est.positions == est.steps * est.rows_per_step * sp.train.seq_len
    assert isinstance(sp.settings.model, ConfigModel)
    model = _model(sp.settings.model.config, None)
    assert est.params_total == sum(p.numel() for p in model.parameters())
    assert est.flops_attention is not None and est.flops_attention_dense is not None
    assert 0 < est.flops_attention < est.flops_attention_dense  # documents are shorter than rows
    assert est.memory_peak is not None and est.memory_peak_checkpointed is not None
    assert est.memory_peak > est.memory_peak_checkpointed > est.memory_weights


def test_tunec_plan_prints_the_estimates_and_warns_when_memory_does_not_fit(demo, monkeypatch):
    from click.testing import CliRunner

    from tunec.cli import main
    from tunec.compiler import estimate as est

    plan, out = demo
    result = CliRunner().invoke(main, ["plan", str(out), "--gpu", "a100", "--mfu", "0.5"])
    assert result.exit_code == 0, result.output
    e = plan.stages[0].estimate
    assert f"parameters           {e.params_total:,} total" in result.output
    assert "at 312.00 TFLOP/s peak, MFU 0.5" in result.output and "warning" not in result.output
    monkeypatch.setitem(est.GPUS, "l4", (121e12, 1 << 20))  # a device of 1 MiB
    result = CliRunner().invoke(main, ["plan", str(out), "--gpu", "l4"])
    assert "warning: the estimated peak memory" in result.output and "exceeds the l4's 1.00 MiB" in result.output


def test_run_dry_run_builds_on_the_meta_device_and_writes_nothing(demo, monkeypatch):
    from click.testing import CliRunner

    from tunec.cli import main
    from tunec.runtime import dryrun

    plan, out = demo
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    result = CliRunner().invoke(main, ["run", str(out), "--dry-run", "--device", "cpu", "--max-steps", "7",
                                       "--set", "stages.sft.micro_batch_rows=2"])
    assert result.exit_code == 0, result.output
    assert "steps                7 (16 rows of 256 a step, micro-batches of 2)" in result.output
    assert f"{plan.stages[0].estimate.params_total:,} total" in result.output
    assert result.output.strip().endswith("nothing trained, nothing written")
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # no runs/, no lock left

    monkeypatch.setattr(dryrun, "local_device", lambda choice: ("tiny", 1e12, 1 << 20))
    result = CliRunner().invoke(main, ["run", str(out), "--dry-run", "--device", "cpu"])
    assert result.exit_code == 1
    assert "error: stage(s) sft: the estimated peak memory exceeds the tiny's 1.00 MiB" in result.output


def test_a_dry_run_stops_on_a_bad_setting(demo):
    from click.testing import CliRunner

    from tunec.cli import main

    _, out = demo
    result = CliRunner().invoke(main, ["run", str(out), "--dry-run", "--set", "stages.sft.micro_batch_rows=0"])
    assert result.exit_code == 1 and "--set stages.sft.micro_batch_rows=0: " in result.output


def test_an_architecture_not_modelled_gives_the_counts_without_model_numbers():
    from tunec.compiler.plan import PackedSet
    from tunec.compiler.recipe import Stage

    stage = Stage.model_validate({"name": "s", "objective": "sft", "tasks": ["t"], "batch_tokens": 512,
                                  "model": {"kind": "config", "config": {"model_type": "bert"}}})
    packed = PackedSet(rows=10, seq_len=128, tokens=1000, trained_tokens=100, fill_rate=0.78, shards=[])
    est = estimate(stage, packed, None, 0.0, 0)
    assert est.steps == 3 and est.tokens_seen == 1200 and est.params_total is None and est.flops is None


def test_a_reference_model_adds_one_forward_pass_over_the_rows():
    from tunec.compiler.plan import PackedSet
    from tunec.compiler.recipe import Stage

    shape = shape_of(_config(LLAMA).to_dict())
    packed = PackedSet(rows=10, seq_len=128, tokens=1000, trained_tokens=100, fill_rate=0.78, shards=[])

    def stage(objective: str):
        return Stage.model_validate({"name": "s", "objective": objective, "tasks": ["t"], "batch_tokens": 512,
                                     "epochs": 2, "model": {"kind": "config", "config": LLAMA}})

    with_ref, without = estimate(stage("dpo"), packed, shape, 5000.0, 40), estimate(stage("simpo"), packed, shape,
                                                                                      5000.0, 40)
    assert with_ref.flops_linear - without.flops_linear == 2 * shape.matmul * 10 * 128
    assert with_ref.flops_attention - without.flops_attention == 4 * shape.layers * shape.q_width * 5000


@pytest.mark.parametrize("rows, batch_tokens, epochs, max_steps", [
    (266, 4096, 6, None), (7, 640, 1.5, None), (10, 5000, 2.5, None), (1, 100, 0.1, None), (50, 2048, 3, 7)])
def test_steps_and_micro_batches_are_the_runtime_s(rows, batch_tokens, epochs, max_steps):
    from tunec.compiler.plan import PackedSet
    from tunec.compiler.recipe import Stage
    from tunec.runtime.data import plan_batching

    stage = Stage.model_validate({"name": "s", "objective": "sft", "tasks": ["t"], "batch_tokens": batch_tokens,
                                  "epochs": epochs, "max_steps": max_steps, "micro_batch_rows": 3,
                                  "model": {"kind": "config", "config": LLAMA}})
    packed = PackedSet(rows=rows, seq_len=128, tokens=rows * 100, trained_tokens=rows * 10, fill_rate=0.78, shards=[])
    est = estimate(stage, packed, None, 0.0, 0)
    batching = plan_batching(rows, 128, batch_tokens, 3, epochs, max_steps, 1)
    assert (est.steps, est.rows_per_step, est.micro_batch_rows) == (
        batching.total_steps, batching.rows_per_step, batching.micro_batch_rows)


def test_tunec_plan_needs_no_torch(demo):
    """The estimates are the compiler's: `compile` made them (test_cli checks it imports no torch), and
    `tunec plan` prints them without importing torch either."""
    import subprocess
    import sys

    _, out = demo
    code = ("import sys\nfrom tunec.cli import main\ntry:\n    main(['plan', %r, '--gpu', 'cpu'])\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code\nprint('torch' in sys.modules)\n" % str(out))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "time on cpu" in result.stdout and result.stdout.strip().splitlines()[-1] == "False"


def test_model_configs_are_cached_by_content_and_a_recompile_builds_none(tmp_path, monkeypatch):
    """The config of a stage's model is kept in the compile cache under the request and the content of
    the config.json it reads: asked again, no config is built (no child process); a changed file, or
    another config, is built again."""
    from tunec.compiler import estimate as est
    from tunec.compiler.recipe import Stage

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA))
    cache = tmp_path / "cache"

    def stage(model: dict) -> Stage:
        return Stage.model_validate({"name": "s", "objective": "sft", "tasks": ["t"], "model": model})

    local, inline = stage({"kind": "local", "path": str(folder)}), stage({"kind": "config", "config": LLAMA})
    built: list[str] = []
    real = est._config

    def counting(request_json: str):
        built.append(json.loads(request_json)["kind"])
        return real.__wrapped__(request_json)  # past the in-process memo: each call builds

    monkeypatch.setattr(est, "_config", counting)
    first = {s.model.kind: est.model_config(s, {}, cache) for s in (local, inline)}
    assert built == ["pretrained", "config"] and all(c is not None and c["hidden_size"] == 64
                                                     for c, _ in first.values())
    built.clear()
    assert {s.model.kind: est.model_config(s, {}, cache) for s in (local, inline)} == first and built == []
    (folder / "config.json").write_text(json.dumps(dict(LLAMA, hidden_size=128)))
    config, _ = est.model_config(local, {}, cache)
    assert built == ["pretrained"] and config is not None and config["hidden_size"] == 128
    other = stage({"kind": "config", "config": dict(LLAMA, num_hidden_layers=3)})
    assert est.model_config(other, {}, cache)[0]["num_hidden_layers"] == 3 and built[-1] == "config"
    for entry in (cache / "config").rglob("*.json"):
        entry.write_text("{")  # damaged: built again, never used
    built.clear()
    assert est.model_config(inline, {}, cache) == first["config"] and built == ["config"]
    before = sorted((cache / "config").rglob("*.json"))
    assert len(before) == 4  # two local configs, two inline ones
    missing = tmp_path / "none"
    missing.mkdir()
    (missing / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    config, why = est.model_config(stage({"kind": "local", "path": str(missing)}), {}, cache)
    assert config is None and why and sorted((cache / "config").rglob("*.json")) == before  # errors are never kept


def test_a_prefetched_config_is_built_once_in_the_background_and_is_the_one_asked_for(monkeypatch):
    """`prefetch` starts the config's child process beside the compile; `model_config` then waits for
    that one instead of building it again, and gets what building it directly gives."""
    import threading

    from tunec.compiler import estimate as est
    from tunec.compiler.recipe import Stage

    def stage(name: str, model: dict) -> Stage:
        return Stage.model_validate({"name": name, "objective": "sft", "tasks": ["t"], "model": model})

    config = dict(LLAMA, num_hidden_layers=5)  # a config no other test builds (past _config's memo)
    stages = [stage("a", {"kind": "config", "config": config}), stage("b", {"kind": "stage", "stage": "a"})]
    built: list[str] = []
    release = threading.Event()
    real = est._config

    def counting(request_json: str):
        built.append(threading.current_thread().name)
        release.wait(60)  # the compile goes on meanwhile
        return real.__wrapped__(request_json)

    monkeypatch.setattr(est, "_config", counting)
    est.prefetch(stages)
    est.prefetch(stages)  # asked again (both stages have one architecture): still one build
    release.set()
    got = est.model_config(stages[1], {s.name: s for s in stages})
    assert built == ["tunec-config-prefetch"] and got[0] is not None and got[0]["num_hidden_layers"] == 5
    assert est.model_config(stages[0], {}) == got and len(built) == 2  # nothing pending: built here
    assert got == (real.__wrapped__(json.dumps({"kind": "config", "config": config}, sort_keys=True)))
