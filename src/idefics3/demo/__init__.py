"""The built-in demo: a tiny Idefics3 trained from scratch on a synthetic visual question-answering task.

scenes.py draws shapes and words, questions.py asks about them, evaluate.py and showcase.py back the
`idefics3 eval` and `idefics3 demo` commands (parsers in commands.py), and model/ is the trained model. The
recipe that trained it lives in the repository, not the package: recipes/demo/ (run from the repository root).
"""
