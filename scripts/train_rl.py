"""A small GRPO loop against the SGLang-compatible server, on the embedded tiny model (conf/train_rl.yaml).

Each step: the server samples `rl.group` seeded completions of each prompt with logprobs; the toy reward
(parityrt/train/rl.py) scores them; the trainer (TrainModel under FSDP2, world size 1) recomputes the logprobs
with grad, takes the clipped policy-gradient loss with the rollout -> trainer importance ratio and an AdamW step,
writes the new weights as a safetensors checkpoint and hands it to /update_weights_from_disk with a new
weight_version. Logged per step: reward, the mismatch (max |Δlogp|, k3 mean, fraction of tokens with ratio != 1),
clip fraction, step time; metrics.jsonl and train_rl.png in the run directory at the end.

    python scripts/train_rl.py rl.steps=5
    python scripts/train_rl.py rollout.numerics=engine_fast train.numerics=hf_eager
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from parityrt.config import ModelConfig, RunConfig, load_preset
from parityrt.distributed import free_port
from parityrt.fingerprint import diff_fingerprints, fetch_fingerprint, write_fingerprint
from parityrt.train import Sample, TrainModel
from parityrt.train.fsdp import init_group, save_pretrained, shard
from parityrt.train.rl import even_token_reward, group_advantages, grpo_loss
from parityrt.weights import ensure_generated_checkpoint, read_hf_config

REPO = Path(__file__).resolve().parents[1]


@dataclass(slots=True, kw_only=True)
class RolloutConfig:
    numerics: str | None = None  # the server's preset (null: `numerics`)
    url: str | None = None  # a running server (its checkpoint must be model's); null: start one on server.port
    start_timeout_s: int = 180


@dataclass(slots=True, kw_only=True)
class RLConfig:
    steps: int = 5
    prompts: int = 4
    group: int = 4  # samples per prompt (GRPO's group)
    prompt_len: int = 12
    max_new_tokens: int = 16
    temperature: float = 1.0
    lr: float = 3e-3
    clip: float = 0.2
    seed: int = 0


@dataclass(slots=True, kw_only=True)
class TrainRLConfig(RunConfig):
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rl: RLConfig = field(default_factory=RLConfig)


ConfigStore.instance().store(name="base_train_rl", node=TrainRLConfig)


def post(url: str, path: str, body: dict[str, Any], timeout: float = 600) -> Any:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def start_server(run: TrainRLConfig, ckpt: Path, run_dir: Path) -> tuple[subprocess.Popen, str]:
    """`python -m parityrt.serve` on the checkpoint under the rollout preset; returns once /health answers."""
    numerics = run.rollout.numerics or run.numerics.name
    overrides = [o for o in HydraConfig.get().overrides.task if o.split("=")[0].lstrip("+~").startswith(("model", "engine"))]
    cmd = [sys.executable, "-m", "parityrt.serve", *overrides, f"model.path={ckpt}", f"numerics={numerics}",
           f"server.port={run.server.port}", f"hydra.run.dir={run_dir / 'server'}"]
    log = (run_dir / "server.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{run.server.port}"
    deadline = time.monotonic() + run.rollout.start_timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the rollout server exited with code {proc.returncode}; see {run_dir / 'server.log'}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the rollout server did not answer /health within {run.rollout.start_timeout_s} s")


def rollouts(url: str, prompts: list[list[int]], rl: RLConfig, step: int) -> list[dict[str, Any]]:
    """rl.group seeded samples of every prompt (sample i of step s has seed rl.seed + 1000·s + i)."""
    ids = [p for p in prompts for _ in range(rl.group)]
    sampling = [{"max_new_tokens": rl.max_new_tokens, "temperature": rl.temperature, "ignore_eos": True,
                 "sampling_seed": rl.seed + 1000 * step + i} for i in range(len(ids))]
    return post(url, "/generate", {"input_ids": ids, "sampling_params": sampling, "return_logprob": True})


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["reward"] for r in rows], marker="o")
    axes[0].set(title="mean reward", xlabel="step")
    axes[1].plot(steps, [r["max_abs_dlogp"] for r in rows], marker="o", label="max |Δlogp|")
    axes[1].plot(steps, [r["k3_mean"] for r in rows], marker="s", label="k3 mean")
    axes[1].set(title="train vs rollout mismatch", xlabel="step")
    axes[1].legend()
    axes[2].plot(steps, [r["ratio_not_one"] for r in rows], marker="o", label="ratio != 1")
    axes[2].plot(steps, [r["clip_fraction"] for r in rows], marker="s", label="clipped")
    axes[2].set(title="token fractions", xlabel="step", ylim=(-0.05, 1.05))
    axes[2].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_contract(train: TrainModel, url: str, intended: bool) -> None:
    """At start: the server's numerics contract against the trainer's. When both run one preset (`intended`) a
    difference is refused (TrainModel.check_server names every knob); a deliberate mismatch (rollout.numerics or
    train.numerics set) is printed, since it is what the run measures."""
    if intended:
        train.check_server(url)
        return
    differences = diff_fingerprints(train.fingerprint(), fetch_fingerprint(url))
    print(f"trainer vs server numerics contract: {len(differences)} differences (deliberate), e.g.\n  "
          + "\n  ".join(differences[:8]), file=sys.stderr)


def train_rl(run: TrainRLConfig, run_dir: Path) -> list[dict[str, Any]]:
    rl = run.rl
    ckpt = Path(run.model.path).expanduser() if run.model.path else ensure_generated_checkpoint(run.model)
    train_policy = load_preset(run.train.numerics) if run.train.numerics else run.numerics
    init_group(0, 1, free_port(), run.model.device)
    train = shard(TrainModel.from_config(ModelConfig(name=run.model.name, path=str(ckpt), device=run.model.device,
                                                     dtype=run.model.dtype), train_policy))
    opt = torch.optim.AdamW([p for p in train.parameters() if p.requires_grad], lr=rl.lr, weight_decay=0.0)
    server, url = (None, run.rollout.url) if run.rollout.url else start_server(run, ckpt, run_dir)
    write_fingerprint(run_dir, train.fingerprint())
    try:
        check_contract(train, url, intended=not (run.train.numerics or run.rollout.numerics))
    except BaseException:
        if server is not None:
            server.terminate()
        raise
    g = torch.Generator().manual_seed(rl.seed)
    prompts = [torch.randint(0, train.model.args.vocab_size, (rl.prompt_len,), generator=g).tolist() for _ in range(rl.prompts)]
    rows = []
    try:
        bar = tqdm(range(rl.steps), desc="train_rl", unit="step", disable=not run.progress)
        for step in bar:
            t0 = time.perf_counter()
            outs = rollouts(url, prompts, rl, step)
            samples = [Sample(p + o["output_ids"], len(p) - 1, rl.temperature if rl.temperature >= 1e-6 else 1.0)
                       for p, o in zip([p for p in prompts for _ in range(rl.group)], outs)]
            rewards = [even_token_reward(o["output_ids"]) for o in outs]
            rollout_lps = [[e[0] for e in o["meta_info"]["output_token_logprobs"]] for o in outs]
            loss, stats = grpo_loss(train(samples), rollout_lps, group_advantages(rewards, rl.group), rl.clip)
            opt.zero_grad()
            loss.backward()
            opt.step()
            version = f"step-{step + 1}"
            path = save_pretrained(train, run_dir / "weights" / version, read_hf_config(ckpt))
            reply = post(url, "/update_weights_from_disk", {"model_path": str(path), "weight_version": version})
            if not reply.get("success"):
                raise RuntimeError(f"the server refused the weights of {version}: {reply.get('message')}")
            row = {"step": step, "reward": sum(rewards) / len(rewards), **asdict(stats),
                   "rollout_weight_version": outs[0]["meta_info"]["weight_version"], "new_weight_version": version,
                   "step_s": time.perf_counter() - t0}
            rows.append(row)
            bar.set_postfix(reward=f"{row['reward']:.3f}", max_dlogp=f"{stats.max_abs_dlogp:.2g}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="train_rl")
def main(cfg: DictConfig) -> None:
    run = OmegaConf.to_object(cfg)
    assert isinstance(run, TrainRLConfig)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    rows = train_rl(run, run_dir)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    title = (f"{run.model.name}: rollout {run.rollout.numerics or run.numerics.name}, "
             f"trainer {run.train.numerics or run.numerics.name}")
    plot(rows, run_dir / "train_rl.png", title)
    for r in rows:
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()}))
    print(f"wrote {run_dir / 'metrics.jsonl'} and {run_dir / 'train_rl.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()
