"""gpt.py: GPT-2 in one file that you can read from top to bottom, then run.

    python gpt.py train            # train a character-level GPT on input.txt (Shakespeare)
    python gpt.py sample           # write text with the checkpoint that training saved
    python gpt.py inspect          # the likely next tokens after a prompt, and what the model attends to
    python gpt.py bench            # measure this machine: training and sampling speed
    python gpt.py train --help     # every flag, with its default

The model is GPT-2 exactly (Radford et al. 2019, "Language Models are Unsupervised Multitask
Learners", and OpenAI's released code): token and position embeddings, a stack of pre-LayerNorm
transformer blocks with causal multi-head self-attention and a 4x-wide GELU MLP, a final
LayerNorm, and an output layer that shares its weights with the token embedding. Its
parameters carry the names of Hugging Face's GPT-2 checkpoints, which follow OpenAI's code, so
GPT.from_pretrained("gpt2") loads the real weights into it.

Part I, the GPT, is the code that runs; read it first, in one sitting. It follows a token from
text to logits, to a gradient step, to a sampled next token.
    1. Config           what a model is made of: GPTConfig
    2. Tokenizers       text <-> integers: CharTokenizer, BPETokenizer
    3. Data             token ids -> batches of (input, target) windows
    4. Model            attention (written out, then fused), MLP, Block, GPT
    5. Training         learning-rate schedule, AdamW, one training step, evaluation, the loop
    6. Sampling         temperature, top-k, top-p; recomputing the context; the KV cache

Part II (sections 7 to 16, listed where it begins) makes it fast, safe and usable; read it
when you want to know how. Part I calls into it by names that say what happens there, with
the section number. Within each part nothing is used before it is defined, but for the KV
cache: the model (section 4) takes one, and sampling (section 6) explains it.

Shapes are written in comments with these letters:
    B  batch size (how many sequences at once)     T  time (tokens in a sequence)
    C  channels (n_embd, the width of the model)   V  vocabulary size
    nh number of attention heads                   hs head size (C // nh)
    L  number of layers (blocks)
"""

import math
import time
import warnings
from dataclasses import dataclass

# torch prints a warning at import when NumPy is missing; gpt.py never uses NumPy.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch
import torch.nn as nn
import torch.nn.functional as F
import tiktoken


# ==== Part I: the GPT =========================================================================

# ---- 1. Config -------------------------------------------------------------------------------
#
# Everything that decides the *shape* of a model, and so which checkpoints it can load. The
# defaults are a "typical" small model of about 4.8M parameters, small enough to train on a
# laptop's CPU. GPT-2 small is GPTConfig(vocab_size=50257, block_size=1024, n_layer=12,
# n_head=12, n_embd=768).

@dataclass
class GPTConfig:
    vocab_size: int = 65    # how many different tokens; train sets it from the tokenizer: 76 characters in
                            # input.txt, 50257 for GPT-2's BPE (65: tinyshakespeare, another corpus)
    block_size: int = 256   # the longest context the model can look at (T <= block_size)
    n_layer: int = 6        # how many transformer blocks are stacked
    n_head: int = 8         # attention heads per block; each looks at hs = n_embd // n_head channels
    n_embd: int = 256       # C: the width of every token's vector
    dropout: float = 0.0    # probability of zeroing an activation while training; `train` gives
                            # 0.1 by default (Hugging Face's GPT-2 config: 0.1; OpenAI's code: none)
    bias: bool = True       # GPT-2 has biases in its Linear and LayerNorm layers
    pos: str = "learned"    # positions: "learned" (GPT-2's wpe) or "rope" (rotations of q and k)

    def __post_init__(self):
        check_model_config(self)  # one clear error for a value no model can have: section 12


# ---- 2. Tokenizers ---------------------------------------------------------------------------
#
# A model reads integers, not text. A tokenizer turns text into a list of token ids and back.
# Both tokenizers below offer the same things (encode, decode, vocab_size, token_bytes for
# streaming, start_token for an empty prompt), so the model and the training loop never know
# which one they were given.
#
# - CharTokenizer: one token per character. The vocabulary is the sorted set of characters of
#   the training text (76 for input.txt). Tiny vocabulary, long sequences.
# - BPETokenizer: GPT-2's byte-level byte-pair encoding, through tiktoken. It starts from the
#   256 byte values (so it can encode *any* string), learned 50,000 merges of frequent pairs,
#   and adds one special token, <|endoftext|>: 256 + 50,000 + 1 = 50,257 ids. Common words are
#   one token each: input.txt is 3.2x shorter in BPE tokens than in characters.

class CharTokenizer:
    kind = "char"

    def __init__(self, chars):
        self.chars = "".join(chars)
        self.index = {ch: i for i, ch in enumerate(self.chars)}
        require(len(self.index) == len(self.chars) and self.chars,  # require: else one clear error (Part II)
                "a character vocabulary needs distinct characters, at least one")
        self.vocab_size = len(self.chars)
        # An empty prompt starts from a new line, where a speech begins in a play.
        self.start_token = self.index.get("\n", 0)

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    def encode(self, text):
        check_characters(self, text)  # one clear error naming any character it lacks: section 9
        return [self.index[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

    def token_bytes(self, i):
        return self.chars[i].encode("utf-8")


class BPETokenizer:
    kind = "bpe"

    def __init__(self):
        self.encoding = gpt2_bpe_encoding()  # tiktoken's "gpt2", and what to do offline: section 11
        self.vocab_size = self.encoding.n_vocab  # 50257
        # An empty prompt starts from <|endoftext|>, which begins every document in GPT-2.
        self.start_token = self.encoding.eot_token  # 50256

    def encode(self, text):
        # allowed_special: the text "<|endoftext|>" becomes the special token, as in GPT-2's data
        return self.encoding.encode(text, allowed_special="all")

    def decode(self, ids):
        return self.encoding.decode(ids)

    def token_bytes(self, i):
        # One BPE token can hold part of a multi-byte character, so streaming works on bytes.
        return self.encoding.decode_single_token_bytes(i)


# ---- 3. Data ---------------------------------------------------------------------------------
#
# The whole text (read by read_text, section 9) is encoded once into one long tensor of token
# ids. The first 90% trains the model, the last 10% measures how well it does on text it never
# trained on (validation). A training example is a random window of block_size + 1 tokens: the
# model reads the first block_size and, at every position t, predicts the token at t + 1. So
# one window teaches block_size predictions at once, each with a different amount of context.

def split_data(ids, block_size):
    """One list of token ids -> (train, val) tensors: the first 90% and the last 10%."""
    data = torch.tensor(ids, dtype=torch.long)  # (N,)
    n_train = int(0.9 * len(data))  # 90/10, as nanoGPT splits tinyshakespeare
    train, val = data[:n_train], data[n_train:]  # (0.9 N,), (0.1 N,)
    check_long_enough(len(data), len(val), block_size)  # each split holds a window: section 9
    return train, val


def get_batch(data, block_size, batch_size, generator):
    """batch_size random windows of data -> inputs x and targets y, both (B, T); y is x shifted by one."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,)
    windows = data[starts[:, None] + torch.arange(block_size + 1)]  # (B, 1) + (T+1,) -> (B, T+1)
    return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)


# ---- 4. Model --------------------------------------------------------------------------------
#
#   idx (B, T) token ids
#    -> wte(idx) + wpe(0..T-1)              token embedding + position embedding   (B, T, C)
#                                           (with RoPE, wte(idx) alone: see rope_angles)
#    -> n_layer x Block:                    each block is "pre-LayerNorm" (Radford et al., sec. 2.3):
#           x = x + attn(ln_1(x))             tokens exchange information (attention)
#           x = x + mlp(ln_2(x))              each token thinks on its own (MLP)
#    -> ln_f                                a final LayerNorm
#    -> lm_head                             (B, T, C) -> (B, T, V): a score for every next token
#
# The additions `x = x + ...` form the "residual stream": each block reads it and writes a
# correction into it, so gradients flow straight from the loss to the first layer. With the
# LayerNorms inside the branches, nothing on that straight path is normalised or squashed,
# which is why pre-LayerNorm stacks train stably without careful warm-up (Xiong et al. 2020).

def causal_mask(Tq, Tk, dtype, device):
    """The causal mask, (Tq, Tk), added to the scores. The target at position t is the input at
    t + 1: a position that could look ahead would copy its answer instead of predicting it (and
    when sampling, the future does not exist yet). So the query at position t sees keys 0..t
    only: the mask adds 0 there and -inf on the future, whose weight becomes exp(-inf) = 0.
    Query i sits at position Tk - Tq + i. In training (Tq = Tk = 3), and for 2 new queries after
    3 cached keys:      [0 -inf -inf]            [0 0 0 0 -inf]
                        [0    0 -inf]            [0 0 0 0    0]
                        [0    0    0]
    (Built from comparisons of positions: torch.triu of -inf has given NaN on Apple's GPUs.)"""
    query_positions = torch.arange(Tk - Tq, Tk, device=device)[:, None]  # (Tq, 1)
    future = torch.arange(Tk, device=device) > query_positions  # (Tk,) > (Tq, 1) -> (Tq, Tk)
    return torch.zeros((Tq, Tk), dtype=dtype, device=device).masked_fill(future, float("-inf"))  # (Tq, Tk)


def causal_attention_written_out(q, k, v, dropout_p=0.0):
    """Attention as the paper writes it, the version to learn: softmax(q @ k^T / sqrt(hs) + mask) @ v.

    q is (B, nh, Tq, hs); k and v are (B, nh, Tk, hs) with Tk >= Tq: the queries are the last
    Tq of the Tk positions (Tq == Tk in training; Tq == 1 when sampling with a KV cache).
    """
    Tq, Tk, hs = q.size(-2), k.size(-2), q.size(-1)
    # How well each query matches each key. With entries of variance 1, q . k sums hs terms and
    # has variance hs; dividing by sqrt(hs) brings it back to 1, so the softmax does not saturate
    # (one weight near 1, the rest near 0, and gradients near 0) (Vaswani et al. 2017).
    scores = (q / math.sqrt(hs)) @ k.transpose(-2, -1)  # (B, nh, Tq, hs) @ (B, nh, hs, Tk) -> (B, nh, Tq, Tk)
    scores += causal_mask(Tq, Tk, scores.dtype, q.device)  # (B, nh, Tq, Tk) + (Tq, Tk), in place (section 8)
    weights = F.softmax(scores, dim=-1)  # (B, nh, Tq, Tk): each row sums to 1
    weights = dropout(weights, dropout_p, dropout_p > 0)  # F.dropout, faster on a CPU (section 8)
    return weights @ v  # (B, nh, Tq, Tk) @ (B, nh, Tk, hs) -> (B, nh, Tq, hs): a weighted mean of values


def causal_attention_fused(q, k, v, dropout_p=0.0):
    """The same computation in one call of PyTorch's fused kernel, F.scaled_dot_product_attention,
    which runs by default: fewer passes over memory, and its flash and memory-efficient backends
    never hold the (Tq, Tk) scores at all (PyTorch picks a backend by device, dtype and shape).
    A test proves that both versions agree."""
    Tq, Tk = q.size(-2), k.size(-2)
    if Tq == Tk:  # training, or a first pass over a prompt
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, Tq, hs)
    if Tq == 1:  # one new token with a KV cache: it may look at every earlier position
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, nh, 1, hs)
    # Several new tokens after cached ones (gpt.py's sampler never asks for this; a caller may):
    # is_causal aligns its mask to the top-left corner, wrong when Tq < Tk.
    return causal_attention_written_out(q, k, v, dropout_p)


# RoPE, rotary position embeddings (Su et al. 2021, RoFormer), is what most models since GPT-2
# use instead of wpe. Read each pair of channels (x_j, x_{j + hs/2}) of a query or a key as a
# complex number z_j. At position m, RoPE multiplies z_j by e^{i m theta_j}: a rotation, which
# keeps lengths. A score is then Re sum_j q_j e^{i m theta_j} conj(k_j e^{i n theta_j})
#   = Re sum_j q_j conj(k_j) e^{i (m - n) theta_j}:
# the positions enter only through m - n, how far apart the two tokens are. The paper pairs
# neighbouring channels (2j, 2j + 1); we pair the two halves, as GPT-NeoX and LLaMA do. The
# two differ by a fixed permutation of the channels, the same for q and k, which a dot
# product does not see (the learned weights of c_attn absorb it).

def rope_angles(positions, hs):
    """positions (T,) -> cos and sin of the angles m * theta_j, each (T, hs/2), in float64, with
    theta_j = 10000^(-2j / hs): the first pairs turn fast with the position, the last slowly."""
    theta = 10000.0 ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (hs/2,)
    angles = positions.to(torch.float64)[:, None] * theta  # (T, 1) * (hs/2,) -> (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, nh, T, hs) pair by pair, channel j with channel j + hs/2, by the angles of its
    positions: cos, sin (T, hs/2)."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2): the pairs' first and second channels
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, nh, T, hs), rotated


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention: every token asks a question (query), offers a label (key) and
    a message (value); it collects the messages of earlier tokens whose labels match its
    question. nh heads do this in parallel on hs-wide slices of the channels, so that each can
    look for something else (the previous character, the start of the word, ...)."""

    def __init__(self, config):
        super().__init__()
        # c_attn computes q, k and v for all heads in one matmul: C -> 3C. ("c_": GPT-2's code
        # computes its linear layers as 1-wide convolutions, "Conv1D": a Linear's computation,
        # with the weight stored transposed, as section 11 explains.)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # c_proj mixes the heads' outputs back into the residual stream: C -> C.
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head
        self.dropout = config.dropout
        # "auto" picks the faster or the only right one; the tests and the bench may say which.
        self.attention = "auto"  # or "written out", or "fused"

    def forward(self, x, kv_cache=None, layer=0, rope=None):
        """x (B, T, C) -> (B, T, C). While sampling, kv_cache holds the keys and values of the
        earlier positions (a KVCache, section 6) and layer is this block's number; else None.
        rope: RoPE's cos and sin for these positions, if the model uses RoPE."""
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # (B, T, C) -> (B, T, 3C) -> 3 x (B, T, C)
        # Each head works on its own hs channels: the head axis moves next to the batch axis,
        # and every (sequence, head) pair becomes one independent attention computation.
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, T, C) -> (B, T, nh, hs) -> (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        if rope is not None:  # queries and keys turned by their positions' angles; values are not
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (B, nh, T, hs) each
        if kv_cache is not None:  # sampling: add this step's keys and values to the earlier ones
            k, v = kv_cache.store(layer, k, v)  # 2 x (B, nh, T_past + T, hs)
        dropout_p = self.dropout if self.training else 0.0
        # The fused kernel, except on a device where it is slow or wrong (use_fused_attention, section 8).
        fused = use_fused_attention(q, dropout_p) if self.attention == "auto" else self.attention == "fused"
        attention = causal_attention_fused if fused else causal_attention_written_out
        # In the cache's number format and back: on a CPU the cache is float32 even for a bfloat16
        # model, which is faster there (section 8). Without a cache both are no-ops.
        y = attention(q.to(k.dtype), k, v, dropout_p).to(q.dtype)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, nh, hs) -> (B, T, C): heads side by side
        y = self.c_proj(y)  # (B, T, C) -> (B, T, C)
        return dropout(y, self.dropout, self.training)  # (B, T, C)


class MLP(nn.Module):
    """A two-layer network applied to every token on its own: widen 4x, GELU, narrow back."""

    def __init__(self, config):
        super().__init__()
        # 4x wide, as in the original Transformer (d_ff = 4 * d_model) and in GPT-2.
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x):
        x = self.c_fc(x)  # (B, T, C) -> (B, T, 4C)
        # GELU with the tanh approximation, exactly as GPT-2's code computes it.
        x = F.gelu(x, approximate="tanh")
        x = self.c_proj(x)  # (B, T, 4C) -> (B, T, C)
        return dropout(x, self.dropout, self.training)


class Block(nn.Module):
    """One transformer block. LayerNorm comes *before* each part (GPT-2's change from the
    original post-LayerNorm Transformer), which keeps deep stacks stable to train."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)  # eps 1e-5, as GPT-2
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, layer=0, rope=None):
        x = x + self.attn(self.ln_1(x), kv_cache, layer, rope)  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    """GPT-2: token ids (B, T) -> a score (logit) for every possible next token at every
    position (B, T, V), and with targets the loss. The layers carry GPT-2's checkpoint names:
    transformer.wte, transformer.wpe, transformer.h.0 ... h.{L-1} (the blocks),
    transformer.ln_f, and lm_head, which is wte itself."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        # GPT-2's layers, in its order and names: the "word token embedding" (id -> vector), the
        # "word position embedding" (position -> vector; none with RoPE), the "hidden" blocks and a
        # final LayerNorm.
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.vocab_size, config.n_embd)))
        if config.pos == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.transformer.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.transformer.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.rope_cache = {}  # with RoPE, its angles' cos and sin, computed once per device (section 8)
        # The output layer turns a vector back into a score per token. It *is* the token
        # embedding ("weight tying", Press & Wolf 2017, who found it also lowers perplexity;
        # GPT-2 does it): a token's input vector and output vector are one. Both weights are
        # (V, C), and a Linear computes x @ W^T, so one tensor serves both. It saves V x C
        # parameters: 38.6M of GPT-2 small's 124M.
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # (V, C)

        # GPT-2's initialisation: weights drawn with std 0.02 as in OpenAI's code (which draws wpe
        # with 0.01; like nanoGPT we use 0.02), biases zero, LayerNorms the identity. The paper
        # (sec. 2.3), not its code, also scales the layers that write into the residual stream by
        # 1/sqrt(N), N the number of such layers: two c_proj per block, so N = 2 * n_layer
        # (nanoGPT's reading). This keeps the stream's variance from growing with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            elif name.endswith(".weight") and p.dim() == 2:  # Linear and Embedding weights
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())  # the tied matrix is counted once

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) token ids -> (logits (B, T, V), loss or None). With targets (B, T), the loss is
        the mean cross-entropy of predicting targets[:, t] from idx[:, :t+1]. With a kv_cache, idx
        holds only the new tokens, placed after the cached ones."""
        B, T = idx.shape
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"a sequence of {start + T} tokens is longer than block_size "
                             f"{self.config.block_size}, the longest this model has positions for")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,) the positions of these tokens
        if self.config.pos == "learned":
            x, rope = self.transformer.wte(idx) + self.transformer.wpe(pos), None  # (B, T, C) + (T, C) -> (B, T, C)
        else:  # RoPE: the positions turn q and k inside attention instead
            x, rope = self.transformer.wte(idx), rope_for(self, pos)  # (B, T, C); cos, sin (T, hs/2): section 8
        x = dropout(x, self.config.dropout, self.training)  # embedding dropout (Hugging Face's embd_pdrop)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer, rope)  # (B, T, C) -> (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, C) -> (B, T, V)
        if targets is None:
            return logits, None
        # Cross-entropy in float32 whatever the logits' format: it sums many small terms.
        loss = F.cross_entropy(logits.float().view(B * T, -1), targets.reshape(B * T))  # (B*T, V) vs (B*T,)
        return logits, loss

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0, block_size=None):
        """OpenAI's GPT-2 weights in this model: "gpt2" (124M parameters), "gpt2-medium" (355M), "gpt2-large"
        (774M), "gpt2-xl" (1558M), or a local Hugging Face folder or .safetensors file (section 11)."""
        return load_gpt2(name_or_path, dropout, block_size)


# ---- 5. Training -----------------------------------------------------------------------------
#
# Training makes the model less surprised by each next token. Each step: take a batch of random
# windows, compute the loss (the mean of -log p(the true next token)), backpropagate to get the
# gradient of every weight, clip it, and let AdamW update the weights. Every eval_interval
# steps, the loss on held-out text (validation) says whether the model learns or memorises.
# The settings come in cfg, a TrainConfig (section 12), one field per command-line flag; by
# default batch_size 16, lr 1e-3 (100 warm-up steps) down to min_lr 1e-4 at max_iters 5,000
# (or lr_decay_iters), weight_decay 0.1, beta2 0.99, grad_clip 1.0, evaluation every 500 steps.

def learning_rate(step, cfg):
    """Linear warm-up, then a cosine decay to min_lr (GPT-3, appendix B; Chinchilla: decay to
    lr / 10). Warm-up: in the first steps Adam's estimate of each gradient's second moment rests
    on a few samples, and its updates can be too large (Liu et al. 2020, "On the Variance of the
    Adaptive Learning Rate and Beyond"); step s of the warm-up uses lr * (s + 1) / warmup_iters."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step >= decay_iters:
        return cfg.min_lr
    progress = (step - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)  # 0 -> 1
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model, cfg):
    """AdamW. Weight decay pulls weights towards zero; it applies to the matrices (the Linear
    and Embedding weights), not to biases and LayerNorm gains, whose size has no reason to be
    small. beta1 0.9 as in GPT-3. A fused kernel, where there is one, does the update in one pass."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    fused = use_fused_adamw(matrices + vectors)  # section 7
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, cfg.beta2), fused=fused)


def train_step(model, params, optimizer, scaler, next_batch, grad_accum, autocast_ctx, grad_clip):
    """One optimizer step over grad_accum micro-batches -> the mean loss, as a tensor: reading
    its value would make the CPU wait for the GPU, so the loop does that only when it logs.
    Accumulating the gradients of several micro-batches gives the step of a batch larger than
    fits in memory. params: the model's parameters, whose gradient norm is clipped.

    Mixed precision (section 7): autocast_ctx runs the matmuls in 16 bits. In float16 small
    gradients would round to zero, so the scaler multiplies the loss by a large factor before
    backward, unscale_ divides the gradients back before clipping (which must see their true
    size), and step skips an update whose gradients overflowed. Otherwise the scaler is off."""
    total = torch.zeros((), device=params[0].device)
    for i in range(grad_accum):
        x, y = next_batch()
        with gradients_shared(model, after=i == grad_accum - 1):  # several processes: section 12
            with autocast_ctx:
                _, loss = model(x, y)
            scaler.scale(loss / grad_accum).backward()  # gradients add up over the micro-batches
        total += loss.detach()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(params, grad_clip)  # one bad batch cannot throw the weights far
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum


@torch.no_grad()
def estimate_loss(model, data, cfg, block_size, device, autocast_ctx, seed, split):
    """Mean loss over eval_iters batches. The batches come from their own generator, seeded the
    same way each time: evaluations are comparable and never disturb the training batches."""
    model.eval()  # turns dropout off
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros((), device=device)
    last_report = time.perf_counter()
    for i in range(cfg.eval_iters):
        x, y = get_batch(data, block_size, cfg.batch_size, generator)
        if i % process_count() != process_rank():  # several processes: each evaluates its share (section 12)
            continue
        with autocast_ctx:
            _, loss = model(to_device(x, device), to_device(y, device))  # to_device: section 7
        total += loss
        if time.perf_counter() - last_report > LOG_EVERY_SECONDS:  # a long evaluation is never silent (Part II's log)
            log(f"evaluating the {split} loss: batch {i + 1}/{cfg.eval_iters}")
            last_report = time.perf_counter()
    model.train()
    return mean_over_processes(total, cfg.eval_iters)  # (total / eval_iters).item(), over every process


def train(cfg, resume_checkpoint=None):
    """Train as cfg says; with cfg.resume, continue the run saved in cfg.out_dir (from
    resume_checkpoint, if given). -> {"step", "best_val_loss", "history", "interrupted"}.
    The TrainingRun (section 12) builds the model and its optimizer (make_optimizer), evaluates
    it with estimate_loss (which puts the model back in training mode), and saves."""
    run = TrainingRun(cfg, resume_checkpoint)  # checks the input, builds or restores everything: section 12
    cfg, model, optimizer = run.cfg, run.training_model, run.optimizer  # the model (compiled, or DDP's: section 12)

    def next_batch():  # random training windows, on the model's device
        x, y = get_batch(run.train_data, cfg.block_size, cfg.batch_size, run.batches)
        return to_device(x, run.device), to_device(y, run.device)
    # With several processes (torchrun), each takes its share of a step's micro-batches (section 12).
    next_batch, micro_batches = share_of(next_batch), cfg.grad_accum // process_count()

    with ctrl_c_finishes_the_step() as stop_requested:  # a list that Ctrl-C appends to (section 12)
        while run.step < cfg.max_iters:
            # estimate_loss on both splits; the best val loss so far -> ckpt.pt, the latest -> last.pt.
            # (A resumed run can start at a step it has already evaluated.)
            if run.step % cfg.eval_interval == 0 and not run.evaluated_at(run.step):
                run.evaluate_and_save()
            lr = learning_rate(run.step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = train_step(model, run.params, optimizer, run.scaler, next_batch, micro_batches,
                              run.autocast_ctx, cfg.grad_clip)
            run.step += 1
            # Watches for NaN; logs the loss, tokens/s, the ETA and the MFU (model FLOPs utilisation:
            # the share of the hardware's peak arithmetic that the model's own FLOPs use). True once
            # a stop was asked for (Ctrl-C or SIGTERM): then save last.pt, say how to resume, stop.
            if run.after_step(loss, lr, stop_requested):
                return run.stop()
        if not run.evaluated_at(run.step):
            run.evaluate_and_save()
    return run.finish()


# ---- 6. Sampling -----------------------------------------------------------------------------
#
# The model gives a score (logit) for every possible next token. To write text we turn the
# scores into probabilities, draw one token, append it, and repeat:
#   temperature  divides the scores: below 1 sharpens the distribution, above 1 flattens it;
#                0 means "always the most likely token" (greedy).
#   top_k        keep only the k most likely tokens.
#   top_p        keep only the most likely tokens whose probabilities add up to p ("nucleus").
# The draw runs on the CPU in float32 whatever the device: torch.multinomial on Apple's GPUs has
# drawn impossible ids (section 13). As a second guard, every drawn id is checked.

def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> the next token ids (B, 1), on the CPU."""
    logits = logits.float().cpu()  # (B, V) -> (B, V) in float32 on the CPU
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / temperature  # (B, V)
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))  # (B, V)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V), most likely first
        # A token is in the nucleus if the tokens more likely than it add up to less than top_p
        # (so the most likely token always is).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # (B, V)
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))  # (B, V), in vocabulary order
    next_ids = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1); it renormalises
    return checked_draw(next_ids, probs)  # never an id outside the vocabulary or of probability 0


def sample_by_recomputing(model, context, max_new_tokens, draw):
    """The simple loop: each new token runs the model over the whole context, its last block_size tokens."""
    for _ in range(max_new_tokens):
        logits, _ = model(context)  # (B, T, V): the whole context, every time
        next_id = draw(logits[:, -1, :])  # (B, V) -> (B, 1): only the last position's scores matter
        yield next_id
        context = torch.cat([context, next_id.to(context.device)], dim=1)  # (B, T + 1)
        context = context[:, -model.config.block_size:]  # cropped to block_size


class KVCache:
    """The keys and values of every position seen so far, in every layer. While the context only
    grows they do not change (a position only looks backwards), so a new token needs only its own
    position computed. Each layer's attention stores its new keys and values and gets back those
    of all positions so far; once the last layer has stored, the cache is that much longer."""

    def __init__(self, config, batch_size):
        hs = config.n_embd // config.n_head
        self.shape = (batch_size, config.n_head, config.block_size, hs)  # (B, nh, block_size, hs) per layer
        self.n_layer = config.n_layer
        self.keys, self.values = [], []  # one tensor per layer, made at the first store
        self.length = 0  # how many positions are stored

    def store(self, layer, k, v):
        """k, v (B, nh, T, hs) of T new positions -> the keys and values of all positions so far."""
        if not self.keys:  # on the device of the keys, in the number format of kv_cache_dtype (section 8)
            dtype = kv_cache_dtype(k)
            self.keys = [k.new_zeros(self.shape, dtype=dtype) for _ in range(self.n_layer)]
            self.values = [v.new_zeros(self.shape, dtype=dtype) for _ in range(self.n_layer)]
        keys, values, start, T = self.keys[layer], self.values[layer], self.length, k.size(2)
        # The cache is made once, at its full size: each step writes into it rather than
        # concatenating, which would copy every stored position again.
        keys.narrow(2, start, T).copy_(k)  # (B, nh, T, hs) into positions start.. of (B, nh, block_size, hs)
        values.narrow(2, start, T).copy_(v)  # (B, nh, T, hs) likewise
        if layer == self.n_layer - 1:
            self.length += T
        return keys.narrow(2, 0, start + T), values.narrow(2, 0, start + T)  # 2 x (B, nh, T_past + T, hs)

    def clear(self):
        self.length = 0  # the stored tensors are overwritten from position 0 on


def sample_with_kv_cache(model, context, max_new_tokens, draw):
    """The same loop with a KV cache: the prompt in one pass, then one new position per token.

    A full cache cannot slide by one token: learned positions are absolute (wpe), so sliding
    would give every stored token a new position, and new keys and values. (RoPE's could slide;
    both refill the same way here.) A full cache keeps the newest half of the context, computed
    again in one pass at positions 0, 1, ...: past block_size the model sees between block_size
    / 2 and block_size tokens, where the simple loop sees block_size; both are correct. (Keeping
    more would refill more often, less would forget more.) With block_size 4 and the prompt "ab":
    a b draw c; c draws d; d draws e and the cache is full; so "de" goes in at 0 and 1, draws f."""
    block_size, device = model.config.block_size, context.device
    # pending: the tokens not in the cache yet: the prompt, then each new token (after a refill, the newest half)
    cache, pending = KVCache(model.config, context.size(0)), context
    forward = CachedForward(model)  # model(x, kv_cache=cache)[0], made faster for one new token: section 8
    for _ in range(max_new_tokens):
        if cache.length + pending.size(1) > block_size:  # the cache is full: refill it with the newest half
            pending = context[:, -max(1, block_size // 2):]  # (B, block_size // 2)
            cache.clear()
        # The prompt (or a refill) in one pass; after that, only the new token's position.
        logits = forward(pending, cache)  # (B, T_pending, V)
        next_id = draw(logits[:, -1, :])  # (B, V) -> (B, 1)
        yield next_id
        pending = next_id.to(device)
        context = torch.cat([context, pending], dim=1)[:, -block_size:]  # (B, T + 1), cropped to block_size


@torch.inference_mode()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, kv_cache=True,
                    generator=None):
    """Yield max_new_tokens new token ids, each (B, 1) on the CPU, one at a time. While the text
    fits in block_size, both loops compute the same thing: the same tokens in float64 (a test
    checks it); in lower precision, rounding can make a drawn token differ now and then."""
    check_sampling_settings(temperature, top_k, top_p, prompt=idx)  # one clear error for a bad value: section 13

    def draw(logits):  # (B, V) -> (B, 1)
        return sample_next_token(logits, temperature, top_k, top_p, generator)

    loop = sample_with_kv_cache if kv_cache else sample_by_recomputing
    was_training = model.training
    model.eval()  # no dropout while sampling; the model gets back its mode at the end
    try:
        yield from loop(model, idx[:, -model.config.block_size:], max_new_tokens, draw)  # (B, T) the visible tokens
    finally:
        model.train(was_training)


# ==== Part II: making it real =================================================================
#
# Everything above is the GPT. What follows makes it fast, safe and usable:
#    7. Devices          CPU / CUDA / Apple MPS, and the number formats (float32, bfloat16, float16)
#    8. Speed            which attention runs where, the KV cache's format, a flat one-token step,
#                        FLOPs and MFU, with the measurements behind each choice
#    9. Data files       reading a text file, with a clear error for each way it can be wrong
#   10. Checkpoints      one file holds everything needed to sample or to resume; atomic saves
#   11. GPT-2's files    OpenAI's released weights (safetensors) read into GPT, the download,
#                        and the BPE files offline
#   12. Training runs    settings, resuming, fine-tuning, logging with an ETA, Ctrl-C, divergence
#   13. Sampling runs    the `sample` command: settings, the safe draw, text streamed token by token
#   14. Pictures         loss.svg from every run; `inspect`: next-token probabilities, attention.svg
#   15. Benchmark        how fast this machine trains and samples
#   16. Command line     `train`, `sample`, `inspect` and `bench`, and one-line errors
# Timings quoted in Part II were measured on the 2-core CPU described in README.md.

# Part II's own tools from the standard library (Part I needs only the imports at the top).
import argparse  # noqa: E402
import codecs  # noqa: E402
import contextlib  # noqa: E402
import torch.distributed as dist  # noqa: E402
import ctypes  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import mmap  # noqa: E402
import re  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from dataclasses import field  # noqa: E402
from xml.sax.saxutils import escape as xml_escape  # noqa: E402


# Errors, checks, progress and settings that are flags, for every section below (and the few
# checks Part I calls).

class GPTError(ValueError):
    """A problem a person can act on (a bad flag, an unreadable file, a diverged run): the command
    line prints it as one line, without a traceback. A bug in gpt.py still shows its traceback."""


def require(condition, message):
    if not condition:
        raise GPTError(message)


LOG_EVERY_SECONDS = 3  # a long job is never silent for longer


def log(message, end="\n"):
    """Progress and diagnostics go to stderr; stdout carries only sampled text (and bench's table).
    With several processes (torchrun, section 12) only the first one speaks."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, end=end, flush=True)


def duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def option(default, help, **argparse_kwargs):
    """A dataclass field that is also a command-line flag: its default and its --help text."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def flag(name):
    """A field name as its command-line flag: block_size -> block-size."""
    return name.replace("_", "-")


def check_writable(out_dir, flag_name="--out-dir"):
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise GPTError(f"cannot write to {flag_name} {str(out_dir)!r}: {e.strerror or e}") from None
from pathlib import Path  # noqa: E402


# ---- 7. Devices and number formats -----------------------------------------------------------
#
# The same code runs on a CPU, an NVIDIA GPU (CUDA) and an Apple GPU (MPS). Mixed precision
# runs the matmuls in a 16-bit format while the weights and the optimizer stay in float32.
# bfloat16 keeps float32's range (8 exponent bits) with fewer digits, so it needs no loss
# scaling; float16 has more digits but a small range, so its gradients must be scaled up to
# avoid underflow (a GradScaler: train_step, section 5). Which one `--dtype auto` picks, and why:
#   CUDA: bfloat16 where the GPU supports it (Ampere and newer), else float16.
#   CPU:  bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX); there a bfloat16
#         matmul runs 2.2x faster than a float32 one. Elsewhere float32: emulated bfloat16 is
#         slower than float32.
#   MPS:  float32. We have not measured half precision on Apple GPUs, and float16 training
#         there is refused (check_training_dtype).
#
# None of this has run here on a GPU: the project's machines have none. The device-specific
# decisions below are small functions so that tests on a CPU can check them with device
# objects (torch.device("mps") needs no Apple GPU to exist).

def pick_device(name):
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device("cuda" if available["cuda"] else "mps" if available["mps"] else "cpu")
    require(name in available, f"unknown device {name!r}: expected auto, cpu, cuda or mps")
    require(available[name], f"device {name!r} is not available on this machine "
            f"(available: {', '.join(d for d, ok in available.items() if ok)})")
    return torch.device(name)


def cpu_has_native_bfloat16():
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def pick_dtype(name, device):
    if name == "auto":
        if device.type == "cuda":  # native bfloat16 only: older GPUs would emulate it, slowly
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        if device.type == "cpu" and cpu_has_native_bfloat16():
            return torch.bfloat16
        return torch.float32
    require(name in DTYPES, f"unknown dtype {name!r}: expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def autocast(device, dtype):
    """Run the matmuls in dtype (mixed precision); float32 needs no context at all."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def non_blocking_copies(device):
    """Whether a copy to device may return before it is done. Only on CUDA, where the copy then
    overlaps with the GPU's work. On Apple's MPS a non-blocking copy from a temporary CPU tensor
    could read freed memory in torch releases before 2.13 (pytorch issues 139550, 189690):
    silently corrupted batches. On a CPU there is nothing to overlap."""
    return device.type == "cuda"


def to_device(x, device):
    return x.to(device, non_blocking=non_blocking_copies(device))


def use_fused_adamw(params):
    """Whether AdamW may use its fused kernel: every parameter a floating-point tensor on a device
    that has one in this torch (MPS's came after 2.4). Decided up front, from the list that
    torch's own step() checks, because torch checks only in the first step()."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # private, hence the fallback
        devices = _get_fused_kernels_supported_devices()
    except ImportError:  # a torch that moved it: the devices that have had the kernel since 2.4
        devices = ["cpu", "cuda"]
    return all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def check_training_dtype(dtype, device):
    """float16 training on Apple's MPS is refused: autocast there is missing in torch 2.4, the
    GradScaler's unscale_ fails in 2.5 to 2.7 (pytorch issue 142397), and the fused MPS Adam
    ignored the scaler's overflow flag until mid 2026, so an overflow step (routine at the
    scaler's first scales) turns the weights into NaN."""
    require(not (device.type == "mps" and dtype == torch.float16), "--dtype float16 cannot train on Apple's "
            "MPS (its loss scaling has been broken in several torch releases): use --dtype bfloat16 or float32")


def synchronize(device):
    """Wait for the GPU to finish what it was given: timings need it (on a CPU, work is never queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


# ---- 8. Speed --------------------------------------------------------------------------------
#
# Part I computes the same thing on every machine; the choices here change only how fast (or,
# for one device bug, whether it is right), each with the measurement behind it. Measured with
# torch.profiler and timed loops on the 2-core AVX-512 CPU of README.md.
#
# - Which attention: use_fused_attention, below.
# - Dropout on a CPU: dropout, below, which halves what F.dropout adds to a training step there.
# - Two details of causal_attention_written_out (section 4) are for speed. It divides q by
#   sqrt(hs) before the matmul: the same scores up to rounding, computed on a tensor Tk / hs
#   times smaller than the scores. And it adds the causal mask in place: no second
#   (B, nh, Tq, Tk) tensor, and the backward pass of an addition is free, where a masked_fill
#   would mask the gradient again; the matmul's backward does not need its own output, so
#   overwriting it is safe.
# - The KV cache's number format (kv_cache_dtype), a matmul kernel for one row (onednn_off) and
#   a flat one-token step (OneTokenStep) make sampling with the cache fast; CachedForward is
#   how the sampler (section 6) calls them.
# - RoPE's angles are computed once per model and device (rope_for).
# - FLOPs per token and the hardware's peak give the MFU that training logs.

def use_fused_attention(q, dropout_p=0.0):
    """Which attention CausalSelfAttention runs. The fused kernel, except in three cases:
    - Apple's MPS in half precision: its is_causal kernel has let half-precision tokens see the
      future (pytorch issue 195910); the written-out version is correct there. In float32
      (what `--dtype auto` picks on MPS) the fused kernel runs, which can spare the memory of
      the written-out version's (B, nh, T, T) weights (README.md, "Devices").
    - Training in bfloat16 on a CPU with a context up to 512: PyTorch's fused CPU kernel is slow
      to differentiate in bfloat16. Forward + backward of one layer of the default model
      (B 16, nh 8, T 256, hs 32) took 41 ms fused and 27 ms written out on a 2-core AVX-512 CPU;
      in float32, or at T = 1024, the fused kernel is the faster one.
    - Training with dropout on a CPU: the fused kernel drops attention weights with F.dropout,
      the written-out version with our faster dropout (below). A training step of the
      quick-start model at dropout 0.1 in float32 took 136 ms fused, 110 ms written out.
    """
    if q.device.type == "mps":
        return q.dtype == torch.float32
    if q.device.type == "cpu" and torch.is_grad_enabled():  # training on a CPU
        return dropout_p == 0 and (q.dtype != torch.bfloat16 or q.size(-2) > 512)
    return True


def kv_cache_dtype(k):
    """The KV cache's number format for keys k. On a CPU at least float32, whatever the weights
    are: there, attention of one query to 200 cached positions (8 heads of 32) took 55 us in
    bfloat16 and 18 us in float32. On a GPU the model's own (half the memory; not measured)."""
    return torch.promote_types(k.dtype, torch.float32) if k.device.type == "cpu" else k.dtype


def dropout(x, p, training):
    """F.dropout(x, p, training), made faster on a CPU. Dropout zeroes each entry with probability
    p and scales the rest by 1 / (1 - p), so that the mean stays. On a CPU, F.dropout draws a
    random float per entry, about 6 ns each: at dropout 0.1 the quick-start model's training step
    took 104 ms against 54 without dropout. Here one 64-bit draw gives four 16-bit random
    numbers, and an entry is kept when its number is at least p * 65536 counted from the bottom
    of the int16 range: p is rounded to a multiple of 1/65536 (0.1 becomes 0.100006). The same
    step took 75-79 ms. On a GPU, F.dropout is already fast: it runs there."""
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p)
    return CPUDropout.apply(x, p)


class CPUDropout(torch.autograd.Function):
    """dropout on a CPU: y = x * mask, with mask 0 or 1 / (1 - p) in x's number format; the
    gradient is the incoming one times the same mask (F.dropout keeps such a mask too)."""

    @staticmethod
    def forward(ctx, x, p):
        n = x.numel()
        # From torch's CPU generator, as F.dropout's draws: --seed and the checkpoints' saved random
        # state cover them. Both ends of the int64 range: random_() alone leaves each top bit 0.
        draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2**63, 2**63 - 1)
        numbers = draws.view(torch.int16)[:n].view(x.shape)  # 4 per draw, each in [-32768, 32767]
        kept = numbers >= -32768 + round(p * 65536)
        scale, zero = torch.tensor(1 / (1 - p), dtype=x.dtype), torch.zeros((), dtype=x.dtype)
        mask = torch.where(kept, scale, zero)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


@contextlib.contextmanager
def onednn_off(when):
    """One new token makes every matmul a vector-matrix product. PyTorch hands bfloat16 matmuls
    on a CPU to oneDNN, whose setup per call costs more than the product itself when the input
    is one row; PyTorch's own kernel is faster there: the 24 vector-matrix products in the
    default model's blocks took 1.2 ms through oneDNN and 0.5 ms without it. For matrix-matrix
    products (reading a prompt, training) oneDNN is the fast one."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = previous and not when
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


class OneTokenStep:
    """model(idx, kv_cache=cache) for one new token per row, written flat for speed.

    With a KV cache each step computes a single position, and the arithmetic becomes so small
    that Python's own work is a large part of the cost: every nn.Module call and every lookup
    of a submodule or a weight on a module (self.c_attn, .weight) goes through PyTorch's Python
    code: 59 calls and 135 lookups per token for the default model. This is the same
    computation as GPT.forward with T = 1, op for op, as one loop over weights looked up once:
    a step of the default model in bfloat16 took 1.10 ms instead of 1.52 ms (median over 12
    runs of 255 steps). A test checks that it gives exactly the logits and the cache that
    GPT.forward gives. It is for sampling: no dropout (the model in eval mode).
    """

    def __init__(self, model):
        t = model.transformer
        self.wte, self.ln_f = t.wte.weight, (t.ln_f.weight, t.ln_f.bias)
        self.wpe = t.wpe.weight if model.config.pos == "learned" else None
        self.model = model if model.config.pos == "rope" else None  # with RoPE: for its angles
        self.head, self.n_head = model.lm_head.weight, model.config.n_head  # head: wte, tied
        self.block_size = model.config.block_size
        # Per block: the (weight, bias) of its six layers, in the order the loop uses them, and
        # which attention to run. (LayerNorm's eps is the default 1e-5, as in Block.)
        self.layers = [([(m.weight, m.bias) for m in (b.ln_1, b.attn.c_attn, b.attn.c_proj, b.ln_2, b.mlp.c_fc,
                                                      b.mlp.c_proj)], b.attn.attention) for b in t.h]

    def __call__(self, idx, cache):
        """idx (B, 1), the new token of each row -> logits (B, 1, V); the cache grows by one."""
        B, C, nh = idx.size(0), self.wte.size(1), self.n_head
        hs = C // nh
        if cache.length >= self.block_size:
            raise ValueError(f"the KV cache is full: the model has positions for {self.block_size} tokens")
        if self.model is None:
            x, rope = F.embedding(idx, self.wte) + self.wpe[cache.length], None  # (B, 1, C) + (C,): token + position
        else:
            x, rope = F.embedding(idx, self.wte), rope_for(self.model, torch.tensor([cache.length], device=idx.device))
        for layer, ((ln_1, c_attn, attn_proj, ln_2, c_fc, mlp_proj), choice) in enumerate(self.layers):
            # attention: x = x + attn(ln_1(x)), as in CausalSelfAttention.forward
            qkv = F.linear(F.layer_norm(x, (C,), *ln_1), *c_attn)  # (B, 1, 3C)
            # The same views as the model's split, view and transpose, in three calls instead of seven.
            q, k, v = qkv.view(B, 1, 3, nh, hs).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, nh, 1, hs)
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (B, nh, 1, hs) each
            k, v = cache.store(layer, k, v)  # 2 x (B, nh, T_past + 1, hs)
            fused = use_fused_attention(q) if choice == "auto" else choice == "fused"
            attention = causal_attention_fused if fused else causal_attention_written_out
            y = attention(q.to(k.dtype), k, v).to(q.dtype)  # (B, nh, 1, hs)
            x = x + F.linear(y.transpose(1, 2).reshape(B, 1, C), *attn_proj)  # (B, nh, 1, hs) -> (B, 1, C) -> (B, 1, C)
            # MLP: x = x + mlp(ln_2(x))
            h = F.gelu(F.linear(F.layer_norm(x, (C,), *ln_2), *c_fc), approximate="tanh")  # (B, 1, 4C)
            x = x + F.linear(h, *mlp_proj)  # (B, 1, C)
        return F.linear(F.layer_norm(x, (C,), *self.ln_f), self.head)  # (B, 1, C) -> (B, 1, V)


class CachedForward:
    """model(idx, kv_cache=cache)[0] as sampling uses it (section 6): the model's own forward for
    a prompt, and for one new token the flat OneTokenStep with PyTorch's own matmul kernel."""

    def __init__(self, model):
        self.model, self.one_token_step = model, OneTokenStep(model)

    def __call__(self, idx, cache):
        if idx.size(1) > 1:
            return self.model(idx, kv_cache=cache)[0]  # (B, T, V)
        with onednn_off(when=idx.device.type == "cpu"):
            return self.one_token_step(idx, cache)  # (B, 1, V)


def rope_for(model, pos):
    """RoPE's cos and sin (section 4) for the positions pos (T,), each (T, hs/2). Those of all
    block_size positions are computed once per device and kept in model.rope_cache (not in its
    state: checkpoints hold no angles), in float32, or float64 for a float64 model."""
    key = (pos.device, torch.promote_types(model.transformer.wte.weight.dtype, torch.float32))
    if key not in model.rope_cache:
        cos_sin = rope_angles(torch.arange(model.config.block_size), model.config.n_embd // model.config.n_head)
        model.rope_cache[key] = [t.to(*key) for t in cos_sin]  # 2 x (block_size, hs/2)
    return [t[pos] for t in model.rope_cache[key]]  # 2 x (T, hs/2)


def flops_per_token(model):
    """Floating-point operations to train on one token, forward and backward (PaLM paper,
    appendix B; nanoGPT): 6 per parameter (2 forward, 4 backward: a weight's multiply-add, then
    the gradients of its input and of itself), counting every parameter but the position
    embedding, which is a lookup (the tied token embedding counts once, as lm_head); plus the
    attention scores and their weighted sum, 12 * L * T * C. The biases and LayerNorm gains are
    not matmul weights: counting them overstates the FLOPs by 0.4% in the default model."""
    c = model.config
    n_matmul = model.num_parameters() - (model.transformer.wpe.weight.numel() if c.pos == "learned" else 0)
    return 6 * n_matmul + 12 * c.n_layer * c.block_size * c.n_embd


PUBLISHED_PEAKS = {  # dense bf16/fp16 tensor-core FLOP/s per GPU, from NVIDIA's datasheets; SXM unless named
    "H100": 989e12, "H100 PCIE": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H200 NVL": 835e12,
    "H800": 989e12, "H800 PCIE": 756e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10": 125e12, "V100": 125e12, "V100 PCIE": 112e12, "T4": 65e12,
}


def published_peak_flops(card):
    """A CUDA card's name -> its published dense 16-bit peak, or None if it is not listed. Whole
    words only: "NVIDIA RTX A1000" is no A100, "NVIDIA T400" no T4; "NVL" and "PCIe" pick the variant."""
    words = re.split(r"[^A-Z0-9]+", card.upper())  # "NVIDIA A100-SXM4-40GB" -> NVIDIA, A100, SXM4, 40GB
    for family in words:
        for variant in ("NVL", "PCIE"):
            if variant in words and f"{family} {variant}" in PUBLISHED_PEAKS:
                return PUBLISHED_PEAKS[f"{family} {variant}"]
        if family in PUBLISHED_PEAKS:
            return PUBLISHED_PEAKS[family]
    return None


def measure_peak_flops(device, dtype):
    """The FLOP/s the hardware could reach in dtype, for the MFU (model FLOPs utilisation)
    figure. On a listed GPU in 16 bits, the card's published dense peak; otherwise a probe: the
    best of a few large matmuls, which is what a training step mostly does. On an NVIDIA GPU
    they are 8192 wide, so that launching them costs little next to computing them."""
    if device.type == "cuda" and dtype != torch.float32:
        peak = published_peak_flops(torch.cuda.get_device_name(device))
        if peak is not None:
            return peak
    n = {"cpu": 1024, "mps": 2048}.get(device.type, 8192)
    generator = torch.Generator().manual_seed(0)  # its own: the probe must not move the training's random state
    a, b = (torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))
    best = float("inf")
    for _ in range(10):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 4)
    return 2 * n**3 / best


def mfu(flops_per_second, peak):
    """Model FLOPs utilisation: the share of the peak that the model's FLOPs used. Never above 1:
    a model that did better than the peak shows the peak was too low (a probe can be)."""
    return flops_per_second / max(peak, flops_per_second)


# ---- 9. Data files ---------------------------------------------------------------------------
#
# What can be wrong with a text to train on, each with one clear error: the file (missing,
# a folder, unreadable, empty, not UTF-8), a character the vocabulary lacks, a text too short.
#
# A text is read whole and encoded at the start of training: fine for a few hundred MB, not
# for a corpus of tens of GB. `python gpt.py prepare` encodes a text once into a token file
# that `train --data` memory-maps: the operating system reads in only the pages that batches
# touch, so the training process's own memory does not grow with the corpus. The file
# describes itself:
#     8 bytes        TOKEN_FILE_MAGIC
#     8 bytes        N, the length of a JSON header (a little-endian unsigned integer)
#     N bytes        {"format": 1, "tokenizer": {...}, "dtype": "uint16" or "uint32",
#                     "tokens": count, "source": file name, "source_bytes": its size}, padded
#                    with spaces so that the tokens start at a multiple of 64 bytes
#     the rest       the token ids, little-endian: uint16 while the vocabulary fits (GPT-2's
#                    50,257 does), else uint32
# prepare reads and encodes the text a chunk at a time, so its memory is bounded whatever the
# file's size, and the tokens are exactly tokenizer.encode(whole text): BPE never merges across
# a cut made just before whitespace that follows a non-whitespace character (GPT-2's
# pre-tokenizer always splits there), and a character is one token whatever the cut.

def check_data_file(path):
    require(path.exists(), f"data file {str(path)!r} does not exist")
    require(not path.is_dir(), f"data file {str(path)!r} is a directory, not a text file")


def read_text(path):
    """Read a UTF-8 text file, with a clear error for every way it can be wrong."""
    path = Path(path)
    check_data_file(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise GPTError(f"cannot read data file {str(path)!r}: {e.strerror}") from None
    require(raw, f"data file {str(path)!r} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise GPTError(f"data file {str(path)!r} is not UTF-8 text: byte {e.start} (line {line}) "
                       f"is {raw[e.start:e.start + 1]!r}; save it as UTF-8") from None


def tokenizer_to_dict(tokenizer):
    if tokenizer.kind == "char":
        return {"kind": "char", "chars": tokenizer.chars}
    return {"kind": "bpe", "encoding": "gpt2"}


def tokenizer_from_dict(d):
    require(isinstance(d, dict), f"unknown tokenizer {d!r}: expected a dict with kind 'char' or 'bpe'")
    if d.get("kind") == "char":
        return CharTokenizer(d["chars"])
    if d.get("kind") == "bpe":
        return BPETokenizer()
    raise GPTError(f"unknown tokenizer {d!r}: expected kind 'char' or 'bpe'")


TOKEN_FILE_MAGIC = b"GPTTOKS1"
PREPARE_CHUNK_BYTES = 8 << 20  # 8 MB of text at a time: tiktoken's lists of ids for it take about 80 MB
LONGEST_UNCUT = 128 << 20  # text without a place to cut is held whole: up to this much
SAFE_CUT = re.compile(r"\S[ \t\n\r]")  # a non-whitespace character, then whitespace: cut between them


def is_token_file(path):
    try:
        with open(path, "rb") as f:
            return f.read(len(TOKEN_FILE_MAGIC)) == TOKEN_FILE_MAGIC
    except OSError:
        return False


class TokenArray:
    """Token ids in a memory-mapped file, as get_batch (section 3) indexes them: len(), slices,
    and a tensor of positions -> int64 ids. The file's uint16 (uint32) ids are read as int16
    (int32), same bits, since torch before 2.5 cannot index uint16; & 0xFFFF restores them."""

    def __init__(self, values, buffer):
        self.values, self.buffer = values, buffer  # (N,) int16 or int32, a view of the memory map buffer

    def __len__(self):
        return len(self.values)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TokenArray(self.values[index], self.buffer)
        if index.dim() == 2 and bool((index[:, 1:] - index[:, :-1] == 1).all()):  # windows, as get_batch asks
            # Row by row: torch's indexing kernels read far more of a memory map than the ids they
            # gather (about 1.4 GB of a 2 GB file for one batch here); slices read what they return.
            ids = torch.stack([self.released(self.values[int(row[0]):int(row[0]) + index.size(1)].clone())
                               for row in index]).long()  # B x (T+1,) -> (B, T+1)
        else:
            ids = self.released(self.values[index].long())  # index's shape, int64
        return ids & 0xFFFF if self.values.dtype == torch.int16 else ids

    def released(self, copied):
        """The pages just read stay mapped into this process, and the kernel maps whole runs of
        them at once (about 1.7 MB a window here): let them go, or a long run's memory would grow
        towards the file's size. They stay in the page cache; this costs microseconds."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self.buffer.madvise(mmap.MADV_DONTNEED)
        return copied


def read_token_file(path):
    """A file written by prepare -> (its header, a TokenArray of its tokens, memory-mapped)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            f.seek(len(TOKEN_FILE_MAGIC))
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: never written back
    except (OSError, ValueError) as e:
        raise GPTError(f"cannot read {str(path)!r} as a token file ({e})".splitlines()[0]) from None
    if hasattr(mmap, "MADV_RANDOM"):  # batches are random windows: read no more of the file around each
        buffer.madvise(mmap.MADV_RANDOM)
    dtype = {"uint16": torch.int16, "uint32": torch.int32}.get(header.get("dtype"))
    start = len(TOKEN_FILE_MAGIC) + 8 + header_size
    require(header.get("format") == 1 and dtype is not None and isinstance(header.get("tokens"), int)
            and start + header["tokens"] * dtype.itemsize == size,
            f"{path} is not a complete token file (truncated, or written by another program)")
    values = torch.frombuffer(buffer, dtype=dtype, count=header["tokens"], offset=start) if header["tokens"] else \
        torch.empty(0, dtype=dtype)  # (N,)
    return header, TokenArray(values, buffer)


def split_tokens(tokens, block_size):
    """split_data (section 3) for a TokenArray: the same 90/10 split, without copying."""
    n_train = int(0.9 * len(tokens))
    train, val = tokens[:n_train], tokens[n_train:]
    check_long_enough(len(tokens), len(val), block_size)
    return train, val


def text_chunks(path, chunk_bytes=None, progress=None):
    """Yield the UTF-8 text of path in pieces of about chunk_bytes, each ending just before
    whitespace that follows a non-whitespace character (or at the end of the file): cuts that no
    tokenizer here can tell from the whole text. progress(bytes read) is called after each read."""
    path, chunk_bytes = Path(path), chunk_bytes or PREPARE_CHUNK_BYTES
    check_data_file(path)
    decoder, pending, done, lines = codecs.getincrementaldecoder("utf-8")(), "", 0, 0
    try:
        with open(path, "rb") as f:
            while raw := f.read(chunk_bytes):
                held = decoder.getstate()[0]  # the bytes of a character cut by the last read
                try:
                    pending += decoder.decode(raw)
                except UnicodeDecodeError as e:  # e.start counts from the held bytes
                    where, seen = done - len(held) + e.start, held + raw
                    line = lines + seen[len(held):max(e.start, len(held))].count(b"\n") + 1
                    raise GPTError(f"data file {str(path)!r} is not UTF-8 text: byte {where} (line {line}) is "
                                   f"{seen[e.start:e.start + 1]!r}; save it as UTF-8") from None
                done, lines = done + len(raw), lines + raw.count(b"\n")
                if progress:
                    progress(done)
                cut = max((m.start() + 1 for m in SAFE_CUT.finditer(pending, max(0, len(pending) - chunk_bytes))),
                          default=0)
                if cut:
                    yield pending[:cut]
                    pending = pending[cut:]
                require(len(pending) < LONGEST_UNCUT, f"data file {str(path)!r} has over {LONGEST_UNCUT >> 20} MB "
                        f"without whitespace after a word: prepare cuts the text there, to bound its memory")
            held = decoder.getstate()[0]
            pending += decoder.decode(b"", final=True)
    except OSError as e:
        raise GPTError(f"cannot read data file {str(path)!r}: {e.strerror}") from None
    except UnicodeDecodeError:  # the file ends inside a character
        raise GPTError(f"data file {str(path)!r} is not UTF-8 text: it ends inside a character, at byte "
                       f"{done - len(held)} ({held!r}); save it as UTF-8") from None
    require(done, f"data file {str(path)!r} is empty")
    if pending:
        yield pending


def encode_chunk(tokenizer, text, lookup=None):
    """text -> its token ids as a 1-D tensor. Characters: each character's code point looked up in
    lookup, a tensor over all code points. BPE: tiktoken's batch encoding on several threads,
    over pieces cut where text_chunks cuts."""
    if tokenizer.kind == "char":
        code_points = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()  # (n,)
        return lookup[code_points]  # (n,)
    pieces, start = [], 0
    for m in SAFE_CUT.finditer(text, 1 << 20):  # about 1 MB a piece, for the threads
        if m.start() + 1 - start >= 1 << 20:
            pieces.append(text[start:m.start() + 1])
            start = m.start() + 1
    pieces.append(text[start:])
    ids = tokenizer.encoding.encode_batch(pieces, num_threads=os.cpu_count() or 1, allowed_special="all")
    return torch.cat([torch.tensor(piece, dtype=torch.int32) for piece in ids])  # (n,)


@dataclass
class PrepareConfig:
    data: str = option("input.txt", "UTF-8 text file to encode")
    tokenizer: str = option("char", "char: one token per character; bpe: GPT-2's 50,257 tokens", choices=("char", "bpe"))
    out: str = option(None, "the token file to write", default_text="the data file's name + .tokens")


class Progress:
    """A line on stderr every LOG_EVERY_SECONDS: how far, how fast, and when it will be done."""

    def __init__(self, what, total_bytes):
        self.what, self.total, self.start, self.last = what, total_bytes, time.perf_counter(), 0.0

    def __call__(self, done, note=""):
        now = time.perf_counter()
        if now - self.last >= LOG_EVERY_SECONDS or done == self.total:
            rate = done / max(now - self.start, 1e-9)
            log(f"{self.what}: {done / 1e6:,.1f} of {self.total / 1e6:,.1f} MB, {rate / 1e6:,.1f} MB/s{note}, "
                f"ETA {duration((self.total - done) / max(rate, 1e-9))}")
            self.last = now


def prepare(cfg):
    """Encode cfg.data into a token file (see this section's opening). -> its path."""
    source, out = Path(cfg.data), Path(cfg.out or cfg.data + ".tokens")
    check_data_file(source)
    check_writable(out.parent, "--out")  # before the work, not after it
    size = source.stat().st_size
    if cfg.tokenizer == "char":  # a first pass for the vocabulary: the sorted set of characters
        chars = set()
        for chunk in text_chunks(source, progress=Progress("collecting the characters", size)):
            chars.update(chunk)
        tokenizer = CharTokenizer(sorted(chars))
        lookup = torch.full((max(map(ord, chars)) + 1,), -1, dtype=torch.int32)  # code point -> id
        lookup[torch.tensor([ord(ch) for ch in tokenizer.chars])] = torch.arange(tokenizer.vocab_size, dtype=torch.int32)
    else:
        tokenizer, lookup = BPETokenizer(), None
    wide = tokenizer.vocab_size > 1 << 16
    header = {"format": 1, "tokenizer": tokenizer_to_dict(tokenizer), "dtype": "uint32" if wide else "uint16",
              "tokens": 10**19, "source": source.name, "source_bytes": size}  # 10**19: room for any count
    start = -(-(len(TOKEN_FILE_MAGIC) + 8 + len(json.dumps(header))) // 64) * 64  # the tokens start here
    tmp, count = out.with_name(f".{out.name}.{os.getpid()}.tmp"), 0
    try:
        with open(tmp, "wb") as f:
            f.seek(start)
            progress = Progress(f"encoding ({tokenizer.kind})", size)
            for chunk in text_chunks(source, progress=lambda done: progress(done, f", {count:,} tokens")):
                ids = encode_chunk(tokenizer, chunk, lookup).to(torch.int32 if wide else torch.int16)  # uint16's bits
                f.write(ctypes.string_at(ids.data_ptr(), ids.numel() * ids.element_size()))
                count += ids.numel()
            text = json.dumps({**header, "tokens": count})
            f.seek(0)
            f.write(TOKEN_FILE_MAGIC + (start - len(TOKEN_FILE_MAGIC) - 8).to_bytes(8, "little")
                    + text.ljust(start - len(TOKEN_FILE_MAGIC) - 8).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)  # only a finished file has the name
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise GPTError(f"could not write {out}: {e.strerror or e}") from None
        raise
    log(f"wrote {out}: {count:,} {tokenizer.kind} tokens from {size / 1e6:,.1f} MB of text")
    return out


def check_characters(tokenizer, text):
    """CharTokenizer.encode's check (section 2): every character of text is in the vocabulary."""
    unknown = sorted(set(text) - tokenizer.index.keys())
    if unknown:
        shown = ", ".join(repr(ch) for ch in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        raise GPTError(f"the character vocabulary ({len(tokenizer.chars)} characters of the training text) lacks "
                       f"{len(unknown)} character(s) of this text: {shown}")


def check_long_enough(n_tokens, n_val, block_size):
    """split_data's check (section 3): both splits hold a window of block_size + 1 tokens."""
    need = 10 * (block_size + 1) + 10  # the 10% validation split then holds one window (+ 10: a margin)
    require(n_tokens - n_val > block_size and n_val > block_size, f"the data has {n_tokens} tokens: too short "
            f"for one window of block_size + 1 = {block_size + 1} tokens in both the training split (90%) and the "
            f"validation split (10%); give a text of at least {need} tokens or a smaller --block-size")


# ---- 10. Checkpoints -------------------------------------------------------------------------
#
# One torch.save'd dict holds everything needed to sample or to continue training:
#     format            the version of this layout (CHECKPOINT_FORMAT)
#     model_state       the weights (the plain module's names: no "_orig_mod." from --compile)
#     config            the GPTConfig, as a plain dict
#     tokenizer         {"kind": "char", "chars": ...} or {"kind": "bpe", "encoding": "gpt2"}
#     step, loss        optimizer steps done, and the training loss of the last one
#     best_val_loss     the best validation loss so far; history: every evaluation
#     optimizer_state   AdamW's moments; scaler_state for float16
#     train_args        every training setting; rng: every random generator's state
#
# Files are loaded with weights_only=True: only tensors and plain Python data, never code, so
# opening a checkpoint someone sent you cannot run anything. A save goes to a temporary file in
# the same folder, is flushed to disk, and then renamed over the old file in one step
# (os.replace), so a crash or a kill at any moment leaves the old checkpoint or the new one.

CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("format", "model_state", "config", "tokenizer", "step", "loss")


def save_checkpoint(checkpoint, path, also=None):
    """Write checkpoint to path atomically; with `also`, give the same file a second name (a hard
    link: a 1.5 GB GPT-2 checkpoint is then written once, not twice)."""
    path = Path(path)
    for leftover in path.parent.glob(".*.pt.*.tmp"):  # left by a save that was killed halfway
        leftover.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them "the" checkpoint
        if also is not None:
            second = also.with_name(f".{also.name}.{os.getpid()}.tmp")
            try:
                os.link(tmp, second)
            except OSError:  # a file system without hard links: a second copy
                shutil.copyfile(tmp, second)
        os.replace(tmp, path)
        if also is not None:  # after path: a kill in between leaves `also` older, never newer, than path
            os.replace(second, also)
    except BaseException as e:
        for leftover in path.parent.glob(f".*.{os.getpid()}.tmp"):
            leftover.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise GPTError(f"could not write {path}: {e.strerror or e}; the previous checkpoints are untouched") from None
        raise
    if os.name == "posix":  # make the renames themselves durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def load_checkpoint(path, device="cpu"):
    """Read a checkpoint as data only, with a clear error for each way a file can be wrong."""
    path = Path(path)
    require(path.exists(), f"checkpoint {str(path)!r} does not exist; train one with: "
            f"python gpt.py train --out-dir {path.parent}")
    require(path.is_file(), f"checkpoint {str(path)!r} is not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise GPTError(f"cannot read checkpoint {path}: {e.strerror}") from None
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles; the one-line error below says more
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch.load raises many types; each means "not a readable checkpoint"
        if "Weights only load failed" in str(e):
            raise GPTError(f"refused to load {path}: it holds Python objects that could run code when "
                           f"unpickled, and gpt.py loads checkpoints as data only") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GPTError(f"{path} is not a readable checkpoint (truncated, or not written by gpt.py): {reason}") from None
    require(isinstance(checkpoint, dict), f"{path} is not a gpt.py checkpoint: it holds a {type(checkpoint).__name__}")
    version = checkpoint.get("format")
    require(version == CHECKPOINT_FORMAT, f"{path} has checkpoint format {version!r}; this gpt.py reads format "
            f"{CHECKPOINT_FORMAT}")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    require(not missing, f"{path} is not a complete checkpoint: it lacks {', '.join(missing)}")
    return checkpoint


def model_from_checkpoint(checkpoint, path="checkpoint"):
    """-> (GPT with the checkpoint's weights, its tokenizer)."""
    try:
        model = GPT(GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model_state"])
    except (TypeError, RuntimeError, KeyError) as e:
        raise GPTError(f"{path}: its weights do not fit its config ({str(e).splitlines()[0]})") from None
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
    require(tokenizer.vocab_size == model.config.vocab_size, f"{path}: the tokenizer has {tokenizer.vocab_size} "
            f"tokens but the model {model.config.vocab_size}")
    return model, tokenizer


# ---- 11. GPT-2's files: the released weights, and the BPE files offline ----------------------
#
# OpenAI released GPT-2 in four sizes; the Hugging Face hub serves them as two files:
# config.json (the shape) and model.safetensors (the weights). The safetensors format is
# simple enough to read by hand, and it holds only numbers, so a file from a stranger cannot
# run code:
#
#     8 bytes        N, the length of the header (a little-endian unsigned integer)
#     N bytes        a JSON header: {tensor name: {"dtype": "F32", "shape": [768, 2304],
#                                     "data_offsets": [begin, end]}, "__metadata__": {...}}
#     the rest       the raw bytes of every tensor, at its offsets
#
# The names are ours, with or without the "transformer." prefix (h.0.attn.c_attn.weight, ...):
# our parameter names follow Hugging Face's checkpoints. One difference: GPT-2's code computes
# its linear layers with a "Conv1D" that stores the weight as (in, out), where nn.Linear stores
# (out, in). So the four matrices of each block (attn.c_attn, attn.c_proj, mlp.c_fc,
# mlp.c_proj) are transposed on the way in. The embeddings are lookups, not Conv1D, and need
# no transposing; lm_head is the token embedding, so it is not stored separately.

GPT2_SIZES = {  # name: (n_layer, n_head, n_embd); all four have 1024 positions and 50257 tokens
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
GPT2_URL = "https://huggingface.co/openai-community/{name}/resolve/main/{file}"
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}. The tensors are views of a memory map of the
    file: nothing is read from disk until a tensor is used."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size)) if 8 + header_size <= size else None
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: writable, never written back
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise GPTError(f"cannot read {str(path)!r} as a safetensors file ({e})".splitlines()[0]) from None
    require(isinstance(header, dict), f"{path} is not a safetensors file: it does not start with a JSON header")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype") if isinstance(info, dict) else None)
        require(dtype is not None, f"{path}: tensor {name} has dtype {info.get('dtype') if isinstance(info, dict) else info!r}; "
                f"gpt.py reads {', '.join(SAFETENSORS_DTYPES)}")
        try:
            shape, (begin, end) = list(info["shape"]), info["data_offsets"]
            count = math.prod(shape)
        except (KeyError, TypeError, ValueError):
            raise GPTError(f"{path}: tensor {name} has no valid shape and data_offsets") from None
        require(0 <= begin <= end and end - begin == count * dtype.itemsize and 8 + header_size + end <= size,
                f"{path}: the bytes of tensor {name} do not fit its shape {shape} or the file (truncated?)")
        flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=8 + header_size + begin) if count else \
            torch.empty(0, dtype=dtype)  # (count,)
        tensors[name] = flat.view(shape)  # (count,) -> shape
    return tensors


def gpt2_config_from_json(path):
    """Hugging Face's config.json for GPT-2 -> GPTConfig, refusing settings our model does not have."""
    try:
        hf = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise GPTError(f"cannot read {str(path)!r} as a GPT-2 config.json ({e})".splitlines()[0]) from None
    different = {  # settings that would make the checkpoint compute something other than GPT-2
        "activation_function": (hf.get("activation_function", "gelu_new"), ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": (hf.get("n_inner"), (None, 4 * hf.get("n_embd", 768))),
        "scale_attn_weights": (hf.get("scale_attn_weights", True), (True,)),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), (False,)),
        "layer_norm_epsilon": (hf.get("layer_norm_epsilon", 1e-5), (1e-5,)),
    }
    for key, (value, accepted) in different.items():
        require(value in accepted, f"{path}: {key} = {value!r}, but gpt.py computes GPT-2 with {key} = {accepted[0]!r}")
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True)
    except KeyError as e:
        raise GPTError(f"{path} lacks the key {e.args[0]!r} that a GPT-2 config.json has") from None


def cache_folder():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt.py"


def download(url, target):
    """Download url to target with progress on stderr. The bytes go to target.part first, which
    an interrupted download resumes from (an HTTP Range request); target appears only once complete."""
    part = target.with_name(target.name + ".part")
    for attempt in range(2):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                if response.status != 206:  # the server sent the whole file: start from its first byte
                    have = 0
                total = have + int(response.headers.get("Content-Length", 0))
                with open(part, "ab" if have else "wb") as f:
                    last_report = 0.0
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        have += len(chunk)
                        if time.time() - last_report > 1 or have == total:
                            log(f"downloading {target.name}: {have / 1e6:,.0f} of {total / 1e6:,.0f} MB")
                            last_report = time.time()
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and attempt == 0:  # "range not satisfiable": the part is complete or stale
                part.unlink()
                continue
            raise GPTError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
        except (OSError, ValueError, http.client.HTTPException) as e:  # no network, a dropped connection
            raise GPTError(f"could not download {url} ({type(e).__name__}: {e}); rerun to resume it, or give "
                           f"--init-from a local folder holding config.json and model.safetensors".splitlines()[0]) from None
    require(total == 0 or have == total, f"download of {url} stopped at {have} of {total} bytes; rerun to resume it")
    os.replace(part, target)


def download_gpt2(name):
    """Fetch config.json and model.safetensors of a GPT-2 size once; afterwards read them offline.
    Several processes (torchrun) take turns through a lock: the first downloads, the rest find it."""
    folder = cache_folder() / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        if hasattr(os, "O_RDONLY") and sys.platform != "win32":
            import fcntl  # Unix
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        for file in ("config.json", "model.safetensors"):
            target = folder / file
            if not target.exists():
                download(GPT2_URL.format(name=name, file=file), target)
    return folder


def gpt2_weight_files(name_or_path):
    """A GPT-2 size, a folder or a .safetensors file -> (its config.json, maybe absent; its weights)."""
    if name_or_path in GPT2_SIZES:
        folder = download_gpt2(name_or_path)
        return folder / "config.json", folder / "model.safetensors"
    path = Path(name_or_path)
    if path.is_dir():
        require((path / "model.safetensors").exists(), f"{str(path)!r} has no model.safetensors")
        return path / "config.json", path / "model.safetensors"
    if path.is_file() and path.suffix == ".safetensors":
        return path.with_name("config.json"), path
    raise GPTError(f"--init-from {name_or_path!r}: expected one of {', '.join(GPT2_SIZES)}, a folder "
                   f"holding config.json and model.safetensors, or a .safetensors file")


def read_gpt2_weights(name_or_path):
    """-> (GPTConfig, state dict with our names), every tensor's name and shape checked."""
    config_path, weights_path = gpt2_weight_files(name_or_path)
    tensors = read_safetensors(weights_path)
    tensors = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    if config_path.exists():
        config = gpt2_config_from_json(config_path)
    else:  # a bare .safetensors: read the shape off the tensors; every GPT-2 size has 64-wide heads
        require("wte.weight" in tensors and "wpe.weight" in tensors, f"{weights_path} holds no GPT-2 embeddings (wte, wpe)")
        (vocab_size, n_embd), block_size = tensors["wte.weight"].shape, tensors["wpe.weight"].shape[0]
        require(n_embd % 64 == 0, f"{weights_path}: width {n_embd} is not a multiple of GPT-2's 64-wide heads; "
                f"put its config.json beside it")
        n_layer = len({name.split(".")[1] for name in tensors if name.startswith("h.")})
        config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_embd // 64,
                           n_embd=n_embd)

    with torch.device("meta"):  # the expected names and shapes, without allocating any memory
        expected = GPT(config).state_dict()
    state = {}
    for name, t in tensors.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # older files store GPT-2's causal mask as a buffer; we build ours
        if name == "lm_head.weight":
            require(torch.equal(t, tensors["wte.weight"]), f"{weights_path}: lm_head.weight differs from wte.weight; "
                    "GPT-2 ties them, and so does gpt.py")
            continue
        ours = "transformer." + name
        require(ours in expected, f"{weights_path}: unexpected tensor {name!r}, not part of GPT-2")
        conv1d = name.endswith(CONV1D_WEIGHTS)
        shape = tuple(expected[ours].shape)[::-1] if conv1d else tuple(expected[ours].shape)  # as the file stores it
        require(tuple(t.shape) == shape, f"{weights_path}: {name} has shape {tuple(t.shape)}, expected {shape} "
                f"for this config")
        state[ours] = (t.t() if conv1d else t).float()  # Conv1D (in, out) -> nn.Linear (out, in)
    missing = [name for name in expected if name not in state and name != "lm_head.weight"]
    if missing:
        raise GPTError(f"{weights_path} lacks {len(missing)} tensor(s) of GPT-2, the first "
                       f"{missing[0].removeprefix('transformer.')!r}")
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied: one tensor under two names
    return config, state


def load_gpt2(name_or_path, dropout=0.0, block_size=None):
    """GPT.from_pretrained (section 4): a GPT holding GPT-2's weights, with the given dropout;
    a block_size below 1,024 keeps the first block_size positions (a cheaper context)."""
    config, state = read_gpt2_weights(name_or_path)
    return model_with_weights(dataclasses.replace(config, dropout=dropout), state, block_size,
                              f"--init-from {name_or_path}")


def model_with_weights(config, state, block_size=None, source="the checkpoint"):
    """A GPT of config's shape holding the weights of state (GPT's own names), its context set to
    block_size. A shorter context keeps the first block_size learned positions. A longer one
    needs RoPE, whose positions are rotations that any position has: a learned wpe has no
    vector for a position it never saw."""
    old = config.block_size
    if block_size is not None and block_size != old:
        require(block_size < old or config.pos == "rope", f"--block-size {block_size} is longer than the {old} "
                f"positions that {source} has learned (wpe): nothing is known of position {old} and on. A model "
                f"trained with --pos rope takes any --block-size; this one takes {old} or less")
        config = dataclasses.replace(config, block_size=block_size)
        if "transformer.wpe.weight" in state:  # (old, C) -> (block_size, C)
            state = {**state, "transformer.wpe.weight": state["transformer.wpe.weight"][:block_size]}
    with torch.device("meta"):  # shapes only: drawing 1.5B random numbers for gpt2-xl would be wasted
        model = GPT(config)
    model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight  # to_empty gave the two names separate tensors
    try:
        model.load_state_dict(state)
    except (RuntimeError, KeyError) as e:
        raise GPTError(f"{source}: its weights do not fit its config ({str(e).splitlines()[0]})") from None
    return model


def gpt2_bpe_encoding():
    """tiktoken's "gpt2" encoding (BPETokenizer, section 2). tiktoken downloads its two files on
    first use; offline, they must already be in TIKTOKEN_CACHE_DIR (README.md, "BPE offline")."""
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises whatever its download raised
        raise GPTError(
            "could not load GPT-2's BPE files: tiktoken downloads them on first use, which needs "
            "network access, and keeps them in the folder named by TIKTOKEN_CACHE_DIR; set "
            f"TIKTOKEN_CACHE_DIR to a folder that holds them ({type(e).__name__}: {e})".splitlines()[0]
        ) from None


# ---- 12. Training runs -----------------------------------------------------------------------
#
# train() (section 5) is the loop; a TrainingRun is everything around it. Before anything is
# written it checks every input: the flags, the data, a checkpoint to resume and whether its
# shape and tokenizer agree with the flags, the out-dir. It then builds or restores the model,
# the optimizer and the random generators. While the loop runs, it evaluates and saves
# (ckpt.pt: the weights with the best validation loss; last.pt: the latest state, from which
# --resume continues; loss.svg: the curve so far, section 14), logs progress with tokens/s,
# MFU and an ETA, stops on a NaN with the last good val loss, and on Ctrl-C finishes the step
# and saves.
#
# Each setting is a field of TrainConfig, and each field is also a command-line flag: option()
# (at the start of Part II) keeps the flag's help text beside its default; section 16 builds the
# parser from them.

# Several processes: torchrun and DDP.
#
# `torchrun --standalone --nproc_per_node N gpt.py train ...` starts N processes (on CUDA one
# per GPU, NCCL between them; on CPUs gloo), each told its RANK and the WORLD_SIZE in its
# environment. They train one model together with PyTorch's DistributedDataParallel (DDP):
# every process holds the whole model and computes the gradients of its own micro-batches;
# DDP averages the gradients across the processes before each optimizer step, so that every
# copy takes the same step. The settings mean the same whatever N is:
# - --batch-size and --grad-accum describe one optimizer step: grad_accum micro-batches of
#   batch_size sequences, shared out between the processes (grad_accum divisible by N). Every
#   process draws the same random windows from the same seeded generator and keeps micro-batch
#   rank, rank + N, ...: together they compute exactly the micro-batches of a 1-process run,
#   and with dropout 0 the losses agree with it to within float rounding (tested, 2 processes).
# - Gradients are averaged once per step: DDP's no_sync covers the forward and the backward of
#   every micro-batch but the last (covering only the backward is a known silent bug: DDP
#   prepares the averaging in the forward pass).
# - Evaluation batches are shared out as well, and the losses averaged over all of them.
# - Only rank 0 logs and writes files. After every step the processes agree, in one small
#   all_reduce, on whether to log and whether to stop, so they all stop at the same step. Ctrl-C
#   or SIGTERM to torchrun reaches every process; rank 0 saves last.pt with every rank's random
#   state, and --resume with the same N continues bit for bit (with another N, correctly; the
#   dropout of ranks above 0 then starts again from its seed). A NaN stops every process.
# - A process killed outright makes torchrun end the others; saves are atomic, so the last
#   checkpoint is whole.
# - --compile with DDP: the model is compiled, then wrapped, the usual order; not run here.
# On several machines: the same torchrun on each, with --nnodes, --node_rank and a rendezvous
# address (README.md shows it).

def process_rank():
    return int(os.environ.get("RANK", 0))  # torchrun sets it; 0 when started alone


def process_count():
    return int(os.environ.get("WORLD_SIZE", 1))


def start_processes(device):
    """Join the processes torchrun started -> the device of this one (its own GPU on CUDA) and a
    gloo group for the small decisions all of them share (NCCL reduces only GPU tensors)."""
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.new_group(backend="gloo")


def share_of(next_batch):
    """With N processes: next_batch called N times, the same windows on every process, and this
    process's one kept. Alone: next_batch itself."""
    if process_count() == 1:
        return next_batch

    def this_process_share():
        return [next_batch() for _ in range(process_count())][process_rank()]
    return this_process_share


def gradients_shared(model, after):
    """With DDP, the gradients are averaged across the processes only in the backward pass after
    which `after` is true: no_sync around the forward and the backward of the others."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and not after:
        return model.no_sync()
    return contextlib.nullcontext()


def reduced(value, op):
    """value (a tensor) combined over all processes with op (dist.ReduceOp.SUM, .MAX)."""
    if process_count() == 1:
        return value
    value = value.detach().clone().to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=op)
    return value


def mean_over_processes(total, count):
    """The sum of total (a tensor) over all processes, divided by count -> a float."""
    return (reduced(total, dist.ReduceOp.SUM) / count).item()


def check_model_config(config):
    """GPTConfig's check (section 1): a clear error for a shape no model can have."""
    for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        value = getattr(config, name)
        require(isinstance(value, int) and value > 0, f"{name} must be a positive whole number, got {value!r}")
    require(config.n_embd % config.n_head == 0, f"n_embd ({config.n_embd}) must be divisible by n_head "
            f"({config.n_head}): each head gets n_embd // n_head channels")
    require(0.0 <= config.dropout < 1.0, f"dropout must be in [0, 1), got {config.dropout}")
    require(config.pos in ("learned", "rope"), f"pos must be learned or rope, got {config.pos!r}")
    require(config.pos == "learned" or config.n_embd // config.n_head % 2 == 0, f"RoPE turns pairs of channels: "
            f"the head size n_embd // n_head = {config.n_embd // config.n_head} must be even")


@dataclass
class TrainConfig:
    data: str = option("input.txt", "UTF-8 text file to train on, or a token file from `python gpt.py prepare`")
    tokenizer: str = option(None, "char: one token per character; bpe: GPT-2's 50,257 tokens", choices=("char", "bpe"),
                            default_text="char; with --resume the checkpoint's; with --init-from bpe")
    out_dir: str = option("out", "folder for ckpt.pt (best validation loss) and last.pt (latest state)")
    init_from: str = option(None, "start from GPT-2's weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local "
                            "folder or .safetensors file) or from a gpt.py checkpoint (a .pt file): a new run "
                            "that fine-tunes it; the shape comes from it", default_text="a new model")
    resume: bool = option(False, "continue the run saved in --out-dir, from last.pt; flags you give override its "
                          "settings (a larger --max-iters keeps the saved learning-rate schedule)")
    device: str = option("auto", "where to train; auto picks cuda, then mps, then cpu", choices=DEVICES)
    dtype: str = option("auto", "number format of the matmuls (see section 7 of gpt.py)", choices=("auto", *DTYPES))
    compile: bool = option(False, "torch.compile the model (slow to start; pays on GPUs, not on CPUs)")
    seed: int = option(1337, "seed for the weights, the batches and dropout")
    n_layer: int = option(None, "transformer blocks", default_text=f"{GPTConfig.n_layer}, or the checkpoint's")
    n_head: int = option(None, "attention heads per block", default_text=f"{GPTConfig.n_head}, or the checkpoint's")
    n_embd: int = option(None, "width of the model (C)", default_text=f"{GPTConfig.n_embd}, or the checkpoint's")
    block_size: int = option(None, "context length in tokens (T); with --init-from, a smaller value crops the "
                             "model's, and a larger one needs --pos rope",
                             default_text=f"{GPTConfig.block_size}, or the checkpoint's")
    pos: str = option(None, "positions: learned (GPT-2's wpe) or rope (rotary)", choices=("learned", "rope"),
                      default_text="learned, or the checkpoint's")
    dropout: float = option(0.1, "dropout probability while training: 0.1 keeps the default model from overfitting "
                            "1 MB of text in its 5,000 steps; 0 pays in runs of a few minutes (README.md)")
    batch_size: int = option(16, "sequences per micro-batch (B)")
    grad_accum: int = option(1, "micro-batches per optimizer step (the gradient is their mean)")
    max_iters: int = option(5000, "optimizer steps to train for (5k steps: a usable model)")
    max_minutes: float = option(None, "instead of --max-iters: time the first steps, then set --max-iters (and "
                                "with it the learning-rate schedule) to fill about this many minutes of training "
                                "and evaluation; the count is printed and saved", default_text="use --max-iters")
    lr: float = option(1e-3, "peak learning rate, reached after the warm-up")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay (Chinchilla: lr / 10)")
    warmup_iters: int = option(100, "steps of linear warm-up to --lr")
    lr_decay_iters: int = option(None, "step at which the cosine decay reaches --min-lr", default_text="--max-iters")
    weight_decay: float = option(0.1, "AdamW weight decay, applied to weight matrices only (GPT-3: 0.1)")
    beta2: float = option(0.99, "AdamW beta2; 0.99 suits small batches (GPT-3 used 0.95 at 0.5M tokens a step)")
    grad_clip: float = option(1.0, "clip the gradient's global norm to this (GPT-3: 1.0)")
    eval_interval: int = option(500, "evaluate (and save) every this many steps")
    eval_iters: int = option(40, "batches averaged for each evaluation of the train and val loss")
    peak_flops: float = option(None, "peak FLOP/s for the MFU figure",
                               default_text="a matmul probe on CPU, the card's published peak on CUDA")

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "block_size", "lr_decay_iters"):
            value = getattr(self, name)
            require(value is None or value > 0, f"--{flag(name)} must be a positive whole number, got {value}")
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters"):
            value = getattr(self, name)
            require(isinstance(value, int) and value > 0, f"--{flag(name)} must be a positive whole number, got {value}")
        require(self.warmup_iters >= 0, f"--warmup-iters must be 0 or more, got {self.warmup_iters}")
        require(self.lr > 0, f"--lr must be positive, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, f"--min-lr must be between 0 and --lr ({self.lr}), got {self.min_lr}")
        require(self.weight_decay >= 0, f"--weight-decay must be 0 or more, got {self.weight_decay}")
        require(0 < self.beta2 < 1, f"--beta2 must be in (0, 1), got {self.beta2}")
        require(self.grad_clip > 0, f"--grad-clip must be positive, got {self.grad_clip}")
        require(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        require(self.peak_flops is None or self.peak_flops > 0, f"--peak-flops must be positive, got {self.peak_flops}")
        require(self.max_minutes is None or self.max_minutes > 0, f"--max-minutes must be positive, got "
                f"{self.max_minutes}")
        require(self.max_minutes is None or self.warmup_iters >= 4, f"--max-minutes times the first steps, whose "
                f"learning rate must not depend on the run's length: it needs --warmup-iters of 4 or more, got "
                f"{self.warmup_iters}")
        require(self.tokenizer in (None, "char", "bpe"), f"unknown tokenizer {self.tokenizer!r}: expected char or bpe")
        if self.n_embd is not None and self.n_head is not None:
            require(self.n_embd % self.n_head == 0, f"--n-embd ({self.n_embd}) must be divisible by --n-head "
                    f"({self.n_head}): each head gets n_embd // n_head channels")


def resume_path(out_dir):
    """--resume continues from last.pt, the latest state; ckpt.pt if a run left only that."""
    return out_dir / "last.pt" if (out_dir / "last.pt").exists() else out_dir / "ckpt.pt"


def resumed_config(given):
    """--resume: the settings saved in the run's checkpoint, overridden by the flags given now.
    -> (TrainConfig, the checkpoint)."""
    require("init_from" not in given, "--resume continues a run; it cannot also start from --init-from")
    require("max_minutes" not in given, "--max-minutes plans a new run; a resumed run keeps the --max-iters it was "
            "given or planned: give --max-iters to train it longer")
    checkpoint = load_checkpoint(resume_path(Path(given.get("out_dir", TrainConfig.out_dir))))
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in checkpoint.get("train_args", {}).items() if k in fields}
    saved["max_minutes"] = None  # planned once, when the run began: its count is the saved max_iters
    if "max_iters" in given and "lr_decay_iters" not in given and saved.get("lr_decay_iters") is None:
        # Training longer than planned: keep the learning rate where the saved run's schedule
        # puts it (at --min-lr once it has decayed), rather than stretching the cosine over the
        # new length, which would raise the learning rate again at the step we resume from.
        saved["lr_decay_iters"] = saved.get("max_iters")
    return TrainConfig(**{**saved, **given}), checkpoint


@contextlib.contextmanager
def ctrl_c_finishes_the_step():
    """While training, the first Ctrl-C (or a `kill`, SIGTERM) asks the loop to stop after the
    current step: it then saves and exits. A second Ctrl-C stops at once, without saving."""
    requested = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt
        requested.append(signum)
        log(f"\n{'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'}: finishing this step, then saving "
            f"(Ctrl-C again stops at once, without saving)")

    stop_signals = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {s: signal.signal(s, handler) for s in stop_signals}
    except ValueError:  # not the main thread: leave the signals alone
        previous = {}
    try:
        yield requested
    finally:
        for s, handler_before in previous.items():
            signal.signal(s, handler_before)


def model_for_run(cfg, text, resume, out_dir, data_tokenizer=None):
    """-> (tokenizer, GPTConfig, the GPT with GPT-2's weights or None). The shape and the
    tokenizer come from the checkpoint being resumed, from --init-from, or from the flags; a
    flag may repeat a checkpoint's shape but not change it. data_tokenizer: a token file's, which
    must then be the model's."""
    model = None
    if resume is not None:
        tokenizer = tokenizer_from_dict(resume["tokenizer"])
        config = dataclasses.replace(GPTConfig(**resume["config"]), dropout=cfg.dropout)
        source = f"the checkpoint {resume_path(out_dir)}"
    elif cfg.init_from is not None and Path(cfg.init_from).suffix == ".pt":  # a gpt.py checkpoint, fine-tuned
        checkpoint, source = load_checkpoint(cfg.init_from), f"--init-from {cfg.init_from}"
        tokenizer = tokenizer_from_dict(checkpoint["tokenizer"])
        try:
            config = dataclasses.replace(GPTConfig(**checkpoint["config"]), dropout=cfg.dropout)
        except TypeError as e:
            raise GPTError(f"{source}: its config is not a GPTConfig ({e})") from None
        model = model_with_weights(config, checkpoint["model_state"], cfg.block_size, cfg.init_from)
        config = model.config
    elif cfg.init_from is not None:
        tokenizer = BPETokenizer()
        model = GPT.from_pretrained(cfg.init_from, dropout=cfg.dropout, block_size=cfg.block_size)
        config = model.config
        source = f"--init-from {cfg.init_from}"
    elif data_tokenizer is not None:
        tokenizer = data_tokenizer
        config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=cfg.block_size or GPTConfig.block_size,
                           n_layer=cfg.n_layer or GPTConfig.n_layer, n_head=cfg.n_head or GPTConfig.n_head,
                           n_embd=cfg.n_embd or GPTConfig.n_embd, dropout=cfg.dropout, pos=cfg.pos or "learned")
        source = f"--data {cfg.data}"
    else:
        tokenizer = CharTokenizer.from_text(text) if cfg.tokenizer in (None, "char") else BPETokenizer()
        config = GPTConfig(vocab_size=tokenizer.vocab_size, block_size=cfg.block_size or GPTConfig.block_size,
                           n_layer=cfg.n_layer or GPTConfig.n_layer, n_head=cfg.n_head or GPTConfig.n_head,
                           n_embd=cfg.n_embd or GPTConfig.n_embd, dropout=cfg.dropout, pos=cfg.pos or "learned")
        source = None
    if source is not None:  # the shape comes from the checkpoint: a flag may only repeat it
        given = {"tokenizer": cfg.tokenizer, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                 "block_size": cfg.block_size, "pos": cfg.pos}
        from_source = {"tokenizer": tokenizer.kind, **{k: getattr(config, k) for k in given if k != "tokenizer"}}
        for name, value in given.items():
            if value is not None and value != from_source[name]:
                raise GPTError(f"--{flag(name)} {value} does not match {source}, which has {name} {from_source[name]}")
    require(tokenizer.vocab_size == config.vocab_size, f"{source}: the model has {config.vocab_size} tokens, but "
            f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size}")
    if data_tokenizer is not None and tokenizer_to_dict(data_tokenizer) != tokenizer_to_dict(tokenizer):
        raise GPTError(f"--data {cfg.data} was prepared with another tokenizer ({describe(data_tokenizer)}) than "
                       f"{source}'s ({describe(tokenizer)}); prepare the text again with the model's tokenizer")
    return tokenizer, config, model


def describe(tokenizer):
    return f"char, {tokenizer.vocab_size} characters" if tokenizer.kind == "char" else "GPT-2's BPE"


class TrainingRun:
    """One training run's state and the work around train()'s loop: see this section's opening."""

    def __init__(self, cfg, resume_checkpoint=None):
        self.device, self.out_dir = pick_device(cfg.device), Path(cfg.out_dir)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        check_training_dtype(self.dtype, self.device)
        if is_token_file(cfg.data):  # prepared by `python gpt.py prepare`: memory-mapped, never read whole
            header, tokens = read_token_file(cfg.data)
            text, data_tokenizer = None, tokenizer_from_dict(header["tokenizer"])
        else:
            text, data_tokenizer = read_text(cfg.data), None
        # Everything that can be wrong with the input is checked before anything is written.
        resume = (resume_checkpoint or load_checkpoint(resume_path(self.out_dir))) if cfg.resume else None
        if resume is None:
            for name in ("ckpt.pt", "last.pt"):
                require(not (self.out_dir / name).exists(), f"{self.out_dir / name} already holds a training run: "
                        f"continue it with --resume, or train into another --out-dir")
        self.tokenizer, config, model = model_for_run(cfg, text, resume, self.out_dir, data_tokenizer)
        self.cfg = cfg = dataclasses.replace(cfg, tokenizer=self.tokenizer.kind, n_layer=config.n_layer,
                                             n_head=config.n_head, n_embd=config.n_embd, block_size=config.block_size,
                                             pos=config.pos)
        self.train_data, self.val_data = split_data(self.tokenizer.encode(text), config.block_size) if text is not None \
            else split_tokens(tokens, config.block_size)
        check_writable(self.out_dir)
        require(cfg.grad_accum % process_count() == 0, f"--grad-accum {cfg.grad_accum} is not divisible by the "
                f"{process_count()} processes that share out its micro-batches")
        self.control = None  # with several processes, the group their shared decisions go through
        if process_count() > 1:
            self.device, self.control = start_processes(self.device)

        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)  # nothing here draws from Python's random; a reader's additions might
        self.model = (model or GPT(config)).to(self.device)
        if process_rank():  # every process starts from the same weights; dropout differs from process to process
            torch.manual_seed(cfg.seed + process_rank())
        self.params = list(self.model.parameters())
        self.optimizer = make_optimizer(self.model, cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.batches = torch.Generator().manual_seed(cfg.seed)  # the training windows' own generator
        self.step, self.best_val, self.history = 0, float("inf"), []
        if resume is not None:
            self.restore(resume)
        self.compiled = torch.compile(self.model) if cfg.compile else self.model  # the same model, unless --compile
        self.training_model = self.compiled  # with several processes, wrapped by DDP: compiled first, then wrapped
        if process_count() > 1:
            gpu = [self.device.index] if self.device.type == "cuda" else None
            self.training_model = nn.parallel.DistributedDataParallel(self.compiled, device_ids=gpu)
        self.autocast_ctx = autocast(self.device, self.dtype)
        self.loss = torch.tensor(resume["loss"] if resume is not None else float("nan"))  # the last step's loss
        self.first_bad_step = torch.full((), -1, device=self.device)  # set on the device, read only when we log
        self.log_start(resuming=resume is not None)
        # --max-minutes: the steps 2 .. plan_at are timed, all within the warm-up, whose learning
        # rate does not depend on max_iters: a run given the planned count takes the same steps.
        self.plan_at = min(100, cfg.warmup_iters - 1) if cfg.max_minutes and resume is None else None

    def restore(self, checkpoint):
        """Continue where the checkpoint stopped: weights, optimizer, step, history, random state."""
        self.model.load_state_dict(checkpoint["model_state"])
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if "scaler_state" in checkpoint:
            self.scaler.load_state_dict(checkpoint["scaler_state"])
        self.step, self.best_val, self.history = checkpoint["step"], checkpoint["best_val_loss"], checkpoint["history"]
        rng, by_rank = checkpoint["rng"], checkpoint.get("rng_by_rank")  # rank 0's; every rank's, if several ran
        mine = by_rank[process_rank()] if by_rank and len(by_rank) == process_count() else rng
        self.batches.set_state(rng["batches"])  # the same on every process
        random.setstate(rng["python"])
        if mine is rng and process_rank():  # another number of processes: this rank's dropout keeps its seed
            return
        torch.set_rng_state(mine["torch"])
        if self.device.type in mine:  # dropout's random state on the GPU
            (torch.cuda if self.device.type == "cuda" else torch.mps).set_rng_state(mine[self.device.type])

    def log_start(self, resuming):
        """Log what is trained on what, and start the clocks of the progress lines."""
        cfg, model = self.cfg, self.model
        config = model.config
        self.tokens_per_step = cfg.batch_size * config.block_size * cfg.grad_accum
        self.flops_per_step = flops_per_token(model) * self.tokens_per_step
        self.peak, self.probed = cfg.peak_flops or measure_peak_flops(self.device, self.dtype), time.perf_counter()
        log(f"model: {model.num_parameters():,} parameters, {config.n_layer} layers x {config.n_head} heads x "
            f"{config.n_embd} wide, context {config.block_size}, {self.tokenizer.kind} tokenizer "
            f"({config.vocab_size} tokens)" + (", RoPE positions" if config.pos == "rope" else ""))
        log(f"data: {len(self.train_data):,} training and {len(self.val_data):,} validation tokens from {cfg.data}")
        processes = f" x {process_count()} processes" if process_count() > 1 else ""
        log(f"device: {self.device.type}{processes}, {dtype_name(self.dtype)}, {self.tokens_per_step:,} tokens per step, "
            f"peak {self.peak / 1e9:,.0f} GFLOP/s" + (f"; resuming at step {self.step}" if resuming else ""))
        # ms/step counts training steps only; the ETA adds the evaluations to come.
        self.started = time.perf_counter()
        self.train_seconds, self.timed_steps, self.eval_seconds = 0.0, 0, 0.0
        self.last_log_time, self.last_log_step = self.started, self.step

    def checkpoint(self):
        """The run's whole state, as section 10 describes it. Every process must call it (it
        gathers their random states); only rank 0 saves what it returns."""
        rng = {"torch": torch.get_rng_state(), "batches": self.batches.get_state(), "python": random.getstate()}
        if self.device.type in ("cuda", "mps"):
            rng[self.device.type] = (torch.cuda if self.device.type == "cuda" else torch.mps).get_rng_state()
        loss = mean_over_processes(self.loss, process_count())  # the last step's loss, over all processes
        state = {"format": CHECKPOINT_FORMAT, "model_state": self.model.state_dict(),
                 "config": dataclasses.asdict(self.model.config), "tokenizer": tokenizer_to_dict(self.tokenizer),
                 "step": self.step, "loss": loss, "best_val_loss": self.best_val,
                 "history": self.history, "optimizer_state": self.optimizer.state_dict(),
                 "train_args": dataclasses.asdict(self.cfg), "rng": rng}
        if self.scaler.is_enabled():
            state["scaler_state"] = self.scaler.state_dict()
        if process_count() > 1:
            state["rng_by_rank"] = [None] * process_count()
            dist.all_gather_object(state["rng_by_rank"], rng)
        return state

    def save(self, path, also=None):
        state = self.checkpoint()
        if process_rank() == 0:
            save_checkpoint(state, path, also)

    def evaluated_at(self, step):  # a resumed run may start where the last one evaluated
        return bool(self.history) and self.history[-1]["step"] == step

    def check_finite(self):
        none = torch.iinfo(torch.int64).max  # no bad step: the largest number, so that MIN finds the first one
        bad = int(reduced(torch.where(self.first_bad_step < 0, none, self.first_bad_step), dist.ReduceOp.MIN))
        if bad != none:  # any process's NaN stops them all
            last_good = f"{self.history[-1]['val']:.4f} at step {self.history[-1]['step']}" if self.history else "none yet"
            raise GPTError(f"training diverged: the loss became NaN or infinite at step {bad} (last good val loss "
                           f"{last_good}); {self.out_dir / 'ckpt.pt'} is untouched. Try a lower --lr, or --dtype float32")

    def evaluate_and_save(self):
        """estimate_loss (section 5) on both splits; save last.pt, and ckpt.pt too when the val
        loss is the best so far (then one file under both names)."""
        cfg = self.cfg
        self.check_finite()
        start = time.perf_counter()
        losses = {"step": self.step}
        # Seeds of their own (seed + 1, + 2): the same batches at every evaluation, apart from training's.
        for split, data, seed in (("train", self.train_data, cfg.seed + 1), ("val", self.val_data, cfg.seed + 2)):
            losses[split] = estimate_loss(self.compiled, data, cfg, cfg.block_size, self.device, self.autocast_ctx,
                                          seed, split)  # not through DDP: no process waits for another's batches
        bad = [f"the {split} loss is {losses[split]}" for split in ("train", "val") if not math.isfinite(losses[split])]
        require(not bad, f"training diverged: {' and '.join(bad)} at step {self.step}; {self.out_dir / 'ckpt.pt'} "
                f"is untouched. Try a lower --lr, or --dtype float32")
        self.history.append(losses)
        if losses["val"] < self.best_val:
            self.best_val = losses["val"]
            self.save(self.out_dir / "ckpt.pt", also=self.out_dir / "last.pt")
            note = ", best so far: saved ckpt.pt"
        else:
            self.save(self.out_dir / "last.pt")
            note = ""
        if process_rank() == 0:
            write_atomically(self.out_dir / "loss.svg", loss_curve_svg(self.history))  # section 14
        self.eval_seconds = time.perf_counter() - start
        log(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}{note} "
            f"({self.eval_seconds:.1f}s)")
        if self.step < cfg.max_iters:  # training goes on: a fresh peak now and then, and the log's clock restarts
            if cfg.peak_flops is None and time.perf_counter() - self.probed > 60:
                self.peak, self.probed = max(self.peak, measure_peak_flops(self.device, self.dtype)), time.perf_counter()
            self.last_log_time, self.last_log_step = time.perf_counter(), self.step

    def after_step(self, loss, lr, stop_requested):
        """Note a NaN loss on the device (without waiting for a GPU); log the loss, speed, MFU and
        ETA every LOG_EVERY_SECONDS, after the first and the last step, and on a stop. -> whether to
        stop now: decided once, here, since a signal can arrive at any moment (and with several
        processes, all of them must stop after the same step)."""
        cfg, stop = self.cfg, bool(stop_requested)
        self.loss = loss
        if self.plan_at is not None and self.step in (1, self.plan_at):
            self.plan_length()
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~torch.isfinite(loss), self.step - 1,
                                          self.first_bad_step)  # step - 1: the step that made this loss
        now = time.perf_counter()
        due = now - self.last_log_time >= LOG_EVERY_SECONDS and process_rank() == 0  # rank 0's clock decides
        due = due or self.timed_steps == 0 or self.step == cfg.max_iters
        if process_count() > 1:  # every process logs (its collectives) and stops at the same step
            agreed = torch.tensor([float(due), float(stop)])
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self.control)
            due, stop = bool(agreed[0]), bool(agreed[1])
        if not (due or stop):
            return False
        synchronize(self.device)  # a GPU may still be computing the steps it was given: wait, then read the clock
        now = time.perf_counter()
        self.check_finite()
        self.train_seconds += now - self.last_log_time
        self.timed_steps += self.step - self.last_log_step
        dt = (now - self.last_log_time) / (self.step - self.last_log_step)
        flops = self.flops_per_step / dt / process_count()  # per process, against one device's peak
        self.peak = max(self.peak, flops)  # a peak the model beat was too low: MFU <= 100%
        evals_left = (cfg.max_iters - 1) // cfg.eval_interval - self.step // cfg.eval_interval + 1
        eta = (cfg.max_iters - self.step) * self.train_seconds / self.timed_steps + evals_left * self.eval_seconds
        loss = mean_over_processes(loss, process_count())  # the mean of every process's micro-batches
        log(f"step {self.step}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | {dt * 1000:.0f} ms/step | "
            f"{self.tokens_per_step / dt:,.0f} tok/s | MFU {flops / self.peak:.0%} | ETA {duration(eta)}")
        self.last_log_time, self.last_log_step = now, self.step
        return stop

    def plan_length(self):
        """--max-minutes: at step 1, start a clock; at step plan_at, set cfg.max_iters (the loop and
        the learning-rate schedule read it) to fill the minutes left with steps at the speed of the
        steps since, and evaluations as long as the one at step 0. The same count on every process."""
        cfg = self.cfg
        synchronize(self.device)
        if self.step == 1:
            self.plan_clock = time.perf_counter()
            return
        now = time.perf_counter()
        # The first hundred steps can run faster than the rest: on the 2-core CPU of README.md, once
        # 49 ms against a steady 56, another time as fast as the rest. The plan allows 5% more.
        step_seconds = 1.05 * (now - self.plan_clock) / (self.step - 1)
        left = cfg.max_minutes * 60 - (now - self.started) - self.eval_seconds  # the last evaluation included
        steps = self.step + max(0, int(left / (step_seconds + self.eval_seconds / cfg.eval_interval)))
        steps = int(reduced(torch.tensor(float(steps) if process_rank() == 0 else 0.0), dist.ReduceOp.MAX))
        cfg.max_iters, self.plan_at = steps, None
        log(f"--max-minutes {cfg.max_minutes:g}: {steps:,} steps fit ({step_seconds * 1000:,.0f} ms a step, "
            f"{self.eval_seconds:.1f} s an evaluation); training as with --max-iters {steps}")

    def stop(self):
        self.save(self.out_dir / "last.pt")
        if dist.is_initialized():
            dist.destroy_process_group()
        log(f"stopped at step {self.step}; saved {self.out_dir / 'last.pt'}. Continue with: "
            f"python gpt.py train --resume --out-dir {self.out_dir}")
        return {"step": self.step, "best_val_loss": self.best_val, "history": self.history, "interrupted": True}

    def finish(self):
        if dist.is_initialized():
            dist.destroy_process_group()
        log(f"done: {self.step} steps in {duration(time.perf_counter() - self.started)}; best val loss "
            f"{self.best_val:.4f}, saved in {self.out_dir / 'ckpt.pt'}; sample with: python gpt.py sample "
            f"--out-dir {self.out_dir}")
        return {"step": self.step, "best_val_loss": self.best_val, "history": self.history, "interrupted": False}


# ---- 13. Sampling runs -----------------------------------------------------------------------
#
# `python gpt.py sample` loads a checkpoint (or GPT-2's weights), streams the text to stdout
# as it is drawn, and reports tokens/s on stderr. The random draw (sample_next_token, section
# 6) runs on the CPU in float32, whatever the device: torch.multinomial on Apple's MPS has
# returned out-of-range and zero-probability ids (pytorch issues 92752, 98612, 192577; nanoGPT
# issue 458), and every drawn id is checked before anyone decodes it.

def check_sampling_settings(temperature, top_k, top_p, prefix="", prompt=None):
    """prefix: "--" when the values came from command-line flags; prompt: generate's idx, if given."""
    require(temperature >= 0, f"{prefix}temperature must be 0 or more (0 means greedy), got {temperature}")
    require(top_k is None or top_k >= 1, f"{prefix}top-k must be 1 or more, got {top_k}")
    require(top_p is None or 0 < top_p <= 1, f"{prefix}top-p must be in (0, 1], got {top_p}")
    require(prompt is None or (prompt.dim() == 2 and prompt.size(1) >= 1), f"generate needs a prompt of shape "
            f"(B, T) with T >= 1, got {tuple(prompt.shape) if prompt is not None else None}; start an empty text "
            f"with the tokenizer's start_token")


def checked_draw(next_ids, probs):
    """next_ids (B, 1) drawn from probs (B, V) -> next_ids, if every id is a token that could be drawn."""
    for row, i in enumerate(next_ids.flatten().tolist()):
        why = "outside the vocabulary" if not 0 <= i < probs.size(-1) else "of probability 0" if probs[row, i] == 0 else ""
        require(not why, f"the random draw gave an impossible token id {i}, {why} ({probs.size(-1)} tokens): "
                f"torch.multinomial misbehaved, and nothing was written from it")
    return next_ids


def trained_model(out_dir, init_from):
    """-> (model, tokenizer): GPT-2's weights with --init-from, else the best checkpoint of out_dir."""
    if init_from is not None:
        model, tokenizer = GPT.from_pretrained(init_from), BPETokenizer()
        require(model.config.vocab_size == tokenizer.vocab_size, f"--init-from {init_from}: the model has "
                f"{model.config.vocab_size} tokens, but GPT-2's BPE has {tokenizer.vocab_size}")
        return model, tokenizer
    path = Path(out_dir) / "ckpt.pt"
    return model_from_checkpoint(load_checkpoint(path), path)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, kv_cache=True, generator=None):
    """generate_stream (section 6), collected: idx (B, T) -> (B, T + max_new_tokens), the prompt and the new tokens."""
    new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, kv_cache, generator))
    return torch.cat([idx, *(token.to(idx.device) for token in new)], dim=1)


@dataclass
class SampleConfig:
    out_dir: str = option("out", "folder whose ckpt.pt to sample from")
    init_from: str = option(None, "sample from GPT-2's weights instead: gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                            "or a local folder or .safetensors file", default_text="the checkpoint in --out-dir")
    device: str = option("auto", "where to run; auto picks cuda, then mps, then cpu", choices=DEVICES)
    dtype: str = option("auto", "number format of the weights while sampling", choices=("auto", *DTYPES))
    prompt: str = option("", "text to continue; empty starts a new text")
    max_new_tokens: int = option(500, "how many tokens to write")
    temperature: float = option(0.8, "below 1: safer choices; above 1: wilder; 0: always the most likely token")
    top_k: int = option(None, "draw only from the k most likely tokens", default_text="all tokens")
    top_p: float = option(None, "draw only from the most likely tokens that add up to this probability",
                          default_text="all tokens")
    num_samples: int = option(1, "how many separate texts to write")
    seed: int = option(1337, "seed of the random draws: the same seed writes the same text")
    no_kv_cache: bool = option(False, "recompute the whole context for every token (slow; for comparison)")

    def __post_init__(self):
        require(self.max_new_tokens >= 0, f"--max-new-tokens must be 0 or more, got {self.max_new_tokens}")
        require(self.num_samples >= 1, f"--num-samples must be 1 or more, got {self.num_samples}")
        check_sampling_settings(self.temperature, self.top_k, self.top_p, prefix="--")


def sample(cfg, out=None):
    """Write cfg.num_samples texts to out (stdout), token by token as they are drawn."""
    out = out or sys.stdout
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    model, tokenizer = trained_model(cfg.out_dir, cfg.init_from)
    prompt = tokenizer.encode(cfg.prompt) or [tokenizer.start_token]
    if len(prompt) > model.config.block_size:
        log(f"the prompt has {len(prompt)} tokens; the model sees its last {model.config.block_size}")
    model.to(device=device, dtype=dtype)
    idx = torch.tensor([prompt], device=device)  # (1, T)
    generator = torch.Generator().manual_seed(cfg.seed)
    start, count = time.perf_counter(), 0
    for i in range(cfg.num_samples):
        out.write(cfg.prompt)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a BPE token may end mid-character
        for token in generate_stream(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                     not cfg.no_kv_cache, generator):
            out.write(decoder.decode(tokenizer.token_bytes(int(token))))
            out.flush()
            count += 1
        out.write(decoder.decode(b"", final=True) + "\n")
        if i + 1 < cfg.num_samples:
            out.write("-" * 40 + "\n")
        out.flush()
    seconds = time.perf_counter() - start
    log(f"{count} tokens in {seconds:.2f} s: {count / max(seconds, 1e-9):,.1f} tokens/s "
        f"({device.type}, {dtype_name(dtype)}, {'no ' if cfg.no_kv_cache else ''}KV cache)")
    return count


# ---- 14. Pictures ----------------------------------------------------------------------------
#
# Two pictures, as SVG: plain text that every browser shows, drawn here without a plotting
# library. `train` writes loss.svg into its out-dir at every evaluation: the train and val
# loss against the step, with the best val loss marked (a resumed run draws its whole
# history). `python gpt.py inspect` runs a model once over a prompt, prints the most likely
# next tokens, and writes attention.svg: for every layer (rows) and head (columns), how much
# each token (a row of the heatmap) attends to each earlier token (a column). Those weights
# are the model's own: the softmax inside causal_attention_written_out (section 4), recorded
# as the model computes them.

SVG_FONT = 'font-family="sans-serif" font-size="11"'
SVG_TITLE = 'font-family="sans-serif" font-size="13"'


def write_atomically(path, text):
    """Write text to path through a temporary file and a rename: never half a file (like section 10)."""
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):  # left by a write that was killed halfway
        leftover.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GPTError(f"could not write {path}: {e.strerror or e}") from None


def svg(width, height, body):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def nice_ticks(low, high, count=5):
    """About count round values, 1, 2 or 5 times a power of ten apart, from at most low to at least high."""
    if high <= low:
        high = low + 1
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


def loss_curve_svg(history):
    """history [{"step", "train", "val"}, ...] -> an SVG of both losses against the step."""
    width, height, left, right, top, bottom = 640, 400, 60, 20, 30, 50
    steps = [h["step"] for h in history]
    losses = [h[split] for h in history for split in ("train", "val")]
    x_ticks, y_ticks = nice_ticks(0, max(max(steps), 1)), nice_ticks(min(losses), max(losses))
    x_low, x_high, y_low, y_high = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]  # the axes span their ticks

    def x(step):
        return left + (step - x_low) / (x_high - x_low) * (width - left - right)

    def y(loss):
        return height - bottom - (loss - y_low) / max(y_high - y_low, 1e-9) * (height - top - bottom)

    body = [f'<text x="{left}" y="18" {SVG_TITLE}>loss against step</text>',
            f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
            f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle" {SVG_FONT}>step</text>',
            f'<text x="14" y="{height / 2}" text-anchor="middle" {SVG_FONT} '
            f'transform="rotate(-90 14 {height / 2})">loss (cross-entropy)</text>']
    for t in x_ticks:
        body.append(f'<line class="x-tick" x1="{x(t):.2f}" y1="{height - bottom}" x2="{x(t):.2f}" '
                    f'y2="{height - bottom + 5}" stroke="black"/><text class="x-label" x="{x(t):.2f}" '
                    f'y="{height - bottom + 18}" text-anchor="middle" {SVG_FONT}>{t:g}</text>')
    for t in y_ticks:
        body.append(f'<line x1="{left}" y1="{y(t):.2f}" x2="{width - right}" y2="{y(t):.2f}" stroke="#e4e4e4"/>'
                    f'<line class="y-tick" x1="{left - 5}" y1="{y(t):.2f}" x2="{left}" y2="{y(t):.2f}" '
                    f'stroke="black"/><text class="y-label" x="{left - 8}" y="{y(t) + 4:.2f}" text-anchor="end" '
                    f'{SVG_FONT}>{t:g}</text>')
    for n, (split, color) in enumerate((("train", "#1f77b4"), ("val", "#ff7f0e"))):
        points = " ".join(f"{x(h['step']):.3f},{y(h[split]):.3f}" for h in history)
        body.append(f'<polyline class="{split}" points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        legend_x = width - right - 150 + 75 * n  # a legend, top right
        body.append(f'<line x1="{legend_x}" y1="14" x2="{legend_x + 20}" y2="14" stroke="{color}" stroke-width="2"/>'
                    f'<text x="{legend_x + 25}" y="18" {SVG_FONT}>{split}</text>')
    best = min(history, key=lambda h: h["val"])
    anchor = "end" if x(best["step"]) > width / 2 else "start"  # the label stays inside the picture
    body.append(f'<circle class="best" cx="{x(best["step"]):.3f}" cy="{y(best["val"]):.3f}" r="5" fill="none" '
                f'stroke="#d62728" stroke-width="2"/><text x="{x(best["step"]):.2f}" y="{y(best["val"]) - 10:.2f}" '
                f'text-anchor="{anchor}" {SVG_FONT} fill="#d62728">best val {best["val"]:.4f} at step {best["step"]}</text>')
    return svg(width, height, body)


def visible(token_text):
    """A token as it can be seen: a newline, a space or a tab drawn as a sign, other control
    characters as Unicode's pictures of them (XML cannot hold most of them as they are)."""
    text = token_text.replace("\n", "\u23ce").replace(" ", "\u2423").replace("\t", "\u21e5")
    return "".join(chr(0x2400 + ord(ch)) if ord(ch) < 0x20 else "\u2421" if ch == "\x7f" else ch for ch in text)


def weight_color(w):
    """A weight in [0, 1] -> a colour from white (0) to dark blue (1), every channel falling as w grows."""
    return "#" + "".join(f"{round(255 - w * (255 - end)):02x}" for end in (8, 48, 107))


def attention_svg(weights, labels):
    """weights: per layer, the attention weights (nh, T, T) over T tokens named by labels -> an
    SVG grid of heatmaps, layers as rows and heads as columns. A cell's colour is its weight
    (weight_color); the future (above the diagonal) is left blank."""
    T, nh, cell, gap = len(labels), weights[0].size(0), 12, 24
    margin = 14 + 7 * max(len(label) for label in labels)  # room for the token labels
    size = T * cell
    width, height = margin + len(weights[0]) * (size + gap), 30 + margin + len(weights) * (size + gap)
    body = [f'<text x="8" y="18" {SVG_TITLE}>attention weights: a row is a token (query), its '
            f'cells the tokens it looks at (keys); darker = more</text>']
    for layer, layer_weights in enumerate(weights):
        for head in range(nh):
            x0, y0 = margin + head * (size + gap), 30 + margin + layer * (size + gap)
            body.append(f'<text x="{x0}" y="{y0 - 4}" {SVG_FONT}>layer {layer}, head {head}</text>'
                        f'<rect x="{x0}" y="{y0}" width="{size}" height="{size}" fill="none" stroke="#bbb"/>')
            # In the heatmap's own units: cell (i, j) is the unit square at x = j, y = i.
            body.append(f'<g class="heatmap" data-layer="{layer}" data-head="{head}" '
                        f'transform="translate({x0} {y0}) scale({cell})">')
            for i in range(T):
                body += [f'<rect x="{j}" y="{i}" width="1" height="1" fill="{weight_color(w)}"/>'
                         for j, w in enumerate(layer_weights[head, i, :i + 1].tolist())]
            body.append("</g>")
            if head == 0:  # the queries' labels, left of each layer's row
                body += [f'<text x="{x0 - 4}" y="{y0 + i * cell + cell - 3}" text-anchor="end" {SVG_FONT}>'
                         f'{xml_escape(label)}</text>' for i, label in enumerate(labels)]
            if layer == 0:  # the keys' labels, above each head's column
                body += [f'<text x="{x0 + j * cell + cell / 2}" y="{y0 - 18}" text-anchor="start" {SVG_FONT} '
                         f'transform="rotate(-90 {x0 + j * cell + cell / 2} {y0 - 18})">{xml_escape(label)}</text>'
                         for j, label in enumerate(labels)]
    return svg(width, height, body)


@contextlib.contextmanager
def recording_softmax():
    """Within it, every F.softmax the code calls appends its output to the list it yields. A
    TorchFunctionMode sees each torch function call: here, the softmax of the written-out
    attention, whose output is the model's own attention weights."""
    outputs = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func is F.softmax:
                outputs.append(result.detach())
            return result

    with Record():
        yield outputs


@dataclass
class InspectConfig:
    out_dir: str = option("out", "folder whose ckpt.pt to inspect; attention.svg is written there")
    init_from: str = option(None, "inspect GPT-2's weights instead: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a "
                            "local folder or .safetensors file", default_text="the checkpoint in --out-dir")
    prompt: str = option("ROMEO:\nBut, soft! what light through yonder window breaks?", "text to run the model on")
    max_tokens: int = option(24, "draw the attention of the prompt's last this many tokens (more is unreadable)")
    top: int = option(10, "how many of the most likely next tokens to print")
    svg: str = option(None, "where to write the attention picture", default_text="attention.svg in --out-dir")

    def __post_init__(self):
        for name in ("max_tokens", "top"):
            require(getattr(self, name) > 0, f"--{flag(name)} must be a positive whole number, got {getattr(self, name)}")


@torch.no_grad()
def inspect(cfg, out=None):
    """Print the most likely next tokens after cfg.prompt; draw the attention over its last
    tokens. -> (the top probabilities as (token id, probability) pairs, every layer's weights over
    the whole prompt, (nh, T, T) each). The model reads the whole prompt (its last block_size
    tokens); a longer prompt than max_tokens is drawn cut to its last ones, their rows then
    showing only the part of each token's attention that falls on the tokens drawn."""
    out = out or sys.stdout
    model, tokenizer = trained_model(cfg.out_dir, cfg.init_from)
    ids = (tokenizer.encode(cfg.prompt) or [tokenizer.start_token])[-model.config.block_size:]
    shown = ids[-cfg.max_tokens:]
    if len(shown) < len(ids):
        log(f"the model read {len(ids)} tokens; the picture shows the attention among the last {len(shown)}")
    model.eval()
    for module in model.modules():  # the written-out attention: its softmax is what is drawn
        if isinstance(module, CausalSelfAttention):
            module.attention = "written out"
    with recording_softmax() as softmaxes:
        logits, _ = model(torch.tensor([ids]))  # (1, T, V), in float32 on the CPU
    weights = [w[0] for w in softmaxes]  # per layer: (1, nh, T, T) -> (nh, T, T)
    probs = F.softmax(logits[0, -1].double(), dim=-1)  # (V,): the next token after the prompt
    top = torch.topk(probs, min(cfg.top, probs.numel()))
    out.write(f"most likely next tokens after {cfg.prompt[-40:]!r}:\n")
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        token = tokenizer.token_bytes(i).decode("utf-8", errors="replace")
        out.write(f"  {token!r:>12} {p:7.2%} {'#' * round(p * 50)}\n")
    path = Path(cfg.svg) if cfg.svg else Path(cfg.out_dir) / "attention.svg"
    labels = [visible(tokenizer.token_bytes(i).decode("utf-8", errors="replace")) for i in shown]
    check_writable(path.parent)
    n = len(shown)
    write_atomically(path, attention_svg([w[:, -n:, -n:] for w in weights], labels))  # (nh, n, n) each
    log(f"wrote {path}: {len(weights)} layers x {weights[0].size(0)} heads over {len(shown)} tokens")
    out.flush()
    return list(zip(top.indices.tolist(), top.values.tolist())), weights


# ---- 15. Benchmark ---------------------------------------------------------------------------
#
# `python gpt.py bench` times the default model on this machine: training steps in float32
# and in the --dtype auto format (alternating, so both see the same machine), and sampling
# with and without the KV cache. Results go to stdout as a table; progress to stderr.
#
# `python gpt.py bench --contexts 256,512,1024,2048,4096` times instead one training step of
# the default model's width at each context, with the written-out and with the fused
# attention, and the peak memory of each. Attention's work grows with T^2: every token looks
# at every earlier one. The written-out version also holds the (B, nh, T, T) weights for the
# backward pass, so its memory grows with T^2 too; the fused kernel keeps only what grows with
# T. A variant that runs out of memory is reported as such, and not tried at longer contexts.

@dataclass
class BenchConfig:
    device: str = option("auto", "where to run; auto picks cuda, then mps, then cpu", choices=DEVICES)
    steps: int = option(10, "timed training steps per round")
    rounds: int = option(3, "rounds; each times every variant once, in turn; the tables show medians")
    sample_tokens: int = option(1000, "tokens to sample from a one-token prompt")
    contexts: str = option(None, "instead, time a training step at each of these contexts, written-out and fused "
                           "attention, e.g. 256,512,1024,2048,4096", default_text="the usual bench")
    context_batch: int = option(4, "sequences per step in the --contexts bench")
    context_steps: int = option(3, "timed steps per context and attention in the --contexts bench")

    def __post_init__(self):
        for name in ("steps", "rounds", "sample_tokens", "context_batch", "context_steps"):
            require(getattr(self, name) > 0, f"--{flag(name)} must be a positive whole number, got {getattr(self, name)}")
        if self.contexts is not None:
            try:
                values = [int(value) for value in self.contexts.split(",")]
            except ValueError:
                values = []
            require(values and all(value > 0 for value in values), f"--contexts {self.contexts!r}: expected positive "
                    f"whole numbers separated by commas, like 256,512,1024")


def median(values):
    return sorted(values)[len(values) // 2]


def bench(cfg, out=None):
    out = out or sys.stdout
    if cfg.contexts is not None:
        return bench_contexts(cfg, out)
    device = pick_device(cfg.device)
    dtypes = list(dict.fromkeys([torch.float32, pick_dtype("auto", device)]))  # float32 first; once if auto is float32
    config, train_cfg = GPTConfig(), TrainConfig()
    torch.manual_seed(0)
    model = GPT(config).to(device)
    peaks = {dtype: measure_peak_flops(device, dtype) for dtype in dtypes}
    threads = f", {torch.get_num_threads()} threads, native bfloat16: {'yes' if cpu_has_native_bfloat16() else 'no'}"
    out.write(f"torch {torch.__version__} on {device.type}{threads if device.type == 'cpu' else ''}\n")
    out.write(f"model: the default GPTConfig, {model.num_parameters():,} parameters, batch {train_cfg.batch_size}, "
              f"context {config.block_size}\n")
    out.write("matmul peak: " + ", ".join(f"{dtype_name(d)} {p / 1e9:,.0f} GFLOP/s" for d, p in peaks.items()) + "\n\n")
    bench_training(model, train_cfg, device, peaks, cfg, out)
    bench_sampling(model, device, dtypes, cfg, out)
    out.flush()


@contextlib.contextmanager
def memory_bounded(device):
    """On a Linux CPU, cap this process's address space at what it has plus 80% of the memory
    still available, so that a step too big for the machine fails with an error rather than
    making the system kill the process (or swap for minutes). Elsewhere nothing to do: CUDA
    reports its own out-of-memory error."""
    if device.type != "cpu" or not Path("/proc/meminfo").exists():
        yield
        return
    import resource  # Unix only
    available = re.search(r"MemAvailable:\s+(\d+)", Path("/proc/meminfo").read_text())
    in_use = re.search(r"VmSize:\s+(\d+)", Path("/proc/self/status").read_text())
    before = resource.getrlimit(resource.RLIMIT_AS)
    if available is None or in_use is None:  # an old kernel: leave the limits as they are
        yield
        return
    cap = (int(in_use.group(1)) + int(0.8 * int(available.group(1)))) * 1024
    cap = min([cap] + [limit for limit in before if limit != resource.RLIM_INFINITY])  # never loosen a limit
    resource.setrlimit(resource.RLIMIT_AS, (cap, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, before)


def memory_high_water(device, reset=False):
    """Bytes of memory at their highest since the last reset: CUDA's allocator counter, or on a
    Linux CPU the process's peak resident memory (VmHWM; reset through /proc/self/clear_refs).
    None where neither exists."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if device.type != "cpu" or not status.exists():
        return None
    try:
        if reset:
            ctypes.CDLL(None).malloc_trim(0)  # memory freed but kept by malloc goes back: resident = in use
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak to the current resident size
        return int(re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1)) * 1024
    except (OSError, AttributeError):  # no glibc, or a kernel that will not reset the peak: not measured
        return None


def time_context(T, attention, device, dtype, cfg):
    """Training steps of the default model's width at context T with the given attention ->
    (seconds per step, peak bytes it added to what was in use before), or None when out of memory."""
    model = optimizer = None
    gc.collect()
    before = memory_high_water(device, reset=True)
    try:
        torch.manual_seed(0)
        model = GPT(dataclasses.replace(GPTConfig(), block_size=T)).to(device)
        for module in model.modules():
            if isinstance(module, CausalSelfAttention):
                module.attention = attention
        optimizer, train_cfg = make_optimizer(model, TrainConfig()), TrainConfig()
        data = torch.randint(model.config.vocab_size, (cfg.context_batch * (T + 1) * 4,))
        batches = torch.Generator().manual_seed(0)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        def next_batch():
            x, y = get_batch(data, T, cfg.context_batch, batches)
            return to_device(x, device), to_device(y, device)

        def step():
            return train_step(model, list(model.parameters()), optimizer, scaler, next_batch, 1,
                              autocast(device, dtype), train_cfg.grad_clip)

        float(step())  # warm-up
        start = time.perf_counter()
        for _ in range(cfg.context_steps):
            loss = step()
        float(loss)  # waits for a GPU
        seconds = (time.perf_counter() - start) / cfg.context_steps
        peak = memory_high_water(device)
        return seconds, None if peak is None or before is None else peak - before
    except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if "memory" not in str(e).lower():
            raise
        return None
    finally:
        model = optimizer = None  # nothing of this context is kept for the next
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def bench_contexts(cfg, out):
    device = pick_device(cfg.device)
    dtype = pick_dtype("auto", device)
    contexts, variants = [int(value) for value in cfg.contexts.split(",")], ("written out", "fused")
    config = GPTConfig()
    out.write(f"torch {torch.__version__} on {device.type}, {dtype_name(dtype)}; the default model's width "
              f"({config.n_layer} layers x {config.n_head} heads x {config.n_embd}), batch {cfg.context_batch}, "
              f"{cfg.context_steps} timed steps after a warm-up\n\n")
    out.write("| context | " + " | ".join(f"{v}: ms/step | tokens/s | peak memory" for v in variants) + " |\n"
              "|---|---|---|---|---|---|---|\n")
    out_of_memory = {}
    with memory_bounded(device):
        # A first, untimed step loads the libraries' kernels, so that no variant in the table pays for it.
        time_context(min(contexts), "fused", device, dtype, dataclasses.replace(cfg, context_steps=1))
        for T in contexts:
            cells = []
            for variant in variants:
                if variant in out_of_memory and T >= out_of_memory[variant]:
                    cells.append(f"not tried (out of memory at {out_of_memory[variant]}) | | ")
                    continue
                result = time_context(T, variant, device, dtype, cfg)
                if result is None:
                    out_of_memory[variant] = T
                    cells.append("out of memory | | ")
                    log(f"context {T}, {variant}: out of memory")
                    continue
                seconds, peak = result
                shown = "-" if peak is None else f"{peak / 2**30:,.2f} GiB"
                cells.append(f"{seconds * 1000:,.0f} | {cfg.context_batch * T / seconds:,.0f} | {shown}")
                log(f"context {T}, {variant}: {seconds * 1000:,.0f} ms/step, peak memory {shown}")
            out.write(f"| {T} | " + " | ".join(cells) + " |\n")
            out.flush()


def bench_training(model, train_cfg, device, peaks, cfg, out):
    """Training steps, float32 and the auto format in turn, so that both see the same machine."""
    config, dtypes = model.config, list(peaks)
    auto = dtypes[-1]
    optimizer = make_optimizer(model, train_cfg)
    params = list(model.parameters())
    data = torch.randint(config.vocab_size, (100_000,), generator=torch.Generator().manual_seed(0))
    batches = torch.Generator().manual_seed(0)

    def next_batch():
        x, y = get_batch(data, config.block_size, train_cfg.batch_size, batches)
        return to_device(x, device), to_device(y, device)

    def one_step(dtype):
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        return train_step(model, params, optimizer, scaler, next_batch, 1, autocast(device, dtype), 1.0)

    seconds = {dtype: [] for dtype in dtypes}
    for round_ in range(cfg.rounds):
        for dtype in dtypes:
            one_step(dtype)  # warm-up: allocations, autocast's casts
            synchronize(device)
            start = time.perf_counter()
            for _ in range(cfg.steps):
                loss = one_step(dtype)
            float(loss)  # waits for the GPU
            seconds[dtype].append((time.perf_counter() - start) / cfg.steps)
        log(f"training round {round_ + 1}/{cfg.rounds}: " +
            ", ".join(f"{dtype_name(d)} {s[-1] * 1000:.0f} ms/step" for d, s in seconds.items()))
    tokens_per_step = train_cfg.batch_size * config.block_size
    flops_per_step = flops_per_token(model) * tokens_per_step
    out.write(f"training ({cfg.rounds} alternating rounds of {cfg.steps} steps, medians)\n")
    out.write(f"| number format | ms/step | tokens/s | MFU vs its own peak | MFU vs the {dtype_name(auto)} peak |\n"
              f"|---|---|---|---|---|\n")
    for dtype, s in seconds.items():
        out.write(f"| {dtype_name(dtype)}{' (auto)' if dtype == auto else ''} | {median(s) * 1000:.0f} | "
                  f"{tokens_per_step / median(s):,.0f} | {mfu(flops_per_step / median(s), peaks[dtype]):.0%} | "
                  f"{mfu(flops_per_step / median(s), peaks[auto]):.0%} |\n")
    if len(dtypes) > 1:
        ratios = [a / b for a, b in zip(seconds[torch.float32], seconds[auto])]
        out.write(f"speed-up of {dtype_name(auto)} over float32: {median(ratios):.2f}x (median of the rounds' ratios)\n")


def bench_sampling(model, device, dtypes, cfg, out):
    """Sampling: every variant once per round, in turn. The short run is the longest one from a
    one-token prompt that never refills the cache (block_size - 1 new tokens)."""
    auto, short, n = dtypes[-1], model.config.block_size - 1, cfg.sample_tokens
    runs = ((short, True), (n, True), (n, False))  # (new tokens, KV cache)
    speed = {(dtype, tokens, kv_cache): [] for dtype in dtypes for tokens, kv_cache in runs}
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    for round_ in range(cfg.rounds):
        for dtype, tokens, kv_cache in speed:
            model.to(dtype)
            generate(model, prompt, 8, kv_cache=kv_cache)  # warm-up
            start = time.perf_counter()
            generate(model, prompt, tokens, kv_cache=kv_cache, generator=torch.Generator().manual_seed(0))
            speed[dtype, tokens, kv_cache].append(tokens / (time.perf_counter() - start))
        log(f"sampling round {round_ + 1}/{cfg.rounds}: " + ", ".join(
            f"{dtype_name(d)} {t}{'' if kv else ' uncached'} {s[-1]:,.0f}" for (d, t, kv), s in speed.items()) +
            " tokens/s")
    out.write(f"\nsampling one sequence from a one-token prompt, tokens/s ({cfg.rounds} rounds, medians; "
              f"`sample` uses {dtype_name(auto)} weights)\n| weights | KV cache, {short} tokens | KV cache, {n} tokens "
              f"| no cache, {n} tokens |\n|---|---|---|---|\n")
    for dtype in dtypes:
        out.write(f"| {dtype_name(dtype)} | " + " | ".join(f"{median(speed[dtype, t, kv]):,.0f}" for t, kv in runs) +
                  " |\n")
    # Each round's KV-cache speed over that round's fastest recomputation: a ratio of runs made
    # seconds apart, so a machine that speeds up or slows down between rounds does not skew it.
    ratios = [speed[auto, n, True][r] / max(speed[dtype, n, False][r] for dtype in dtypes) for r in range(cfg.rounds)]
    out.write(f"KV cache ({dtype_name(auto)}) over the fastest recomputation, at {n} tokens: "
              f"{median(ratios):.1f}x (median of the rounds' ratios; lowest {min(ratios):.1f}x)\n")


# ---- 16. Command line ------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        """A mistyped flag gets one line, not the whole usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    parser = ArgumentParser(prog="gpt.py", description="GPT-2 in one file: train it, sample from it, look inside "
                            "it, time it.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,inspect,prepare,bench}")
    for name, config_class, about in (
        ("train", TrainConfig, "train a GPT on a text file (or fine-tune GPT-2 with --init-from)"),
        ("sample", SampleConfig, "write text with a trained model"),
        ("inspect", InspectConfig, "print the likely next tokens after a prompt; draw what the model attends to"),
        ("prepare", PrepareConfig, "encode a text once into a token file that train --data memory-maps"),
        ("bench", BenchConfig, "time training and sampling of the default model on this machine"),
    ):
        command = commands.add_parser(name, help=about, description=about)
        for f in dataclasses.fields(config_class):
            meta = dict(f.metadata)
            text = f"{meta.pop('help')} (default: {meta.pop('default_text', f.default)})".replace("%", "%%")
            if isinstance(f.default, bool):
                command.add_argument("--" + flag(f.name), action="store_true", default=argparse.SUPPRESS, help=text)
            else:
                command.add_argument("--" + flag(f.name), type=f.type, default=argparse.SUPPRESS, help=text, **meta)
    return parser


def main(argv=None):
    """Run the command line; -> the exit status (0 done, 1 an error, 2 a mistyped flag, 130 Ctrl-C)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed --help, or its one-line error
        return e.code
    given = {k: v for k, v in vars(args).items() if k != "command"}  # only the flags typed: no defaults
    try:
        if args.command == "train":
            cfg, checkpoint = resumed_config(given) if given.get("resume") else (TrainConfig(**given), None)
            return 130 if train(cfg, checkpoint)["interrupted"] else 0
        if args.command == "sample":
            sample(SampleConfig(**given))
        elif args.command == "inspect":
            inspect(InspectConfig(**given))
        elif args.command == "prepare":
            prepare(PrepareConfig(**given))
        else:
            bench(BenchConfig(**given))
        return 0
    except GPTError as e:
        log(f"error: {' '.join(str(e).split())}")
        return 1
    except KeyboardInterrupt:
        log("\ninterrupted")
        return 130
    except BrokenPipeError:  # whoever read our output stopped reading (python gpt.py sample | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
