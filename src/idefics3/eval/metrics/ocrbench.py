"""OCRBench's scoring (Yuliang-Liu/MultimodalOCR, as lmms-eval's `tasks/ocrbench/utils.py` runs it).

The prediction is lowercased and stripped. For the handwritten mathematical expressions (dataset "HME100k") every
space and newline is removed from both sides and the answer must be a substring of the prediction, case kept on
the reference; for everything else both sides are lowercased, newlines become spaces, and a reference contained
in the prediction is a hit. One hit per question; the benchmark's "final score" is the number of hits out of
1000, and each of the ten question types is reported on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

QUESTION_TYPES = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                  "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition",
                  "Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
                  "Handwritten Mathematical Expression Recognition")
RECOGNITION = QUESTION_TYPES[:6]


def ocrbench_hit(prediction: str, references: Sequence[str] | str, dataset: str = "") -> bool:
    """Whether one of the references is found in the prediction under OCRBench's rule."""
    pred = prediction.lower().strip()
    refs = [references] if isinstance(references, str) else list(references)
    if dataset == "HME100k":
        squeezed = pred.strip().replace("\n", " ").replace(" ", "")
        return any(r.strip().replace("\n", " ").replace(" ", "") in squeezed for r in refs)
    flat = pred.lower().strip().replace("\n", " ")
    return any(r.lower().strip().replace("\n", " ") in flat for r in refs)
