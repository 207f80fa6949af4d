"""A short CUDA check of the GPU paths that CI (CPU only) never runs. Prints one JSON line per check.

1. serve.engine on CUDA: batched greedy decoding equals `alignloop.core.sampling` on the same GPU;
2. reward.score on CUDA: scores equal the CPU's (to float tolerance);
3. rl.ppo on CUDA, tiny model: the known reward rises;
4. rl.ppo value-model choice at the default model's size (SmolLM2-135M architecture, random weights, LoRA):
   seconds per step and peak GPU memory with the value as a second LoRA adapter vs a head on the policy.

    python bench/cuda_check.py            (on a machine with a GPU)
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import build_tiny_llama, build_tiny_tokenizer  # noqa: E402

from alignloop.core.sampling import SamplingParams, generate  # noqa: E402


def report(check, **values):
    print(json.dumps({"check": check, **values}), flush=True)


def main() -> None:
    assert torch.cuda.is_available(), "no GPU"
    device = torch.device("cuda")
    report("device", name=torch.cuda.get_device_name(), torch=torch.__version__)
    tok = build_tiny_tokenizer()

    # 1. the serving engine
    from serve.engine import BatchingEngine, Request, Stream

    model = build_tiny_llama(tok).to(device)
    prompts = [[{"role": "user", "content": f"Question {i}?"}] for i in range(6)]
    expected = [c[0].text for c in generate(model, tok, prompts, progress=False,
                                            params=SamplingParams(max_new_tokens=8, temperature=0))]  # fmt: skip
    engine = BatchingEngine(model, tok, gather_ms=100)
    streams = [Stream() for _ in prompts]
    for p, s in zip(prompts, streams, strict=True):
        engine.submit(Request(prompt_ids=engine.render(p), max_tokens=8, temperature=0, emit=s))
    got = ["".join(e[1] for e in s if e[0] == "text") for s in streams]
    report("engine", equal_to_generate=got == expected, batches=engine.batches)

    # 2. reward scoring, CUDA vs CPU
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from reward.score import RewardModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)  # fmt: skip
    rm = LlamaForSequenceClassification(cfg).eval()
    texts = ["Thank you! Here is a summary.", "No.", "Paris is the capital of France."]
    cpu = RewardModel(model=rm, tokenizer=tok, max_length=128).score(["q"] * 3, texts)
    gpu = RewardModel(model=rm.to(device), tokenizer=tok, max_length=128).score(["q"] * 3, texts)
    report("reward_score", max_abs_diff=max(abs(a - b) for a, b in zip(cpu, gpu, strict=True)))

    # 3. PPO learns on the GPU
    from rl.ppo import PPOTrainer, load_config

    target = {i for i in range(len(tok)) if i % 4 == 0}

    def reward(prompts, completions):
        return [sum(t in target for t in c.token_ids) / max(1, len(c.token_ids)) for c in completions]

    config = load_config(None, steps=25, batch_size=16, mini_batch_size=8, max_new_tokens=4, learning_rate=1e-2,
                         missing_eos_penalty=0.0, lora_r=8, lora_alpha=16,
                         target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"])  # fmt: skip
    trainer = PPOTrainer(config, build_tiny_llama(tok, initializer_range=0.1), tok, prompts * 3, reward)
    history = trainer.train(progress=False)
    report("ppo_tiny", reward_first=sum(h["raw_score"] for h in history[:5]) / 5,
           reward_last=sum(h["raw_score"] for h in history[-5:]) / 5, device=str(trainer.accelerator.device))  # fmt: skip

    # 4. value model choice at the default model's size
    from transformers import LlamaForCausalLM

    smol = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                       tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)  # fmt: skip
    questions = [
        [{"role": "user", "content": f"Tell me something about topic number {i}, please."}] for i in range(64)
    ]
    for value_model in ("adapter", "shared"):
        torch.manual_seed(0)
        policy = LlamaForCausalLM(smol)
        policy.generation_config.eos_token_id = 2
        torch.cuda.reset_peak_memory_stats()
        cfg = load_config(None, steps=6, batch_size=32, mini_batch_size=16, ppo_epochs=2, max_new_tokens=48,
                          learning_rate=1e-4, value_model=value_model, missing_eos_penalty=0.0)  # fmt: skip
        trainer = PPOTrainer(
            cfg, policy, tok_like(smol), questions, lambda p, c: [float(len(x.token_ids)) / 48 for x in c]
        )
        trainer.train(progress=False)
        steps = trainer.history[2:]
        report("ppo_value_model", value_model=value_model,
               s_per_step=sum(h["step_s"] for h in steps) / len(steps),
               update_s=sum(h["update_s"] for h in steps) / len(steps),
               generate_s=sum(h["generate_s"] for h in steps) / len(steps),
               peak_gb=torch.cuda.max_memory_allocated() / 2**30)  # fmt: skip
        del trainer, policy
        torch.cuda.empty_cache()


def tok_like(config):
    """A byte-level tokenizer padded to the model's vocabulary (random weights: only the shapes matter)."""
    tok = build_tiny_tokenizer()
    tok.add_tokens([f"<extra_{i}>" for i in range(config.vocab_size - len(tok))])
    return tok


if __name__ == "__main__":
    main()
