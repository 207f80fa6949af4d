"""Batched generation on a tiny Llama: padding, EOS, determinism, and queueing comparisons."""

import pytest
import torch
from sqlmodel import Session, select

from alignloop.core import AlignloopError, crud
from alignloop.core.db import session_scope
from alignloop.core.models import Comparison, Generation, ModelVersion, Run
from alignloop.core.sampling import SamplingParams, generate, render
from annotate.generate import queue_comparisons

PROMPTS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Explain what a hash table is to a beginner, with an example please."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a poem about the sea"}],
    [{"role": "user", "content": "The capital of France is"}],
]


def greedy(max_new_tokens=12):
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0)


def test_batched_greedy_matches_one_prompt_at_a_time(tiny_model, tiny_tokenizer):
    """Left padding with the attention mask must not change what each prompt generates."""
    batched = generate(tiny_model, tiny_tokenizer, PROMPTS, params=greedy(), batch_size=4, progress=False)
    single = [generate(tiny_model, tiny_tokenizer, [p], params=greedy(), progress=False)[0] for p in PROMPTS]
    assert len({len(render(tiny_tokenizer, p)) for p in PROMPTS}) == len(PROMPTS)  # really different lengths
    for b, s in zip(batched, single, strict=True):
        assert b[0].token_ids == s[0].token_ids


def test_prompts_read_in_length_groups_decode_as_one_padded_batch(tiny_model, tiny_tokenizer, monkeypatch):
    """The grouped prefill (each group at its own width, caches laid side by side, decoding into a buffer that
    grows in place) is the same computation as the library's one padded prefill: same greedy tokens, same
    hidden states, for prompts of very different lengths."""
    from alignloop.core import sampling
    from alignloop.core.batching import plan_micro_batches

    long = [{"role": "user", "content": " ".join(["tell me about the sea"] * 40)}]
    prompts = [long, *PROMPTS]
    lengths = [len(render(tiny_tokenizer, p)) for p in prompts]
    assert len(plan_micro_batches([(n - 1, 0) for n in lengths], len(prompts) * max(lengths))) > 1
    calls = []
    real_prefill = sampling.prefill
    monkeypatch.setattr(sampling, "prefill", lambda *a: calls.append(real_prefill(*a)) or calls[-1])
    params = greedy(20)
    grouped = generate(
        tiny_model, tiny_tokenizer, prompts, params=params, batch_size=8, progress=False, return_hidden=True
    )
    assert calls and calls[0] is not None  # really read in groups
    monkeypatch.setattr(sampling, "prefill", lambda *a: None)
    library = generate(
        tiny_model, tiny_tokenizer, prompts, params=params, batch_size=8, progress=False, return_hidden=True
    )
    for g, lib in zip(grouped, library, strict=True):
        assert g[0].token_ids == lib[0].token_ids and g[0].finished == lib[0].finished
        assert torch.allclose(g[0].hidden, lib[0].hidden, atol=1e-5)


def test_sampling_is_deterministic_under_a_seed(tiny_model, tiny_tokenizer):
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=1.0, seed=7)
    first = generate(
        tiny_model, tiny_tokenizer, PROMPTS, params=params, num_samples=3, batch_size=5, progress=False
    )
    again = generate(
        tiny_model, tiny_tokenizer, PROMPTS, params=params, num_samples=3, batch_size=5, progress=False
    )
    other = generate(
        tiny_model,
        tiny_tokenizer,
        PROMPTS,
        params=SamplingParams(max_new_tokens=10, temperature=1.0, top_p=1.0, seed=8),
        num_samples=3,
        batch_size=5,
        progress=False,
    )
    ids = lambda results: [[c.token_ids for c in samples] for samples in results]  # noqa: E731
    assert ids(first) == ids(again)
    assert ids(first) != ids(other)
    assert all(len(samples) == 3 for samples in first)
    assert len({tuple(c.token_ids) for c in first[1]}) > 1  # samples of one prompt differ


@pytest.fixture
def eos_bias(tiny_model, tiny_tokenizer):
    """Add a constant to the EOS logit, to force or forbid the end of a response."""
    handles = []

    def apply(value: float):
        def hook(module, inputs, output):
            output[..., tiny_tokenizer.eos_token_id] += value
            return output

        handles.append(tiny_model.lm_head.register_forward_hook(hook))

    yield apply
    for h in handles:
        h.remove()


def test_stops_at_eos(tiny_model, tiny_tokenizer, eos_bias):
    eos_bias(1e4)
    results = generate(tiny_model, tiny_tokenizer, PROMPTS, params=greedy(), num_samples=2, progress=False)
    for samples in results:
        for c in samples:
            assert c.finished and c.token_ids == [tiny_tokenizer.eos_token_id] and c.text == ""


def test_missing_eos_is_reported(tiny_model, tiny_tokenizer, eos_bias):
    eos_bias(-1e4)
    results = generate(tiny_model, tiny_tokenizer, PROMPTS, params=greedy(max_new_tokens=9), progress=False)
    for (c,) in results:
        assert not c.finished and c.num_tokens == 9 and c.text


def test_rows_that_finish_early_are_cut_at_their_own_eos(tiny_model, tiny_tokenizer):
    """In a batch, a row that ends early is padded afterwards; its text must stop at its EOS."""
    params = SamplingParams(max_new_tokens=30, temperature=1.5, top_p=1.0, seed=3)
    results = generate(tiny_model, tiny_tokenizer, PROMPTS * 4, params=params, batch_size=16, progress=False)
    for (c,) in results:
        eos = tiny_tokenizer.eos_token_id
        assert eos not in c.token_ids[:-1]
        assert c.finished == (c.token_ids[-1] == eos)


def test_bad_sampling_parameters():
    with pytest.raises(AlignloopError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(AlignloopError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(AlignloopError, match="temperature"):
        SamplingParams(temperature=-1)


def test_queue_comparisons_records_everything(workspace, tiny_model_dir):
    settings, engine, _ = workspace
    with Session(engine) as s:
        crud.add_prompts(
            s,
            prompts=[crud.PromptCreate(messages=p) for p in PROMPTS]
            + [crud.PromptCreate(messages=[{"role": "user", "content": "held out"}], split="eval")],
            source="t",
        )
        s.commit()
    params = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=1)
    summary = queue_comparisons(
        engine,
        settings=settings,
        model_ref=str(tiny_model_dir),
        num_prompts=10,
        num_samples=3,
        round=0,
        target_votes=2,
        params=params,
        progress=False,
    )
    assert summary["prompts"] == 4  # the eval prompt is not used
    assert summary["comparisons"] + summary["identical"] == 4
    with Session(engine) as s:
        comparisons = s.exec(select(Comparison)).all()
        assert len(comparisons) == summary["comparisons"] > 0
        assert all(c.target_votes == 2 and c.status == "queued" for c in comparisons)
        items = crud.comparison_generations(s, comparison_id=comparisons[0].id)
        assert len(items) == 3
        assert items[0].params == {
            "max_new_tokens": 8,
            "temperature": 1.0,
            "top_p": 0.9,
            "top_k": 0,
            "seed": 1,
        }
        version = s.exec(select(ModelVersion)).one()
        assert (version.name, version.licence) == (str(tiny_model_dir), "apache-2.0")
        assert all(g.model_version_id == version.id for g in s.exec(select(Generation)).all())
        run = s.get(Run, summary["run_id"])
        assert run.status == "succeeded" and run.metrics["comparisons"] == summary["comparisons"]

    again = queue_comparisons(
        engine,
        settings=settings,
        model_ref=str(tiny_model_dir),
        num_prompts=10,
        round=0,
        params=params,
        progress=False,
    )
    assert again["prompts"] == 0  # every train prompt already has a comparison in round 0


def test_a_failed_generation_marks_the_run_failed(workspace, tiny_model_dir, monkeypatch):
    from alignloop.core import registry

    settings, engine, _ = workspace
    with Session(engine) as s:
        crud.add_prompts(s, prompts=[crud.PromptCreate(messages=PROMPTS[0])], source="t")
        s.commit()
    # A model that does not exist (or cannot fit) is refused before a Run opens: nothing is written.
    with pytest.raises(AlignloopError, match="not found"):
        queue_comparisons(engine, settings=settings, model_ref="no-such-model", num_prompts=1, progress=False)
    with Session(engine) as s:
        assert s.exec(select(Run)).all() == []

    # A failure once the Run is open (here: while loading the weights) marks it failed.
    def broken_load(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(registry, "load_causal_lm", broken_load)
    with pytest.raises(RuntimeError, match="out of memory"):
        queue_comparisons(
            engine, settings=settings, model_ref=str(tiny_model_dir), num_prompts=1, progress=False
        )
    with Session(engine) as s:
        (run,) = s.exec(select(Run)).all()
        assert run.status == "failed" and "out of memory" in run.error
        assert s.exec(select(Comparison)).first() is None


def test_generation_runs_without_grad_and_leaves_the_model_in_eval(tiny_model, tiny_tokenizer):
    generate(tiny_model, tiny_tokenizer, PROMPTS[:1], params=greedy(3), progress=False)
    assert not tiny_model.training
    assert all(p.grad is None for p in tiny_model.parameters())
    assert torch.is_inference_mode_enabled() is False


def test_k_is_bounded_by_what_the_annotation_page_shows(workspace, capsys):
    """The page shows at most MAX_RESPONSES responses: more could be queued but never be voted on as shown."""
    from test_queue import seed

    from alignloop.cli import main
    from alignloop.core.limits import MAX_RESPONSES

    settings, engine, _ = workspace
    with pytest.raises(SystemExit):
        main(["generate", "--samples", str(MAX_RESPONSES + 1), "--workspace", str(settings.workspace)])
    assert f"must be between 2 and {MAX_RESPONSES}" in capsys.readouterr().err
    with (
        pytest.raises(AlignloopError, match=f"at most {MAX_RESPONSES} responses"),
        session_scope(engine) as s,
    ):
        seed(s, 1, num_items=MAX_RESPONSES + 1)
    with pytest.raises(AlignloopError, match="a comparison needs 2 to"):
        queue_comparisons(
            engine, settings=settings, model_ref="unused", num_prompts=1, num_samples=MAX_RESPONSES + 1
        )
    with Session(engine) as s:
        assert crud.count_comparisons(s) == 0


def test_the_growing_cache_equals_concatenation_even_past_its_room():
    from alignloop.core.sampling import _GrowingLayer

    keys, values = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    layer = _GrowingLayer(keys.clone(), values.clone(), 2)  # room for 2 more
    expected_k, expected_v = keys[:, :, :2], values[:, :, :2]
    for step in (1, 3, 1):  # the second update overflows the buffer
        new_k, new_v = torch.randn(2, 3, step, 5), torch.randn(2, 3, step, 5)
        got_k, got_v = layer.update(new_k, new_v)
        expected_k, expected_v = torch.cat([expected_k, new_k], 2), torch.cat([expected_v, new_v], 2)
        assert torch.equal(got_k, expected_k) and torch.equal(got_v, expected_v)
        assert layer.get_seq_length() == expected_k.shape[2]
