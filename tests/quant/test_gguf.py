"""llama.cpp's GGUF files load as our model: tiny text / mmproj pairs written as convert_hf_to_gguf.py writes them
(quant/gguf_files.py) give the logits and greedy tokens of our dense model with the files' dequantised weights,
text-only loading answers text and refuses images, the tokenizer from the metadata equals the tokenizer.json
folder, K-quants are requantised, save_pretrained writes a folder that loads back, and bad files raise errors
that name them."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from PIL import Image

from checkpoints import SMOLVLM_TOKENIZER, tiny_config
from idefics3 import Idefics3ForConditionalGeneration
from idefics3.config import Idefics3Config
from idefics3.generation.generate import generate
from idefics3.loading import load_model, load_processor
from idefics3.model.idefics3 import Idefics3
from idefics3.processing.gguf import processor_from_gguf
from idefics3.processing.processor import Idefics3Processor
from idefics3.quant import QuantLinear, QuantSpec, dequantize, gguf_tensors, quantize
from idefics3.quant.gguf import GGUFError, open_gguf, read_gguf
from quant.gguf_files import write_bare, write_mmproj, write_text

# text matrices and the vision MLP split into groups of 32; ffn_down's 256 inputs take K-quants
CONFIG = tiny_config(vision=dict(intermediate_size=64), text=dict(intermediate_size=256))
LAYER_TYPES = [dict(attn_q=T.Q8_0, attn_k=T.Q4_0, attn_v=T.Q4_1, attn_output=T.F16, ffn_gate=T.Q4_1,
                    ffn_up=T.Q8_0, ffn_down=T.Q4_0),
               dict(attn_q=T.Q4_1, attn_k=T.Q4_1, attn_v=T.Q8_0, attn_output=T.Q4_0, ffn_gate=T.Q8_0,
                    ffn_up=T.Q4_0, ffn_down=T.Q4_1),
               dict(attn_q=T.F32, attn_k=T.Q8_0)]
TEXT_TYPES = {"token_embd.weight": T.Q8_0, "output.weight": T.Q4_0,
              **{f"blk.{i}.{name}.weight": kind for i, layer in enumerate(LAYER_TYPES) for name, kind in layer.items()}}
VISION_TYPES = {"v.blk.0.attn_q.weight": T.Q8_0, "v.blk.0.attn_k.weight": T.Q4_0, "v.blk.0.attn_v.weight": T.Q4_1,
                "v.blk.0.attn_out.weight": T.Q8_0, "v.blk.0.ffn_up.weight": T.Q8_0, "v.blk.0.ffn_down.weight": T.Q4_0,
                "mm.model.fc.weight": T.Q4_1}
K_TYPES = {**TEXT_TYPES, "blk.0.ffn_down.weight": T.Q4_K, "blk.1.ffn_down.weight": T.Q6_K,
           "blk.2.ffn_down.weight": T.Q5_0}
TEXTS = ["Hello world!", "x  2 and 2024\n\n  3.14 -- tabs\t\there", "naïve café, 東京 🚀 <image> tokens",
         "   leading spaces and trailing  ", "<|im_start|>User:<end_of_utterance>\nAssistant: 42",
         "<fake_token_around_image><global-img><image><row_1_col_2>", "I've been 'told' he's there, 'RE you sure?"]


def config(tied: bool = False) -> Idefics3Config:
    return Idefics3Config.from_dict({**CONFIG, "model_type": "idefics3", "tie_word_embeddings": tied})


def random_state(tied: bool) -> dict[str, torch.Tensor]:
    """Seeded weights wide enough that logits are not all ~0 (as checkpoints.build_hf_model widens them)."""
    torch.manual_seed(3)
    model = Idefics3(config(tied))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.08 if p.dim() >= 2 else 0.02)
    return model.state_dict()


def reference(meaning: dict[str, np.ndarray], tied: bool) -> Idefics3:
    """Our dense fp32 model with the weights the GGUF files stand for (vision random where there is no mmproj)."""
    model = Idefics3(config(tied)).eval()
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in meaning.items()}, strict=False)
    if tied:
        model.lm_head.weight = model.model.text_model.embed_tokens.weight
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The GGUF files: the main pair (untied, varied types), a tied text-only file, a K-quant text file."""
    folder = tmp_path_factory.mktemp("gguf")
    untied, tied = random_state(False), random_state(True)
    out = {"text": folder / "tiny-text.gguf", "mmproj": folder / "mmproj-tiny.gguf",
           "tied": folder / "tiny-tied.gguf", "kquant": folder / "tiny-k.gguf"}
    meaning = write_text(out["text"], untied, config(), TEXT_TYPES)
    meaning.update(write_mmproj(out["mmproj"], untied, config(), VISION_TYPES))
    tied_types = {**TEXT_TYPES, "token_embd.weight": T.Q4_1}
    out["meaning"], out["tied_meaning"] = meaning, write_text(out["tied"], tied, config(True), tied_types, tied=True)
    write_text(out["kquant"], untied, config(), K_TYPES)
    return out


def image_inputs(processor: Idefics3Processor) -> dict[str, torch.Tensor]:
    pixels = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
        "type": "text", "text": "What is this?"}]}], add_generation_prompt=True)
    return processor(text=text, images=[Image.fromarray(pixels)], return_tensors="pt")


def test_logits_and_greedy_tokens_equal_the_dense_model_of_the_dequantised_weights(files):
    model = Idefics3ForConditionalGeneration.from_pretrained(files["text"], mmproj=files["mmproj"], dtype="fp32",
                                                             backend="torch")
    processor = processor_from_gguf(files["text"], files["mmproj"])
    assert processor.image_seq_len == model.config.image_seq_len == 4
    assert processor.image_processor.size == {"longest_edge": 64}
    inputs = image_inputs(processor)
    ref = reference(files["meaning"], tied=False)
    with torch.inference_mode():
        got, want = model(**inputs).logits, ref(**inputs).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    settings = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**inputs, **settings), generate(ref, **inputs, **settings))

    layers = model.model.text_model.layers
    q, k, v = (getattr(layers[0].self_attn, f"{n}_proj") for n in "qkv")
    assert (q.spec, k.spec, v.spec) == (QuantSpec(8, 32), QuantSpec(4, 32), QuantSpec(4, 32, asymmetric=True))
    for name, module in (("q_proj", q), ("k_proj", k)):  # un-permuted exactly, scales moved with their rows
        key = f"model.text_model.layers.0.self_attn.{name}.weight"
        assert torch.equal(module.dequantized(), torch.from_numpy(files["meaning"][key]))
    assert isinstance(layers[0].self_attn.o_proj, torch.nn.Linear)  # stored F16: dense
    assert isinstance(model.model.connector.modality_projection.proj, QuantLinear)
    assert "model.text_model.layers.0.self_attn.o_proj" in model.quantization.dense
    assert "tiny-text.gguf" in model.quantization.source and "mmproj-tiny.gguf" in model.quantization.source


def test_text_only_answers_text_with_a_tied_quantised_head_and_refuses_images(files):
    model = load_model(files["tied"], dtype="fp32", backend="auto")
    assert not model.has_vision and model.backend.impl("vision layers") == "torch"
    embed = model.model.text_model.embed_tokens
    assert model.lm_head.qweight.data_ptr() == embed.qweight.data_ptr() and embed.spec.asymmetric
    ref = reference(files["tied_meaning"], tied=True)
    processor = processor_from_gguf(files["tied"])
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
                                         add_generation_prompt=True)
    inputs = processor(text=text, return_tensors="pt")
    with torch.inference_mode():
        got, want = model(**inputs).logits, ref(**inputs).logits
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="without its vision tower .no mmproj file"):
        model.generate(**image_inputs(processor), max_new_tokens=2)
    model.to("cpu").to(torch.bfloat16)  # the absent vision tower stays on the meta device
    assert model.dtype == torch.bfloat16 and model.model.connector.modality_projection.proj.weight.is_meta
    assert list(model.state_dict()) == list(load_model(files["tied"], dtype="fp32", backend="torch").state_dict())


def test_k_quants_are_dequantised_and_quantised_again_with_one_log_line(files, caplog):
    with caplog.at_level(logging.INFO, logger="idefics3.quant.gguf"):
        checkpoint = read_gguf(files["kquant"])
    lines = [r.getMessage() for r in caplog.records if "quantised again" in r.getMessage()]
    assert len(lines) == 1 and "Q4_K" in lines[0] and "Q6_K" in lines[0] and "Q5_0" in lines[0]
    stored = {t.name: t for t in open_gguf(files["kquant"]).tensors}
    for layer, kind, spec in ((0, T.Q4_K, QuantSpec(4, 32)), (1, T.Q6_K, QuantSpec(8, 32)),
                              (2, T.Q5_0, QuantSpec(8, 32))):
        module = f"model.text_model.layers.{layer}.mlp.down_proj"
        assert checkpoint.quantization.modules[module] == spec
        dense = torch.from_numpy(gguf_dequantize(stored[f"blk.{layer}.ffn_down.weight"].data, kind))
        for leaf, tensor in quantize(dense, spec).items():
            assert torch.equal(checkpoint.tensors[f"{module}.{leaf}"], tensor)
    assert checkpoint.requantised == {f"model.text_model.layers.{i}.mlp.down_proj.weight": k
                                      for i, k in enumerate(("Q4_K", "Q6_K", "Q5_0"))}


@pytest.mark.parametrize("kind", [T.Q8_0, T.Q4_0, T.Q4_1])
def test_llama_cpp_blocks_are_our_formats_without_requantising(kind):
    w = np.random.default_rng(1).standard_normal((12, 96)).astype(np.float32)
    blocks = gguf_quantize(w, kind)
    ours = gguf_tensors.quantised(blocks, kind, w.shape)
    spec = gguf_tensors.target_spec(kind)
    assert torch.equal(dequantize(spec, ours["qweight"], ours["scales"], ours.get("mins")),
                       torch.from_numpy(gguf_dequantize(blocks, kind)))
    # a quantised tensor whose module stays dense (a norm, a bias, a position embedding) is dequantised
    vector = gguf_quantize(w[0], kind)
    assert torch.equal(gguf_tensors.dense(vector, kind, (96,)), torch.from_numpy(gguf_dequantize(vector, kind)))


def test_the_tokenizer_of_the_metadata_equals_the_tokenizer_folder(files):
    from_gguf = processor_from_gguf(files["text"], files["mmproj"])
    from_folder = Idefics3Processor.from_pretrained(SMOLVLM_TOKENIZER)
    ours, theirs = from_gguf.tokenizer, from_folder.tokenizer
    assert len(ours) == len(theirs) and ours.special_tokens_map == theirs.special_tokens_map
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Count 1 2  3."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "One, two,  3."}]}]
    chat = from_gguf.apply_chat_template(messages, add_generation_prompt=True)
    assert chat == from_folder.apply_chat_template(messages, add_generation_prompt=True)
    for text in [*TEXTS, chat]:
        ids = ours(text)["input_ids"]
        assert ids == theirs(text)["input_ids"], text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    image = Image.new("RGB", (40, 30))
    expanded = Idefics3Processor(theirs, from_gguf.image_processor, from_gguf.image_seq_len)
    assert from_gguf(text=chat, images=[image])["input_ids"] == expanded(text=chat, images=[image])["input_ids"]
    with_folder = load_processor(files["text"], mmproj=files["mmproj"], tokenizer=SMOLVLM_TOKENIZER)
    assert with_folder.tokenizer(chat)["input_ids"] == ours(chat)["input_ids"]


def test_save_pretrained_writes_a_quantised_folder_that_loads_back(files, tmp_path):
    for name, mmproj in (("full", files["mmproj"]), ("text", None)):
        text = files["text"] if mmproj else files["tied"]
        model = load_model(text, mmproj=mmproj, dtype="fp32", backend="torch")
        model.save_pretrained(tmp_path / name)
        again = load_model(tmp_path / name, dtype="fp32", backend="torch")
        assert again.config.extra["quantization_config"]["source"].startswith("gguf: ")
        assert again.has_vision == (mmproj is not None)
        ids = torch.tensor([[1, 2, 3, 4, 5, 17, 99]])
        with torch.inference_mode():
            assert torch.equal(model(ids).logits, again(ids).logits)
        saved = load_processor(tmp_path / name)
        assert saved.tokenizer(TEXTS[4])["input_ids"] == processor_from_gguf(text, mmproj).tokenizer(TEXTS[4])[
            "input_ids"]


@pytest.fixture(scope="module")
def bad_files(files, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    out = {"qwen2": write_bare(folder / "qwen.gguf", "qwen2"),
           "gemma3_mmproj": write_bare(folder / "gemma-mmproj.gguf", "clip", clip__projector_type="gemma3"),
           "not_gguf": folder / "noise.gguf", "truncated": folder / "truncated.gguf",
           "unknown_type": folder / "unknown.gguf", "unreadable_type": folder / "i16.gguf",
           "mismatched": folder / "mmproj-other.gguf"}
    out["not_gguf"].write_bytes(bytes(range(256)) * 4)
    data = files["text"].read_bytes()
    out["truncated"].write_bytes(data[:len(data) * 2 // 3])
    for name, kind in (("unknown_type", 99), ("unreadable_type", int(T.I16))):
        target = "blk.0.attn_q.weight" if name == "unknown_type" else "blk.0.attn_output.weight"  # F16: same size
        shutil.copy(files["text"], out[name])
        reader = open_gguf(out[name])  # a private map: find the byte of the tensor's type, write it in the file
        field = next(t for t in reader.tensors if t.name == target).field.parts[4]
        offset = field.ctypes.data - reader.data.ctypes.data
        with open(out[name], "r+b") as f:
            f.seek(offset)
            f.write(np.uint32(kind).tobytes())
    write_mmproj(out["mismatched"], random_state(False), config(), projection_dim=48)
    return out


@pytest.mark.parametrize("text, mmproj, named, match", [
    ("qwen2", None, "qwen2", r"architecture 'qwen2'"),
    ("mmproj", None, "mmproj", r"is a vision projector \(mmproj\) file, not a text model"),
    ("text", "text", "text", r"is a text model, not a vision projector"),
    ("text", "gemma3_mmproj", "gemma3_mmproj", r"projector of type 'gemma3'"),
    ("not_gguf", None, "not_gguf", r"not a GGUF file"),
    ("truncated", None, "truncated", r"truncated or corrupt"),
    ("unknown_type", None, "unknown_type", r"tensor blk.0.attn_q.weight has GGML type 99"),
    ("unreadable_type", None, "unreadable_type", r"tensor blk.0.attn_output.weight is stored as I16"),
    ("text", "mismatched", "mismatched", r"48 dimensions .* hidden size 64: the files do not belong together"),
])
def test_bad_files_raise_errors_naming_them(files, bad_files, text, mmproj, named, match):
    paths = {**files, **bad_files}
    with pytest.raises(GGUFError, match=match) as err:
        load_model(paths[text], mmproj=None if mmproj is None else paths[mmproj], dtype="fp32", backend="torch")
    assert str(paths[named]) in str(err.value)


def test_mmproj_and_tokenizer_arguments_need_a_gguf_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="mmproj= goes with a GGUF text model"):
        Idefics3ForConditionalGeneration.from_pretrained(tmp_path, mmproj="x.gguf")
    with pytest.raises(ValueError, match="go with a GGUF text model"):
        load_processor(tmp_path, tokenizer=SMOLVLM_TOKENIZER)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        load_model(tmp_path / "missing.gguf")
