"""Names shared by the LoRA code, the options and the command line, kept free of torch so that `--help` is fast.

DEFAULT_TARGETS: the Linear layers LoRA adapts by default (the attention and MLP projections of both towers).
PARTS: the model's parts by parameter-name prefix, as `--freeze` names them (the text part includes the head).
"""

from __future__ import annotations

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTS = {"vision": ("model.vision_model.",), "connector": ("model.connector.",),
         "text": ("model.text_model.", "lm_head")}
