"""Typed configuration schemas. Hydra composes `conf/` over these; runtime code only ever sees the dataclasses.

Schemas are slotted, not frozen (Hydra cannot extend frozen schemas); treat them as read-only after launch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig, OmegaConf

from parityrt.numerics import NumericsPolicy


@dataclass(slots=True, kw_only=True)
class ModelConfig:
    name: str = MISSING
    # Hugging Face checkpoint directory (config.json + safetensors). None: generate the embedded model below.
    path: str | None = None
    # For generated models: the config.json to write and the seed that fills the weights.
    hf_config: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    # Tokenizer directory; None: the checkpoint directory if it holds tokenizer.json, else the shipped one (when
    # the model's vocabulary holds it; otherwise the server runs without a tokenizer, as with skip_tokenizer_init).
    tokenizer_path: str | None = None
    # SGLang's --skip-tokenizer-init: no tokenizer at all; requests send input_ids and responses carry output_ids
    # only (text, stop strings, chat and /tokenize get a clear 400).
    skip_tokenizer_init: bool = False
    dtype: str = "bfloat16"
    device: str = "cpu"  # cpu, cuda, cuda:N, or auto: cuda when torch sees a GPU, else cpu (resolved at construction)
    # Where generated checkpoints are written (one directory per name, seed and config hash).
    cache_dir: str = "~/.cache/parityrt"

    def __post_init__(self) -> None:
        if self.device == "auto":  # once, when the config is built: every reader then sees the same device
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(slots=True, kw_only=True)
class ParallelConfig:
    tp_size: int = 1
    # virtual TP: one process computes every row-parallel layer as tp_size partial products over the K shards
    # real TP would use and reduces them with the configured all-reduce, to study TP=N numerics on one device
    virtual: bool = False
    backend: str = "auto"  # auto: nccl on CUDA, gloo on CPU
    timeout_s: int = 120  # a collective that waits longer than this fails the job instead of hanging


@dataclass(slots=True, kw_only=True)
class EngineConfig:
    max_seq_len: int = 4096  # context length: prompt + generated tokens of one request
    # Dump full-vocabulary logits into the run directory (short runs only: parity tooling reads them).
    dump_logits: bool = False
    page_size: int = 16  # tokens per KV page
    # KV token slots of the page pool (every attention layer); when they run out, the newest request is preempted
    # and waits. Must hold one request of max_seq_len tokens.
    max_total_tokens: int = 32768
    max_running_requests: int = 32  # also the number of GDN state slots
    chunked_prefill_size: int = 512  # new tokens per step (prefill chunks and decodes together)
    # Replay decode steps (every running sequence at one new token) as CUDA graphs, captured per batch and page
    # bucket on first use (parityrt/engine/cuda_graph.py). CUDA, TP = 1, and a policy whose ops can be captured
    # (a clear error otherwise). Decode steps of more than cuda_graph_max_bs sequences run without a graph.
    cuda_graph: bool = False
    cuda_graph_max_bs: int = 64
    # Prefix (radix) cache: requests share the KV pages of a common token prefix (parityrt/engine/radix_cache.py;
    # cached_tokens in meta_info). Under an invariant policy (rl_parity) a cached prefix gives the bits of
    # recomputing it. Hybrid models keep a GDN state snapshot per cached prefix end, in prefix_cache_state_slots
    # extra state slots (each one the size of a running request's state).
    prefix_cache: bool = True
    prefix_cache_state_slots: int = 32


@dataclass(slots=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str | None = None  # when set, every route but /health* needs `Authorization: Bearer <key>`
    served_model_name: str | None = None  # null: the checkpoint path, as SGLang does
    weight_version: str = "default"
    log_level: str = "warning"
    # Caps on the work one request can ask for (SGLang has none; each refusal is a 400 with SGLang's error body,
    # docs/server.md). Without them an 80-byte body with n=20000 held the engine for minutes.
    max_n: int = 64  # samples per prompt (sampling_params.n)
    max_batch: int = 256  # prompts per request (a text or input_ids list)
    max_body_bytes: int = 64 * 1024 * 1024  # request body; larger ones get 413 before they are read
    max_top_logprobs: int = 64  # top_logprobs_num and len(token_ids_logprob): streamed chunks repeat them all
    # A weight-sync rendezvous or broadcast (/init_weights_update_group, /update_weights_from_distributed) that
    # waits longer than this fails the request instead of hanging the server
    weight_sync_timeout_s: int = 300
    # SGLang's --incremental-streaming-output: each /generate stream chunk carries only the new text, output ids
    # and output-token logprobs (default: every chunk is cumulative)
    incremental_streaming_output: bool = False


@dataclass(slots=True, kw_only=True)
class TrainConfig:
    numerics: str | None = None  # the trainer's preset when it differs from the run's (scripts/train_rl.py)
    world_size: int = 1  # FSDP2 data-parallel ranks on this host (gloo on CPU, NCCL on CUDA)
    micro_batch_tokens: int = 4096  # tokens packed into one trainer forward (whole sequences only)
    timeout_s: int = 300  # a collective that waits longer fails the job instead of hanging
    # `python -m parityrt.train score`: the rollouts' numerics contract (a numerics_fingerprint.json or the run
    # directory holding it); null: the one beside `input` when there is one (scripts/generate.py's run directory)
    fingerprint: str | None = None


@dataclass(slots=True, kw_only=True)
class RunConfig:
    model: ModelConfig = MISSING
    numerics: NumericsPolicy = MISSING
    parallel: ParallelConfig = MISSING
    engine: EngineConfig = MISSING
    server: ServerConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    input: str | None = None  # scripts/generate.py: JSONL of SGLang /generate requests
    output: str | None = None  # scripts/generate.py: JSONL of SGLang /generate responses (default: run dir)
    progress: bool = True


def register_schemas() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_run", node=RunConfig)
    for group, node in [
        ("model", ModelConfig),
        ("numerics", NumericsPolicy),
        ("parallel", ParallelConfig),
        ("engine", EngineConfig),
        ("server", ServerConfig),
    ]:
        cs.store(group=group, name=f"base_{group}", node=node)


register_schemas()


def _overrides_slug(override_dirname: str) -> str:
    """conf/config.yaml's run directory names the command-line overrides (Hydra's override_dirname, path-valued
    keys excluded there): '_' + the overrides with '/' made '-', cut to 80 characters plus a hash of the rest."""
    import hashlib

    if not override_dirname:
        return ""
    slug = override_dirname.replace("/", "-")
    if len(slug) > 80:
        slug = slug[:80] + "~" + hashlib.sha1(slug.encode()).hexdigest()[:8]
    return "_" + slug


OmegaConf.register_new_resolver("parityrt_overrides", _overrides_slug, replace=True)
# ${asset:NAME}: a directory shipped in parityrt/assets (e.g. a tiny model's tokenizer), wherever parityrt is installed
OmegaConf.register_new_resolver("asset", lambda name: str(Path(__file__).resolve().parent / "assets" / name), replace=True)


def to_run_config(cfg: DictConfig) -> RunConfig:
    run = OmegaConf.to_object(cfg)
    assert isinstance(run, RunConfig), type(run)
    return run


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_run(overrides: list[str] | None = None, config_name: str = "config") -> RunConfig:
    """Compose conf/ exactly as the launchers do (for tests, notebooks and scripts that run several cells). Inside
    a Hydra app (whose config path is conf/ too) its own initialisation is reused."""
    if GlobalHydra.instance().is_initialized():
        return to_run_config(compose(config_name=config_name, overrides=list(overrides or [])))
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return to_run_config(compose(config_name=config_name, overrides=list(overrides or [])))


def load_preset(name: str) -> NumericsPolicy:
    return compose_run([f"numerics={name}"]).numerics
