"""rl.model — the Ring-linear hybrid model (BailingMoeLinearV2), HF-compatible.

Importing registers `bailing_moe_linear` with transformers' Auto classes.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from rl.model.config import BailingMoeLinearV2Config, load_model_config
from rl.model.modeling import BailingMoeLinearV2ForCausalLM, BailingMoeLinearV2Model
from rl.model.trace import Trace, first_divergent

try:
    AutoConfig.register("bailing_moe_linear", BailingMoeLinearV2Config)
    AutoModelForCausalLM.register(BailingMoeLinearV2Config, BailingMoeLinearV2ForCausalLM)
except ValueError:  # already registered (re-import)
    pass

__all__ = ["BailingMoeLinearV2Config", "BailingMoeLinearV2ForCausalLM", "BailingMoeLinearV2Model",
           "load_model_config", "Trace", "first_divergent"]
