"""The built-in demo: a tiny Idefics3 trained from scratch on a synthetic visual question-answering task.

scenes.py draws shapes and words, questions.py asks about them, dataset.py writes fine-tuning data,
recipe.py rebuilds the packaged model (model/) with `idefics3 finetune`, evaluate.py and showcase.py back the
`idefics3 eval` and `idefics3 demo` commands (parsers in commands.py). random_checkpoint.py writes an
untrained toy checkpoint; tokenizer.py trains the byte-level BPE both use.
"""
