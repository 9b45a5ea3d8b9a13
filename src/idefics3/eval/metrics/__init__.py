"""The official scoring rules of each benchmark, as pure functions of (answer, references): no model, no files.

One module per rule family, each a faithful port of the implementation the published numbers come from, quirks
included (the module docstrings name the source and the quirks):

    anls.py       DocVQA's ANLS (threshold 0.5), lmms-eval / Qwen-VL
    vqa.py        TextVQA's VQA accuracy with EvalAI's answer normalisation, averaged over the 10 leave-one-out sets
    mmmu.py       MMMU's multiple-choice and open-answer parsing (MMMU-Benchmark/MMMU eval_utils.py)
    mathvista.py  MathVista's answer extraction by rules (no LLM judge) and its normalisation
    choice.py     multiple choice: MMStar's official rule, lmms-eval's exact match (AI2D), VLMEvalKit's can_infer
    chartqa.py    ChartQA's relaxed accuracy (5%, pix2struct)
    ocrbench.py   OCRBench's substring rule and its ten question types

Tests check every rule against the vectors that the upstream functions produce (tests/eval/test_metrics*.py).
"""
