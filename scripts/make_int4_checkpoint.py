"""Write a tiny Kimi K2.5 checkpoint with INT4 routed experts in the real on-disk layout, and beside it the same
model with the experts dequantised to bf16 (DeepSeek-V3 layout) as the reference:

    python scripts/make_int4_checkpoint.py out=/tmp/kimi_int4            # model=kimi_k25_tiny by default
    python scripts/generate.py model=kimi_k25_tiny model.path=/tmp/kimi_int4/int4 numerics=hf_eager
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from parityrt.config import ModelConfig
from parityrt.int4_checkpoint import write_int4_pair


@hydra.main(version_base="1.3", config_path="../conf", config_name="int4_checkpoint")
def main(cfg: DictConfig) -> None:
    out = Path(cfg.out)
    model = OmegaConf.to_object(cfg.model)
    assert isinstance(model, ModelConfig)
    int4, ref = (out / "int4").resolve(), (out / "bf16_reference").resolve()
    write_int4_pair(model.hf_config, model.seed, int4, ref)
    print(f"INT4 checkpoint: {int4}\nbf16 reference: {ref}\n"
          f"serve it:  python -m parityrt.serve model={model.name} model.path={int4}")


if __name__ == "__main__":
    main()
