"""README.md's model-card snippet runs as written, on a local tiny checkpoint, and prints what generate gives.

The code is read from README.md itself (the python block that starts with `import torch` and imports
`AutoProcessor, AutoModelForVision2Seq, load_image` from idefics3), so the test fails when that block is removed or
broken. Only two things are swapped, without touching the README: the Hub id becomes the tiny checkpoint folder, and
`load_image` serves the block's URLs from local JPEG files written here (tests never touch the network). The text it
prints must equal the decoding of an in-process `model.generate` on the same inputs.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

README = Path(__file__).resolve().parents[1].parent / "README.md"  # tests/generation -> tests -> repository root
IMPORT_LINE = "from idefics3 import AutoProcessor, AutoModelForVision2Seq, load_image"
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def readme_snippet(readme: Path = README) -> str:
    """The one python block of README.md that starts with `import torch` and has the model card's import line."""
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", readme.read_text(encoding="utf-8"), re.M | re.S)
    found = [b for b in blocks if b.lstrip().startswith("import torch") and IMPORT_LINE in b]
    assert len(found) == 1, (f"README.md must have exactly one ```python block starting with `import torch` and "
                             f"containing {IMPORT_LINE!r}; found {len(found)} (of {len(blocks)} python blocks)")
    return found[0]


def check_snippet(readme: Path) -> None:
    code = readme_snippet(readme)
    compile(code, "README.md snippet", "exec")  # a syntax error in the block fails here, with its line
    assert "load_image(" in code and "from_pretrained(" in code and ".generate(" in code and "print(" in code


def test_readme_has_the_snippet():
    check_snippet(README)


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    pixels = (x + y) / 2 + rng.normal(0, 20, (height, width, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=95)
    return path


def test_readme_snippet_prints_what_generate_gives(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import idefics3
    import idefics3.processing.load as load

    code = readme_snippet()

    # The Hub id (the same one for the processor and the model) -> the tiny checkpoint folder.
    ids = set(re.findall(r"from_pretrained\(\s*([\"'])(.+?)\1", code))
    assert ids, "no from_pretrained(\"<hub id>\") call in the README snippet"
    assert len({hub_id for _, hub_id in ids}) == 1, f"the snippet loads several checkpoints: {sorted(ids)}"
    quote, hub_id = next(iter(ids))
    assert HUB_ID.match(hub_id), f"{hub_id!r} does not look like a Hub id"
    code = code.replace(f"{quote}{hub_id}{quote}", repr(str(tiny_checkpoint)))
    assert hub_id not in code

    # The URLs given to load_image -> local files, decoded by the real load_image.
    urls = [url for _, url in re.findall(r"load_image\(\s*([\"'])(.+?)\1\s*\)", code)]
    assert len(urls) == 2 and all(u.startswith(("http://", "https://")) for u in urls), urls
    served = {url: write_image(tmp_path / f"image{i + 1}.jpg", *size, seed=i)
              for i, (url, size) in enumerate(zip(urls, [(60, 40), (30, 64)]))}
    real_load_image, requested = load.load_image, []

    def local_load_image(src, *args, **kwargs):
        if isinstance(src, str) and src.startswith(("http://", "https://")):
            assert src in served, f"the snippet asked for a URL it does not name: {src}"
            requested.append(src)
            src = str(served[src])
        return real_load_image(src, *args, **kwargs)

    monkeypatch.setattr(load, "load_image", local_load_image)
    monkeypatch.setattr(idefics3, "load_image", local_load_image)

    scope: dict = {"__name__": "readme_snippet"}
    exec(compile(code, "README.md snippet", "exec"), scope)
    printed = capsys.readouterr().out
    assert requested == urls

    # The same thing in-process: our model and processor from the folder, the same images and messages.
    from idefics3 import Idefics3ForConditionalGeneration, Idefics3Processor

    max_new = re.findall(r"max_new_tokens\s*=\s*(\d+)", code)
    assert len(max_new) == 1, "the snippet's generate call should set max_new_tokens once"
    device = scope["DEVICE"]
    processor = Idefics3Processor.from_pretrained(tiny_checkpoint)
    model = Idefics3ForConditionalGeneration.from_pretrained(tiny_checkpoint, torch_dtype=torch.bfloat16).to(device)
    images = [Image.open(served[url]).convert("RGB") for url in urls]
    prompt = processor.apply_chat_template(scope["messages"], add_generation_prompt=True)
    inputs = {k: v.to(device) for k, v in processor(text=prompt, images=images, return_tensors="pt").items()}
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=int(max_new[0]))
    expected = processor.batch_decode(generated, skip_special_tokens=True)[0]

    assert scope["model"].dtype == torch.bfloat16
    prompt_len = inputs["input_ids"].shape[1]
    assert prompt_len < generated.shape[1] <= prompt_len + int(max_new[0])
    assert torch.equal(scope["generated_ids"].cpu(), generated.cpu())
    assert expected.startswith("User:") and len(expected) > len("User:")
    assert printed == expected + "\n", f"the snippet printed {printed!r}, generate gives {expected!r}"


@pytest.mark.parametrize("broken", ["removed", "syntax"])
def test_a_missing_or_broken_readme_block_is_caught(tmp_path, broken):
    """The extraction does not pass by accident: without the block, or with a broken one, the checks fail."""
    text = README.read_text(encoding="utf-8")
    if broken == "removed":
        text = text.replace(IMPORT_LINE, "from idefics3 import something_else")
    else:
        text = text.replace(IMPORT_LINE, IMPORT_LINE + "\nprocessor = (")
    fake = tmp_path / "README.md"
    fake.write_text(text, encoding="utf-8")
    with pytest.raises(AssertionError if broken == "removed" else SyntaxError):
        check_snippet(fake)
