"""Benchmark: alignloop's PPO against TRL 1.12's `trl.experimental.ppo.PPOTrainer` (the last PPO TRL shipped).

TRL 1.12 is installed into its own virtualenv (`$TMPDIR/alignloop-trl112`, created on first use: torch 2.13.0
from this machine, then `trl==1.12.0`, `peft` from the package registry), never into the project's.

Settings, identical for both trainers (prompts, batch size, minibatches, PPO epochs, response length,
temperature, KL coefficient, learning rate, LoRA, precision: bf16 autocast where the CPU does bf16 natively, as
alignloop's default picks, else float32):
- tiny: a 2-layer Llama (hidden 64) with the default model's tokenizer, full fine-tuning;
- default: SmolLM2-135M-Instruct with LoRA r=16 on the attention and MLP projections;
- hh-tiny, hh-default: the same two models on real, full-context HH conversations (the shared HH harmless dev
  prompts, p50 91 / max 830 tokens), 16 rollouts x 48 tokens per step. TRL 1.12's PPOTrainer has no prompt
  cap, and without one it was OOM-killed inside its first step here (24.9 GB, issue #12), so both trainers get
  the same prompts, fitted beforehand with alignloop's `alignloop.core.truncate.fit_prompt` to `--max-prompt-length`
  (oldest turns dropped first). alignloop runs with its shipped memory settings (configs/rl/default.yaml:
  token-budget micro-batches, value head on the policy).
The reward model is the same in both trainers and applied the same way (prompt + response token ids, score at the
last token before EOS; TRL's PPO requires a reward model that shares the policy's tokenizer): for the tiny
setting a seeded random scalar head; for the default setting `--trained-reward DIR`, a reward model trained on
HH-RLHF from the default model's base (`bench/reward_hh.py` writes one), else a seeded random head. TRL's value model is a full copy of the base with a scalar head (its design); alignloop's is a
second LoRA adapter on the policy's base. Each trainer runs in its own process; reported: seconds per PPO step
(wall clock of training / steps), peak resident memory of the process, mean reward over the first and last
steps. Ratios (alignloop / TRL) printed last.

    .venv/bin/python bench/ppo_vs_trl.py [--steps 10] [--settings tiny default hh-tiny hh-default]
                                         [--max-prompt-length 256]

TRL 1.12's virtualenv takes torch, transformers and the rest from the project's (a .pth file), with only
`trl==1.12.0` installed in it, so both trainers run the same torch and transformers.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("ALIGNLOOP_SHARED_DATA", ROOT.parent / "shared" / "data"))
QUESTIONS = DATA / "vicuna_bench_questions.jsonl"
TRL_VENV = Path(tempfile.gettempdir()) / "alignloop-trl112"
SETTINGS = {
    "tiny": dict(batch_size=8, mini_batch_size=4, ppo_epochs=2, max_new_tokens=24, learning_rate=1e-4),
    "default": dict(batch_size=8, mini_batch_size=4, ppo_epochs=2, max_new_tokens=24, learning_rate=3e-5),
    "hh-tiny": dict(batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=48, learning_rate=1e-4),
    "hh-default": dict(batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=48, learning_rate=3e-5),
}
MODEL = {"tiny": "tiny", "default": "default", "hh-tiny": "tiny", "hh-default": "default"}
HH = DATA / "hh_harmless_dev.jsonl"
COMMON = dict(
    temperature=0.7,
    kl_coef=0.05,
    lora_r=16,
    lora_alpha=32,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)

PREPARE = """
import json, os, sys, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from pathlib import Path
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from alignloop.core.config import load_settings
from alignloop.core.workspace import init_workspace
from alignloop.core import registry
out = Path(sys.argv[1]); ws = out / "ws"
init_workspace(ws)
default = registry.locate("default", settings=load_settings(ws)).path
tok = AutoTokenizer.from_pretrained(default)
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
LlamaForCausalLM(cfg).save_pretrained(out / "tiny"); tok.save_pretrained(out / "tiny")
for name, path in (("tiny", out / "tiny"), ("default", default)):
    torch.manual_seed(1)
    rm = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    torch.nn.init.normal_(rm.score.weight, std=0.5)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(out / f"rm-{name}"); tok.save_pretrained(out / f"rm-{name}")
print("RESULT " + json.dumps({"tiny": str(out / "tiny"), "default": str(default)}))
"""

PROMPTS = """
import json, sys
def prompts(path, n):
    return json.load(open(path))[:n]
"""

OURS = (
    PROMPTS
    + """
import os, resource, time, torch
os.environ["HF_HUB_OFFLINE"] = "1"
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from rl.ppo import PPOTrainer, load_config
policy_path, rm_path, setting, steps, questions = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
kw = json.loads(sys.argv[6])
torch.set_num_threads(os.cpu_count())
tok = AutoTokenizer.from_pretrained(policy_path)
model = AutoModelForCausalLM.from_pretrained(policy_path)
rm = AutoModelForSequenceClassification.from_pretrained(rm_path).eval()
rm.config.pad_token_id = tok.pad_token_id  # read the score where TRL reads it: the last token before padding/EOS
from reward.score import RewardModel
scorer = RewardModel(model=rm, tokenizer=tok, max_length=1024)
from alignloop.core.sampling import render
# Scored as TRL scores: the policy's own token ids (prompt + response), read at the last token before EOS.
reward = lambda p, c: scorer.score_ids([render(tok, q) + x.token_ids for q, x in zip(p, c)])
ours = kw.pop("ours", {})
config = load_config(None, steps=steps, missing_eos_penalty=0.0, save_every=0, method="full" if setting.endswith("tiny") else "lora",
                     **({"value_model": "shared" if setting == "tiny" else "adapter"} | ours | kw))
trainer = PPOTrainer(config, model, tok, prompts(questions, 64), reward)
start = time.perf_counter()
history = trainer.train(progress=False)
seconds = time.perf_counter() - start
k = max(1, steps // 4)
parts = {p: sum(h[p] for h in history) / steps for p in ("generate_s", "score_s", "forward_s", "update_s")}
print("RESULT " + json.dumps({"s_per_step": seconds / steps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "reward_first": sum(h["raw_score"] for h in history[:k]) / k, "reward_last": sum(h["raw_score"] for h in history[-k:]) / k,
      "cpu_s_per_step": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) / steps, **parts}))
"""
)

TRL = (
    PROMPTS
    + """
import os, resource, time, torch, tempfile
os.environ["HF_HUB_OFFLINE"] = "1"
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer
policy_path, rm_path, setting, steps, questions = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
kw = json.loads(sys.argv[6])
torch.set_num_threads(os.cpu_count())
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(policy_path, padding_side="left")
rows = [tok.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts(questions, 64)]
rows = (rows * (steps * kw["batch_size"] // len(rows) + 1))[: steps * kw["batch_size"]]
data = Dataset.from_dict({"input_ids": rows})
policy = AutoModelForCausalLM.from_pretrained(policy_path)
value = AutoModelForSequenceClassification.from_pretrained(policy_path, num_labels=1)
value.config.pad_token_id = tok.pad_token_id
rm = AutoModelForSequenceClassification.from_pretrained(rm_path)
peft_config = None
if not setting.endswith("tiny"):
    from peft import LoraConfig
    peft_config = LoraConfig(r=kw["lora_r"], lora_alpha=kw["lora_alpha"], target_modules=kw["target_modules"], task_type="CAUSAL_LM")
args = PPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=kw["batch_size"],
                 num_mini_batches=kw["batch_size"] // kw["mini_batch_size"], num_ppo_epochs=kw["ppo_epochs"],
                 response_length=kw["max_new_tokens"], temperature=kw["temperature"], kl_coef=kw["kl_coef"],
                 learning_rate=kw["learning_rate"], total_episodes=steps * kw["batch_size"], stop_token="eos",
                 use_cpu=True, bf16=kw["bf16"], report_to=[], save_strategy="no", logging_steps=1, num_sample_generations=0,
                 local_rollout_forward_batch_size=kw["batch_size"], seed=0, disable_tqdm=True)
scores = []
class Scores(TrainerCallback):
    def on_log(self, a, state, control, logs=None, **k):
        if logs and "objective/scores" in logs: scores.append(logs["objective/scores"])
trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=rm, value_model=value,
                     train_dataset=data, peft_config=peft_config, callbacks=[Scores()])
start = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - start
k = max(1, len(scores) // 4)
print("RESULT " + json.dumps({"s_per_step": seconds / steps, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "reward_first": sum(scores[:k]) / k, "reward_last": sum(scores[-k:]) / k,
      "cpu_s_per_step": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) / steps}))
"""
)


def run(python: str, script: str, *args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([python, "-c", script, *map(str, args)], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def trl_python() -> str:
    python = TRL_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {TRL_VENV} with trl==1.12.0 (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        # Everything but TRL from the project's environment (same torch and transformers, no second download).
        site = subprocess.run(
            [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        ours = subprocess.run(
            [sys.executable, "-c", "import site; print(site.getsitepackages()[0])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        Path(site, "zz_project.pth").write_text(ours + "\n")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "trl==1.12.0"], check=True)
    return str(python)


def hh_conversations(tokenizer, count: int, max_prompt_length: int):
    """The first `count` distinct HH conversations, fitted to `max_prompt_length` tokens as `rl train` fits them
    (oldest turns first); returns them and the fit's report."""
    from alignloop.core.truncate import fit_prompts
    from reward.data import file_pairs

    seen, conversations = set(), []
    for pair in file_pairs(HH)[0]:
        if pair.key not in seen:
            seen.add(pair.key)
            conversations.append(pair.prompt)
    return fit_prompts(tokenizer, conversations[:count], max_prompt_length)


def write_prompts(setting: str, path: Path, tokenizer_dir: str, max_prompt_length: int) -> dict:
    """The setting's prompts as a JSON list of conversations (both trainers read the same file)."""
    if setting.startswith("hh"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        conversations, report = hh_conversations(tokenizer, 64, max_prompt_length)
        info = report.as_dict()
    else:
        rows = [json.loads(line) for line in open(QUESTIONS)]
        conversations = [[{"role": "user", "content": r.get("text") or r["turns"][0]}] for r in rows][:64]
        info = {"prompts": len(conversations)}
    path.write_text(json.dumps(conversations))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--settings", nargs="+", default=["tiny", "default"], choices=sorted(SETTINGS))
    parser.add_argument(
        "--trained-reward",
        default=None,
        help="a trained reward model on the default model's base "
        "(e.g. from bench/reward_hh.py: <workspace>/runs/run<ID>/model) for the default setting",
    )
    parser.add_argument("--max-prompt-length", type=int, default=256, help="prompt cap for the hh settings")
    args = parser.parse_args()
    trl = trl_python()
    work = Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    paths = run(sys.executable, PREPARE, work)
    from alignloop.core import devices
    from rl.ppo import load_config

    shipped = load_config(ROOT / "configs" / "rl" / "default.yaml")
    # Both trainers at the precision alignloop picks by default: bf16 autocast where this CPU multiplies in bf16
    # natively (AVX512-BF16, AMX), else float32.
    bf16 = devices.autocast_bf16(shipped.bf16)
    print("precision for both trainers:", "bf16 autocast" if bf16 else "float32", flush=True)
    results = {}
    for setting in args.settings:
        model = MODEL[setting]
        ours = {}
        if setting.startswith("hh"):
            ours = {
                "max_prompt_length": args.max_prompt_length,
                "micro_batch_tokens": shipped.micro_batch_tokens,
                "value_model": shipped.value_model if model == "default" else "shared",
                "gradient_checkpointing": shipped.gradient_checkpointing,
            }
        kw = json.dumps({**COMMON, **SETTINGS[setting], "bf16": bf16, "ours": ours})
        prompts = work / f"prompts-{setting}.json"
        print(
            setting,
            "prompts:",
            json.dumps(write_prompts(setting, prompts, paths[model], args.max_prompt_length)),
        )
        for name, python, script in (("trl 1.12", trl, TRL), ("alignloop", sys.executable, OURS)):
            rm = args.trained_reward if model == "default" and args.trained_reward else work / f"rm-{model}"
            results[(setting, name)] = run(python, script, paths[model], rm, setting, args.steps, prompts, kw)
            print(setting, name, json.dumps(results[(setting, name)]), flush=True)
    print("\n| setting | trainer | s/step | peak RSS MB | reward first steps | reward last steps | gain |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for (setting, name), r in results.items():
        gain = r["reward_last"] - r["reward_first"]
        print(
            f"| {setting} | {name} | {r['s_per_step']:.2f} | {r['peak_rss_mb']:.0f} | {r['reward_first']:.3f} | "
            f"{r['reward_last']:.3f} | {gain:+.3f} |"
        )
    if any(s.startswith("hh") for s in args.settings):
        print(
            f"hh settings: prompts capped at {args.max_prompt_length} tokens for both. Uncapped (max 830 tokens), "
            "TRL 1.12 was OOM-killed in its first step on this 24 GB machine (24.9 GB, issue #12); alignloop's "
            "shipped config caps prompts itself (max_prompt_length) and bounds every forward pass by micro_batch_tokens."
        )
    for setting in args.settings:
        ours, theirs = results[(setting, "alignloop")], results[(setting, "trl 1.12")]
        print(
            f"{setting}: time per step {ours['s_per_step'] / theirs['s_per_step']:.2f}x TRL's, peak memory "
            f"{ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x, reward gain {ours['reward_last'] - ours['reward_first']:+.3f}"
            f" vs {theirs['reward_last'] - theirs['reward_first']:+.3f}"
        )


if __name__ == "__main__":
    main()
