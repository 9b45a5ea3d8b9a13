"""The recipe of the packaged demo model (src/idefics3/demo/model) and its tools; NOTES.md has what was tried.

recipe.py runs it end to end: dataset.py writes the fine-tuning data (conversations.py: several questions and a
description per chat, the curriculum's stages), tokenizer.py trains the byte-level BPE, random_checkpoint.py
writes the random-weight starting checkpoint (also an untrained toy one for trying the pipeline),
marker_head.py writes the one hand-built head into it, `idefics3 finetune --full` trains it, and widen.py pads
the trained text width for transformers. The scenes and questions themselves ship in `idefics3.demo`.
"""
