"""gpt.py: GPT-2 in one file that you can read from top to bottom, then run.

    python gpt.py train            # train a character-level GPT on input.txt (Shakespeare)
    python gpt.py sample           # write text with the checkpoint that training saved
    python gpt.py inspect          # the likely next tokens after a prompt, and what the model attends to
    python gpt.py prepare          # encode a large text once into a file of token ids for train --data
    python gpt.py bench            # measure this machine: training and sampling speed
    python gpt.py train --help     # every flag, with its default

The architecture is GPT-2's exactly (Radford et al. 2019, "Language Models are Unsupervised
Multitask Learners", and OpenAI's released code): token and position embeddings, a stack of
pre-LayerNorm transformer blocks with causal multi-head self-attention and a 4x-wide GELU MLP,
a final LayerNorm, and an output layer that shares its weights with the token embedding. Its
parameters carry the names of Hugging Face's GPT-2 checkpoints, which follow OpenAI's code, so
GPT.from_pretrained("gpt2") loads the real weights into it.

Part I, the GPT, is the code that runs; read it first. It takes token ids to logits, a loss, a sample:
    1. Config           what a model is made of: GPTConfig
    2. Tokenizers       text <-> integers: CharTokenizer, BPETokenizer
    3. Data             token ids -> batches of (input, target) windows
    4. Model            attention (written out, then fused), RoPE, MLP, Block, GPT
    5. Training         learning-rate schedule, AdamW, one training step, evaluation, the run
    6. Sampling         temperature, top-k, top-p; recomputing the context; the KV cache

Part II (sections 7 to 16) makes it fast, safe and usable; Part I calls into it by names that say what
happens there. A first reading can take Tq = Tk, kv_cache None, float32, one process, and skip RoPE,
causal_attention_fused (the same maths in one call), KVCache and sample_with_kv_cache (generate's
default loop; sample_by_recomputing, its simple twin, is the same while the text fits, and slower).

Shapes are written in comments with these letters:
    B  batch size (how many sequences at once)     T  time: tokens in a sequence (Tq of queries, Tk of keys)
    C  channels (n_embd, the width of the model)   V  vocabulary size
    nh number of attention heads                   hs head size (C // nh)
    L  number of layers (blocks)
"""

import math
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
# defaults are the model `python gpt.py train` trains: 0.8M parameters, which learn Shakespeare's
# shape in minutes on a laptop's CPU. GPT-2 small is GPTConfig(vocab_size=50257, block_size=1024,
# n_layer=12, n_head=12, n_embd=768).

@dataclass
class GPTConfig:
    vocab_size: int = 76    # how many different tokens: the tokenizer's (76 characters in input.txt; GPT-2: 50257)
    block_size: int = 128   # the longest context the model can look at (T <= block_size)
    n_layer: int = 4        # how many transformer blocks are stacked
    n_head: int = 4         # attention heads per block; each looks at hs = n_embd // n_head channels
    n_embd: int = 128       # C: the width of every token's vector
    dropout: float = 0.0    # probability of zeroing an activation while training (Hugging Face's GPT-2: 0.1)
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
#   the training text (76 for this repository's input.txt; 65 for tinyshakespeare). Tiny vocabulary, long sequences.
# - BPETokenizer: GPT-2's byte-level byte-pair encoding, through tiktoken. It starts from the
#   256 byte values (so it can encode *any* string), learned 50,000 merges of frequent pairs,
#   and adds one special token, <|endoftext|>: 256 + 50,000 + 1 = 50,257 ids. Common words are
#   one token each: input.txt is 3.2x shorter in BPE tokens than in characters.

class CharTokenizer:
    kind = "char"

    def __init__(self, chars):
        self.chars = "".join(chars)
        self.index = {ch: i for i, ch in enumerate(self.chars)}
        require(len(self.index) == len(self.chars) and self.chars,  # distinct, not empty: else a clear error (Part II)
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
# The whole text is encoded once into one long tensor of token ids. The first 90% trains the
# model, the last 10% measures how well it does on text it never trained on (validation). A
# training example is a random window of block_size + 1 tokens: the model reads the first
# block_size and, at every position t, predicts the token at t + 1. So one window teaches
# block_size predictions at once, each with a different amount of context.

def split_data(data, block_size):
    """Token ids (N,) -> (train, val): the first 90% and the last 10%, both still (N',) ids."""
    n_train = int(0.9 * len(data))  # 90/10, as nanoGPT (input.txt: eight plays; val: the last play's end)
    check_long_enough(len(data), len(data) - n_train, block_size)  # (N, N_val): each split holds a window: section 9
    return data[:n_train], data[n_train:]  # (0.9 N,), (0.1 N,)


def get_batch(data, block_size, batch_size, generator):
    """batch_size random windows of data -> inputs x and targets y, both (B, T); y is x shifted by one."""
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)  # (B,), each < N - T
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
# correction into it, so gradients flow straight from the output to the first layer. With the
# LayerNorms inside the branches, nothing on that path is normalised or squashed before ln_f,
# which is why pre-LayerNorm stacks train stably without a long warm-up (Xiong et al. 2020).

def causal_mask(Tq, Tk, dtype, device):
    """The causal mask, (Tq, Tk), added to the scores. The target at position t is the input at t + 1: a position
    that could look ahead would copy its answer instead of predicting it (and when sampling, the future does
    not exist yet). So the query at position t sees keys 0..t only: the mask adds 0 there and -inf on the
    future, whose weight becomes exp(-inf) = 0. The queries are the last Tq of Tk positions (a sampled token
    with a KV cache: Tq = 1, one row of zeros).
    Left, training (Tq = Tk = 3). Right, queries at positions 3, 4 after keys 0..2 cached (Tq = 2, Tk = 5):
        [0 -inf -inf]        [0 0 0 0 -inf]
        [0    0 -inf]        [0 0 0 0    0]
        [0    0    0]
    (Built from comparisons of positions: torch.triu of -inf has given NaN on Apple's GPUs.)"""
    query_positions = torch.arange(Tk - Tq, Tk, device=device)[:, None]  # (Tq, 1)
    future = torch.arange(Tk, device=device) > query_positions  # (Tk,) > (Tq, 1) -> (Tq, Tk)
    return torch.zeros((Tq, Tk), dtype=dtype, device=device).masked_fill(future, float("-inf"))  # (Tq, Tk)


def causal_attention_written_out(q, k, v, dropout_p=0.0):
    """Attention as the paper writes it, the version to learn: softmax(q @ k^T / sqrt(hs) + mask) @ v.
    q is (B, nh, Tq, hs); k and v are (B, nh, Tk, hs) with Tk >= Tq: the queries are the last
    Tq of the Tk positions (Tq = Tk in training; Tq = 1 for a new token with a KV cache)."""
    Tq, Tk, hs = q.size(-2), k.size(-2), q.size(-1)
    # How well each query matches each key. With independent entries of mean 0 and variance 1,
    # q . k sums hs terms and has variance hs; dividing by sqrt(hs) brings it back to 1, so the
    # softmax does not saturate (one weight near 1, the rest near 0, gradients near 0) (Vaswani et al. 2017).
    scores = (q / math.sqrt(hs)) @ k.transpose(-2, -1)  # (B, nh, Tq, hs) @ (B, nh, hs, Tk) -> (B, nh, Tq, Tk)
    scores += causal_mask(Tq, Tk, scores.dtype, q.device)  # (B, nh, Tq, Tk) + (Tq, Tk)
    weights = F.softmax(scores, dim=-1)  # (B, nh, Tq, Tk): each row sums to 1
    weights = F.dropout(weights, dropout_p)  # p is 0 outside training; else zero some, scale the rest by 1 / (1 - p)
    return weights @ v  # (B, nh, Tq, Tk) @ (B, nh, Tk, hs) -> (B, nh, Tq, hs): a weighted mean of values


def causal_attention_fused(q, k, v, dropout_p=0.0):
    """The same computation in one call of PyTorch's fused kernel, F.scaled_dot_product_attention,
    which runs unless section 8 finds it slower or wrong: fewer passes over memory, and its flash
    and memory-efficient backends never hold the whole (Tq, Tk) score matrix (PyTorch picks a
    backend by device, dtype and shape). test_gpt.py checks that both versions agree."""
    Tq, Tk = q.size(-2), k.size(-2)
    if Tq == Tk:  # training, or a first pass over a prompt
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, Tq, hs)
    if Tq == 1:  # one new token with a KV cache: every earlier position is its past, nothing to mask
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, nh, 1, hs)
    # Several new tokens after cached ones (gpt.py's sampler never asks for this; a caller may):
    # SDPA's is_causal takes the queries as the first Tq positions (query i sees keys 0..i); ours are the last Tq.
    return causal_attention_written_out(q, k, v, dropout_p)


# RoPE, rotary position embeddings (Su et al. 2021, RoFormer; pos="rope", where GPT-2 learns wpe), is what
# most models since GPT-2 use. Read a vector's channels in pairs as complex numbers: for j < hs/2, a query q
# gives q_j = q[j] + i q[j + hs/2] (i = sqrt(-1)), a key k gives k_j. Then q . k = Re sum_j q_j conj(k_j), as
# Re((a + ib) conj(c + id)) = ac + bd. RoPE turns q_j by e^{i m theta_j} at q's position m, and k_j by
# e^{i n theta_j} at k's position n (a rotation: lengths kept), so a score is
#   Re sum_j q_j e^{i m theta_j} conj(k_j e^{i n theta_j}) = Re sum_j q_j conj(k_j) e^{i (m - n) theta_j}
# The positions enter only through m - n, how far apart the tokens are. The paper pairs neighbours (2j, 2j + 1);
# pairing j with j + hs/2 (GPT-NeoX, Hugging Face's LLaMA) is the same method, q's and k's channels renumbered alike.

def rope_angles(positions, hs):
    """positions (T,) -> cos and sin of the angles m * theta_j, each (T, hs/2), in float64, with
    theta_j = 10000^(-2j / hs): the first pairs turn fast with the position, the last slowly."""
    theta = 10000.0 ** (-torch.arange(0, hs, 2, dtype=torch.float64) / hs)  # (hs/2,)
    angles = positions.to(torch.float64)[:, None] * theta  # (T, 1) * (hs/2,) -> (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x (B, nh, T, hs) times e^{i angle}, pair by pair: (x1 + i x2)(cos + i sin) = (x1 cos - x2 sin)
    + i (x1 sin + x2 cos), x1 channel j, x2 channel j + hs/2; cos, sin (T, hs/2) of its positions."""
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
        # c_attn computes q, k and v for all heads in one matmul: C -> 3C. ("c_": GPT-2's names, from
        # its 1-wide convolutions, "Conv1D", whose weights section 11 transposes into a Linear's.)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        # c_proj mixes the heads' outputs back into the residual stream: C -> C.
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, kv_cache=None, layer=0, rope=None):
        """x (B, T, C) -> (B, T, C). While sampling, kv_cache holds the keys and values of the
        earlier positions (a KVCache, section 6) and layer is this block's number; else None.
        rope: RoPE's cos and sin for these positions, if the model uses RoPE."""
        B, T, C = x.shape
        nh, hs = self.n_head, C // self.n_head
        # q, k and v of every head in one matmul: c_attn's output is [q | k | v], each C wide, each
        # nh heads of hs channels. The head axis moves next to the batch axis: every (sequence,
        # head) pair becomes one independent attention computation.
        qkv = self.c_attn(x).view(B, T, 3, nh, hs)  # (B, T, C) -> (B, T, 3C) -> (B, T, 3, nh, hs)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # -> (3, B, nh, T, hs) -> 3 x (B, nh, T, hs)
        if rope is not None:  # queries and keys turned by their positions' angles; values are not
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # (B, nh, T, hs) each
        if kv_cache is not None:  # sampling: this step's keys and values join the earlier ones
            k, v = kv_cache.store(layer, k, v)  # 2 x (B, nh, T_past + T, hs)
        # Fused by default; written out for bfloat16 training on a CPU (faster) and half precision on MPS (section 8).
        attention = attention_for(q, k)  # one of the two functions above, chosen in section 8
        y = attention(q, k, v, self.dropout if self.training else 0.0)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, nh, hs) -> (B, T, C): heads side by side
        y = self.c_proj(y)  # (B, T, C) -> (B, T, C)
        return F.dropout(y, self.dropout) if self.training else y  # (B, T, C)


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
        return F.dropout(x, self.dropout) if self.training else x


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
    """GPT-2: token ids (B, T) -> a score (logit) for every possible next token at every position (B, T, V),
    and with targets the loss. The layers carry GPT-2's checkpoint names: transformer.wte, transformer.wpe,
    transformer.h.0 ... h.{L-1} (the blocks), transformer.ln_f, and lm_head, whose weight is wte's."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        # GPT-2's layers, in its order and names: the "word token embedding" (id -> vector), the
        # "word position embedding" (position -> vector; none with RoPE), the "hidden" blocks and a
        # final LayerNorm: one ModuleDict, filled key by key as wpe is optional (assigning transformer.wpe adds it).
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.vocab_size, config.n_embd)))
        if config.pos == "learned":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.transformer.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.transformer.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        # The output layer turns a vector back into a score per token. It *is* the token
        # embedding ("weight tying", Press & Wolf 2017, who found it also lowers perplexity;
        # GPT-2 does it): a token's input vector and output vector are one. Both weights are
        # (V, C), and a Linear computes x @ W^T, so one tensor serves both. It saves V x C
        # parameters: 38.6M of GPT-2 small's 124M.
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # (V, C)

        # GPT-2's initialisation: weights drawn with std 0.02 as in OpenAI's code, biases zero; LayerNorms keep
        # PyTorch's start, gain 1 and bias 0 (no rescaling), as the loop below draws only 2-D weights. The paper
        # (sec. 2.3), not its code, also scales the layers that write into the residual stream by
        # 1/sqrt(N), N the number of such layers: two c_proj per block, so N = 2 * n_layer (nanoGPT's
        # reading). This keeps the stream's variance from growing with depth. (OpenAI's wpe: 0.01; ours 0.02.)
        for name, p in self.named_parameters():  # wte and lm_head share one tensor: listed (as wte), drawn once
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
        start = kv_cache.length if kv_cache is not None else 0  # idx's first position (read before any layer stores)
        if start + T > self.config.block_size:
            raise ValueError(f"a sequence of {start + T} tokens is longer than block_size "
                             f"{self.config.block_size}, the longest this model has positions for")
        x, rope = self.transformer.wte(idx), None  # (B, T) -> (B, T, C)
        if self.config.pos == "learned":  # positions start..start+T-1: rows of wpe's (block_size, C) table
            x = x + self.transformer.wpe.weight[start:start + T]  # (B, T, C) + (T, C) -> (B, T, C)
        else:  # RoPE: the positions turn q and k inside attention instead
            rope = rope_for(self, start, T)  # cos, sin (T, hs/2), computed once per device: section 8
        x = F.dropout(x, self.config.dropout) if self.training else x  # embedding dropout (Hugging Face's embd_pdrop)
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
        """OpenAI's GPT-2 weights in this model: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl" (124M to
        1558M parameters), or a local Hugging Face folder or .safetensors file (section 11)."""
        return load_gpt2(name_or_path, dropout, block_size)


# ---- 5. Training -----------------------------------------------------------------------------
#
# Training makes the model less surprised by each next token. Each step: take a batch of random
# windows, compute the loss (the mean of -log p(the true next token)), backpropagate to get the
# gradient of every weight, clip it, and let AdamW update the weights. Every eval_interval
# steps, the loss on held-out text (validation) says whether the model learns or memorises.
# The settings come in cfg, a TrainConfig (section 12), one field per command-line flag; by default batch_size
# 32 and grad_accum 1 (micro-batches per step), lr 4e-3 after 100 warm-up steps, down to min_lr 3e-5 at max_iters
# 3,000, weight decay 0.7 (GPT-3's is 0.1; 0.7 did best for this small model: docs/results.md), beta2 0.99.

def learning_rate(step, cfg):
    """Linear warm-up, then a cosine decay to min_lr (GPT-3, appendix B). A pre-LayerNorm model
    still warms up, briefly: in the first steps Adam's estimate of each gradient's second moment
    rests on a few samples, and its updates can be too large (Liu et al. 2020, "On the Variance of
    the Adaptive Learning Rate and Beyond"); step s of the warm-up uses lr * (s + 1) / warmup_iters."""
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    decay_iters = cfg.lr_decay_iters or cfg.max_iters  # None: the decay ends at max_iters
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


def train_step(model, optimizer, scaler, next_batch, micro_batches, autocast_ctx, grad_clip):
    """One optimizer step over micro_batches batches from next_batch() -> their mean loss, a tensor
    (reading its value makes the CPU wait for a GPU: the run reads it only to log). Accumulating
    the gradients of several micro-batches gives the step of a batch larger than fits in memory.
    In float32, autocast_ctx and the scaler do nothing (scaler.step is optimizer.step()): read past them.

    Mixed precision (section 7): autocast_ctx runs the matmuls in bfloat16 or float16. In float16
    small gradients would round to zero, so the scaler multiplies the loss by a large factor
    before backward, unscale_ divides the gradients back before clipping (which must see their
    true size), and step skips an update whose gradients overflowed (bfloat16 needs none of it)."""
    total = 0.0
    for i in range(micro_batches):
        x, y = next_batch()
        # One process: nothing. With several, DDP averages the gradients across them once per step,
        # during the last micro-batch's backward pass (section 12).
        with gradients_averaged(model, now=(i == micro_batches - 1)):
            with autocast_ctx:
                _, loss = model(x, y)
            scaler.scale(loss / micro_batches).backward()  # .grad sums the n backwards of loss / n: the mean's gradient
        total += loss.detach()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)  # one bad batch cannot throw the weights far
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)  # the next step's gradients start from zero
    return total / micro_batches


@torch.no_grad()
def estimate_loss(model, batches, autocast_ctx):
    """The mean loss over batches, an iterable of (x, y), with dropout off (model.eval())."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        with autocast_ctx:
            total += model(x, y)[1]
        count += 1
    model.train()
    return total / count


def train(cfg, resume_checkpoint=None):
    """Train a GPT as cfg (a TrainConfig) says -> {"step", "best_val_loss", "history", "interrupted"}.
    Stripped of `run` (its calls can be skipped on a first reading), in one process the loop below is:
        for step in range(cfg.max_iters):
            if step % cfg.eval_interval == 0: evaluate()
            lr = learning_rate(step, cfg), set in every param group; train_step(model, optimizer, ...)
    `run`, a TrainingRun (section 12), is the engineering around it: it checks every input before anything is
    written, reads the text, picks the tokenizer and device, joins other processes (torchrun), resumes, logs, saves
    and stops. A "collective" call is one that every process must make (else all wait)."""
    run = TrainingRun(cfg, resume_checkpoint)
    cfg, device = run.cfg, run.device  # with --resume, the saved settings; flags given now override them

    # The data: run.tokens, the text's ids by run.tokenizer (or a `prepare` file's, section 9): 90% train, 10% val.
    train_data, val_data = split_data(run.tokens, cfg.block_size)

    # The model: GPT-2's initialisation drawn from the seed, or the weights of --init-from (GPT-2's or a checkpoint's)
    # or of a resumed run. run.config is its GPTConfig: the shape flags (or the weights'), vocab_size the tokenizer's.
    torch.manual_seed(cfg.seed)
    model = GPT(run.config) if run.weights is None else model_with_weights(run.config, run.weights)  # section 11
    model.to(device)
    optimizer = make_optimizer(model, cfg)
    batch_rng = torch.Generator().manual_seed(cfg.seed)  # the training windows' own random numbers
    run.start(model, optimizer, batch_rng)  # --resume: their saved states back; then logs model, data and device

    def next_batch():  # random training windows, on the model's device
        x, y = get_batch(train_data, cfg.block_size, cfg.batch_size, batch_rng)
        return to_device(x, device), to_device(y, device)  # section 7

    def evaluation_batches(data, seed, split):  # the same windows at every evaluation, drawn separately from training's
        generator = torch.Generator().manual_seed(seed)
        for _ in Progress(f"evaluating the {split} loss", cfg.eval_iters):  # a long one logs (Progress: top of Part II)
            x, y = get_batch(data, cfg.block_size, cfg.batch_size, generator)
            yield to_device(x, device), to_device(y, device)

    def evaluate():  # both splits -> {"train": loss, "val": loss}
        train_loss = estimate_loss(model, evaluation_batches(train_data, cfg.seed + 1, "train"), run.autocast_ctx)
        val_loss = estimate_loss(model, evaluation_batches(val_data, cfg.seed + 2, "val"), run.autocast_ctx)
        return {"train": train_loss.item(), "val": val_loss.item()}

    # In one process run.share_of(next_batch) is next_batch, and training_model is model (or compiled). With
    # N processes (torchrun, section 12) each runs grad_accum / N micro-batches, its share; DDP averages the gradients.
    training_model, micro_batches = run.compiled_and_wrapped(model), cfg.grad_accum // process_count()
    with stop_on_ctrl_c() as stop_requested:  # Ctrl-C or SIGTERM: finish the step, save, stop (section 12)
        while run.step < cfg.max_iters:
            # Evaluate; save last.pt, ckpt.pt (the best so far), loss.svg. A resumed run may have evaluated this step.
            if run.step % cfg.eval_interval == 0 and not run.evaluated_at(run.step):
                run.evaluate_and_save(evaluate)  # collective
            lr = learning_rate(run.step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = train_step(training_model, optimizer, run.scaler, run.share_of(next_batch), micro_batches,
                              run.autocast_ctx, cfg.grad_clip)
            run.step += 1
            # Collective: now and then logs the loss, the speed and the ETA; stops on a NaN; True
            # once a stop was asked for (Ctrl-C or SIGTERM), then every process stops here.
            if run.after_step(loss, lr, stop_requested):
                return run.finish(interrupted=True)  # collective: saves last.pt
        if not run.evaluated_at(run.step):
            run.evaluate_and_save(evaluate)
    return run.finish()


# ---- 6. Sampling -----------------------------------------------------------------------------
#
# The model gives a score (logit) for every possible next token. To write text we turn the
# scores into probabilities, draw one token, append it, and repeat:
#   temperature  divides the scores: below 1 sharpens the distribution, above 1 flattens it;
#                0 means "always the most likely token" (greedy).
#   top_k        keep only the k most likely tokens (and any tied with the k-th).
#   top_p        keep only the most likely tokens, until their probabilities reach p ("nucleus").
# The draw runs on the CPU in float32 whatever the device: torch.multinomial on Apple's GPUs has
# drawn impossible ids (section 13). As a second guard, every drawn id is checked.

def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> the next token ids (B, 1), on the CPU."""
    logits = logits.float().cpu()  # (B, V) -> (B, V) in float32 on the CPU
    if temperature < 1e-5:  # 0, or below 1e-5 as in vLLM: greedy (1e-40 would overflow logits / temperature)
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits / temperature  # (B, V)
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))  # (B, V)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V), most likely first
        # A token is in the nucleus if the tokens sorted before it add up to less than top_p (so the likeliest always
        # is): probs .5 .3 .2, top_p .7, sums before each 0 .5 .8: keep .5, .3, drop .2.
        sums_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V)
        outside = sums_before.double() >= top_p  # (B, V); in float64, as float32 would round a top_p of 1e-50 to 0
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))  # (B, V): each back at its id
    next_ids = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1); it renormalises
    return checked_draw(next_ids, probs)  # never an id outside the vocabulary or of probability 0: section 13


def sample_by_recomputing(model, context, max_new_tokens, draw):
    """The simple loop: each new token runs the model over the whole context, its last block_size tokens."""
    for _ in range(max_new_tokens):
        logits, _ = model(context)  # (B, T, V): the whole context, every time
        next_id = draw(logits[:, -1, :])  # (B, V) -> (B, 1): only the last position's scores matter
        yield next_id
        context = torch.cat([context, next_id.to(context.device)], dim=1)  # (B, T + 1)
        context = context[:, -model.config.block_size:]  # the newest block_size tokens


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
        if not self.keys:  # made once, at its full size, on k's device, in kv_cache_dtype (section 8)
            self.keys = [k.new_zeros(self.shape, dtype=kv_cache_dtype(k)) for _ in range(self.n_layer)]
            self.values = [v.new_zeros(self.shape, dtype=kv_cache_dtype(v)) for _ in range(self.n_layer)]
        keys, values, start, T = self.keys[layer], self.values[layer], self.length, k.size(2)
        # Each step writes into the cache rather than concatenating, which would copy every
        # stored position again.
        keys.narrow(2, start, T).copy_(k)  # (B, nh, T, hs) into positions start.. of (B, nh, block_size, hs)
        values.narrow(2, start, T).copy_(v)
        if layer == self.n_layer - 1:  # every layer wrote at self.length (forward's start); the last advances it
            self.length += T
        return keys.narrow(2, 0, start + T), values.narrow(2, 0, start + T)  # 2 x (B, nh, T_past + T, hs)


def sample_with_kv_cache(model, context, max_new_tokens, draw):
    """The same loop with a KV cache: the prompt in one pass, then one new position per token.

    Once block_size positions are stored, the cache cannot just drop its oldest one: the keys and values
    of the layers after the first carry that token's information (their inputs attended to it), and a learned
    position is absolute. So the cache starts again: the newest half of the context, computed anew
    in one pass at positions 0, 1, ... Example, block_size 4, prompt "ab"; read "x -> y [n]" as "feed x,
    draw y, the cache now holds n": ab -> c [2]; c -> d [3]; d -> e [4: full]; refill: d, e -> f [2].
    Why half: refilled with block_size - 1 tokens, it would be full again after one more token, and refill
    every other token. From then on the model sees block_size / 2 to block_size tokens, where the simple loop
    always sees block_size; training saw every length up to block_size, so both are contexts it knows."""
    block_size = model.config.block_size
    # pending: the tokens to feed next, not yet in the cache: the prompt; each drawn token; a refill's half (d, e above)
    # context: the newest block_size tokens, prompt and draws (the loop's last line keeps it): what a refill halves.
    cache, pending = KVCache(model.config, context.size(0)), context
    for _ in range(max_new_tokens):
        if cache.length + pending.size(1) > block_size:  # full: refill from context (the newest tokens), half
            pending, cache = context[:, -max(1, block_size // 2):], KVCache(model.config, context.size(0))
        with one_row_matmuls(pending):  # speed only (section 8): one new token makes each matmul one row
            logits, _ = model(pending, kv_cache=cache)  # (B, T_pending, V)
        next_id = draw(logits[:, -1, :])  # (B, V) -> (B, 1)
        yield next_id
        pending = next_id.to(context.device)
        context = torch.cat([context, pending], dim=1)[:, -block_size:]  # (B, <= block_size): to refill the cache from


@torch.inference_mode()
def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, kv_cache=True,
                    generator=None):
    """Yield max_new_tokens new token ids, each (B, 1) on the CPU, one at a time. While the text fits
    in block_size both loops draw the same tokens for a float64 model; in float32 rounding can change one."""
    check_sampling_settings(temperature, top_k, top_p, prompt=idx, vocab_size=model.config.vocab_size)  # section 13

    def draw(logits):  # (B, V) -> (B, 1)
        return sample_next_token(logits, temperature, top_k, top_p, generator)

    loop = sample_with_kv_cache if kv_cache else sample_by_recomputing
    was_training = model.training
    model.eval()  # no dropout while sampling; the model gets back its mode at the end
    try:
        yield from loop(model, idx[:, -model.config.block_size:], max_new_tokens, draw)  # (B, T) the visible tokens
    finally:
        model.train(was_training)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, kv_cache=True, generator=None):
    """generate_stream, collected: idx (B, T) -> (B, T + max_new_tokens), the prompt and the new tokens."""
    new = list(generate_stream(model, idx, max_new_tokens, temperature, top_k, top_p, kv_cache, generator))
    return torch.cat([idx, *(token.to(idx.device) for token in new)], dim=1)


# ==== Part II: making it real =================================================================
#
# Everything above is the GPT. What follows makes it fast, safe and usable:
#    7. Devices          CPU / CUDA / Apple MPS, and the number formats (float32, bfloat16, float16)
#    8. Speed            which attention runs where, one-row matmuls, RoPE's angles, FLOPs and MFU
#    9. Data files       reading a text, with a clear error for each way it can be wrong; `prepare`
#   10. Checkpoints      one file holds everything needed to sample or to resume
#   11. GPT-2's files    OpenAI's released weights read into GPT; the BPE files offline
#   12. Training runs    settings, several processes, resuming, logging with an ETA, Ctrl-C, NaN
#   13. Sampling runs    the `sample` command: settings, the safe draw, text streamed token by token
#   14. Pictures         loss.svg from every run; `inspect`: next-token probabilities, attention.svg
#   15. Benchmark        how fast this machine trains and samples
#   16. Command line     train, sample, inspect, prepare, bench, and one-line errors

import argparse  # noqa: E402
import array  # noqa: E402
import codecs  # noqa: E402
import concurrent.futures  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import gc  # noqa: E402
import glob  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import mmap  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from pathlib import Path  # noqa: E402
from xml.sax.saxutils import escape as xml_escape  # noqa: E402

import torch.distributed as dist  # noqa: E402


# Errors, progress, files and flags, for every section below (and the few checks Part I calls).

class GPTError(ValueError):
    """A problem a person can act on (a bad flag, an unreadable file, a diverged run): the command
    line prints it as one line, without a traceback. A bug in gpt.py still shows its traceback."""


def require(condition, message):
    if not condition:
        raise GPTError(message)


LOG_EVERY_SECONDS = 3  # a long job is never silent for longer


def log(message, every_process=False):
    """Progress goes to stderr (stdout carries only sampled text and tables); rank 0 alone speaks, but for errors."""
    if every_process or os.environ.get("RANK", "0") == "0":
        try:
            print(message, file=sys.stderr, flush=True)
        except OSError:  # its reader has gone (`train 2>&1 | tee log`, then Ctrl-C): the job goes on, unheard
            pass


def duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """A long job's progress, rate and ETA: a line every LOG_EVERY_SECONDS once it has run that long,
    and one at the end (a quick job says nothing). Call it with the amount done, or iterate over it."""

    def __init__(self, what, total, unit="batches", scale=1):
        self.what, self.total, self.unit, self.scale = what, total, unit, scale
        self.start = self.last = time.perf_counter()
        self.spoke = False

    def __call__(self, done, note=""):
        now = time.perf_counter()
        if now - self.last >= LOG_EVERY_SECONDS or (self.spoke and done >= self.total):
            rate, digits = done / max(now - self.start, 1e-9), 1 if self.scale > 1 else 0
            log(f"{self.what}: {done / self.scale:,.{digits}f} of {self.total / self.scale:,.{digits}f} {self.unit}, "
                f"{rate / self.scale:,.1f} {self.unit}/s{note}, ETA {duration((self.total - done) / max(rate, 1e-9))}")
            self.last, self.spoke = now, True

    def __iter__(self):
        for i in range(self.total):
            self(i)
            yield i
        self(self.total)


def write_atomically(path, write, also=None):
    """Write path so that a crash at any moment leaves the old file or the new one, never half of one:
    write(f) fills a temporary file beside it, flushed to disk, then renamed over path. also: a second
    name for the same file (a hard link, or a copy), renamed after path: never the newer of the two."""
    names = [Path(path)] + ([Path(also)] if also else [])
    names[0].parent.mkdir(parents=True, exist_ok=True)
    for name in names:  # leftovers of a write that was killed (not those of another process writing it now)
        for leftover in name.parent.glob(f".{glob.escape(name.name)}.*.tmp"):
            pid = leftover.name.removesuffix(".tmp").rpartition(".")[2]
            if pid.isdecimal() and not process_alive(int(pid)):
                with contextlib.suppress(OSError):  # gone already, or (Windows) open in a live writer
                    leftover.unlink()
    tmp = [name.with_name(f".{name.name}.{os.getpid()}.tmp") for name in names]
    try:
        with open(tmp[0], "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them "the" file
        if also:
            try:
                os.link(tmp[0], tmp[1])
            except OSError:  # a file system without hard links: a copy, on disk before its rename too
                shutil.copyfile(tmp[0], tmp[1])
                with open(tmp[1], "rb") as f:
                    os.fsync(f.fileno())
        for t, name in zip(tmp, names):
            os.replace(t, name)
    except BaseException as e:
        for t in tmp:
            t.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise GPTError(f"could not write {path}: {e.strerror or e}; the files before it are untouched") from None
        raise
    if os.name == "posix":  # the renames themselves made durable
        folder = os.open(names[0].parent, os.O_RDONLY)
        os.fsync(folder)
        os.close(folder)


def process_alive(pid):  # on Unix, where signal 0 sends nothing but says whether pid runs; elsewhere taken as gone
    if os.name != "posix":
        return False
    try:
        os.kill(pid, 0)
        return True
    except OSError as e:
        return isinstance(e, PermissionError)  # another user's process


def head(path, size=4096):  # the first bytes of the file path
    with open(path, "rb") as f:
        return f.read(size)


def locked(path, wait=True):
    """path opened and locked (flock, on Unix) -> the open file: closing it, or the process ending, releases
    the lock. Another process's lock makes it wait, or with wait=False return None."""
    file = open(path, "w")
    if sys.platform != "win32":
        import fcntl  # Unix only
        try:
            fcntl.flock(file, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            file.close()
            return None
    return file


def out_of_memory(e):  # a MemoryError, or a RuntimeError of torch's (CUDA's, MPS's, the CPU allocator's) saying so
    return isinstance(e, MemoryError) or bool(re.search(r"out of memory|can't allocate|size calculation overflow", str(e)))


def check_writable(path, mark, flag_name, kind):  # path's folder takes files; path is absent, or mark is in its head
    folder = next(p for p in [path.parent, *path.parent.parents] if p.exists())  # the one path would be made in
    try:  # (made later, by the first write: a command that fails before it leaves no empty folder)
        (folder / f".write-test.{os.getpid()}").touch()
        (folder / f".write-test.{os.getpid()}").unlink()
    except OSError as e:
        raise GPTError(f"cannot write to {flag_name} {str(path.parent)!r}: {e.strerror or e}") from None
    require(not path.exists() or path.is_file() and mark in head(path), f"{flag_name} {str(path)!r} exists and is "
            f"not {kind}: gpt.py replaces only {kind} it wrote, never a text, a checkpoint, another picture or a folder")


def option(default, help, **argparse_kwargs):
    """A dataclass field that is also a command-line flag: its default and its --help text."""
    return dataclasses.field(default=default, metadata={"help": help, **argparse_kwargs})


def flag(name):
    return "--" + name.replace("_", "-")  # block_size -> --block-size


def check_seed(seed):  # torch's generators take 64 bits; train adds the process's rank to it
    require(0 <= seed < 2**63, f"--seed must be a whole number from 0 to 2**63 - 1, got {seed}")


def positive(settings, *names, shown=flag):
    for name in names:
        value = getattr(settings, name)
        require(type(value) is int and 0 < value < 2**63, f"{shown(name)} must be a positive whole number (below "
                f"2**63), got {value!r}")


# ---- 7. Devices and number formats -----------------------------------------------------------
#
# The same code runs on a CPU, an NVIDIA GPU (CUDA) and an Apple GPU (MPS). Mixed precision runs
# the matmuls in 16 bits, the weights and the optimizer in float32 (float16's loss scaling: train_step).
# `--dtype auto` picks bfloat16 where the hardware computes it natively: CUDA GPUs since Ampere
# (float16 before them) and CPUs with AVX512-BF16 or AMX (emulated, it is slower than float32);
# float32 elsewhere, MPS included. Each decision is a small function that tests check on a CPU
# with device objects (torch.device("mps") needs no Apple GPU).

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name):
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device("cuda" if available["cuda"] else "mps" if available["mps"] else "cpu")
    require(name in available, f"unknown device {name!r}: expected auto, cpu, cuda or mps")
    require(available[name], f"device {name!r} is not available on this machine "
            f"(available: {', '.join(d for d, ok in available.items() if ok)})")
    return torch.device(name)


def cpu_has_native_bfloat16():
    return any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))


def pick_dtype(name, device):
    if name != "auto":
        require(name in DTYPES, f"unknown dtype {name!r}: expected auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cuda":  # native bfloat16 only: older GPUs would emulate it, slowly
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bfloat16() else torch.float32


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def autocast(device, dtype):
    return contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def to_device(x, device):
    """x on device. On CUDA the copy may return before it is done, overlapping the GPU's work; on MPS
    such a copy could read freed memory before torch 2.13 (pytorch issues 139550, 189690)."""
    return x.to(device, non_blocking=device.type == "cuda")


def use_fused_adamw(params):
    """Whether AdamW may use its fused kernel: every parameter a float on a device that has one in this
    torch (MPS's came after 2.4). Decided up front: torch itself checks only in the first step()."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices  # private, hence the fallback
        devices = _get_fused_kernels_supported_devices()
    except ImportError:  # a torch that moved it: the devices that have had the kernel since 2.4
        devices = ["cpu", "cuda"]
    return all(p.device.type in devices and torch.is_floating_point(p) for p in params)


def check_training_dtype(dtype, device):
    """float16 training on MPS is refused: its loss scaling has failed in torch 2.4 to 2.7 (pytorch issue
    142397), and its fused Adam ignored the scaler's overflow flag until mid 2026 (NaN weights)."""
    require(not (device.type == "mps" and dtype == torch.float16), "--dtype float16 cannot train on Apple's "
            "MPS (its loss scaling has been broken in several torch releases): use --dtype bfloat16 or float32")


def synchronize(device):
    """Wait for the GPU to finish what it was given: timings need it (a CPU never queues work)."""
    if device.type in ("cuda", "mps"):
        getattr(torch, device.type).synchronize()


# ---- 8. Speed --------------------------------------------------------------------------------
#
# Part I computes the same thing on every machine; these choices change only how fast (or, for
# one device bug, whether it is right). The measurements behind them are in docs/speed.md.

forced_attention = []  # the kinds attention_forced() holds, innermost last; empty: attention_for decides


@contextlib.contextmanager
def attention_forced(kind):
    """Within it, every attention is the written-out one or the fused one: `inspect` records the
    written-out version's weights, `bench --contexts` times both, and tests compare them."""
    forced_attention.append(kind)
    try:
        yield
    finally:
        forced_attention.pop()


def attention_for(q, k):
    """The attention CausalSelfAttention (section 4) runs: the fused kernel, but for two cases. On MPS in
    half precision, its is_causal kernel has let tokens see the future (pytorch issue 195910). Training
    in bfloat16 on a CPU up to context 512, the written-out step is faster (1.6x at the defaults). Keys
    in another number format than q (a float32 KV cache, below) get q cast to theirs, the output back."""
    if forced_attention:
        fused = forced_attention[-1] == "fused"
    elif q.device.type == "mps":
        fused = q.dtype == torch.float32
    else:  # training (gradients on) in bfloat16 on a CPU, up to 512: written out
        fused = not (q.device.type == "cpu" and torch.is_grad_enabled() and q.dtype == torch.bfloat16
                     and q.size(-2) <= 512)
    attention = causal_attention_fused if fused else causal_attention_written_out
    if q.dtype == k.dtype:
        return attention
    return lambda q, k, v, dropout_p: attention(q.to(k.dtype), k, v, dropout_p).to(q.dtype)


def kv_cache_dtype(k):
    """The KV cache's number format for keys k: on a CPU float32 (or float64), whatever the model's:
    attention of one query over the cache runs there 3x faster than in bfloat16. On a GPU, k's."""
    return torch.promote_types(k.dtype, torch.float32) if k.device.type == "cpu" else k.dtype


@contextlib.contextmanager
def one_row_matmuls(idx):
    """Around a forward pass over idx (B, T): with T = 1 on a CPU (a new token) every matmul is a
    vector-matrix product, where PyTorch's own kernel beats oneDNN's (whose setup costs more)."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = previous and not (idx.size(1) == 1 and idx.device.type == "cpu")
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


def rope_for(model, start, T):
    """RoPE's cos and sin (section 4) for positions start .. start + T - 1, each (T, hs/2), computed
    once per device for all block_size positions and kept with the model, outside its state."""
    weight = model.transformer.wte.weight
    key = (weight.device, torch.promote_types(weight.dtype, torch.float32))  # float32, or float64 for a float64 model
    cache = model.__dict__.setdefault("rope_cache", {})
    if key not in cache:
        cos_sin = rope_angles(torch.arange(model.config.block_size), model.config.n_embd // model.config.n_head)
        cache[key] = [t.to(*key) for t in cos_sin]  # 2 x (block_size, hs/2)
    return [t[start:start + T] for t in cache[key]]  # 2 x (T, hs/2)


def timed(step, repeats, device, warmup=1):
    """Seconds per call of step(), after warm-up calls (memory, kernels, autocast's casts), the
    device waited for. Every timing in gpt.py goes through it."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def flops_per_token(model):
    """FLOPs to train on one token (PaLM, appendix B): 6 per parameter (2 forward, 4 backward) but for
    the position embedding, a lookup; plus attention's 12 * L * T * C."""
    c = model.config
    n_matmul = model.num_parameters() - (model.transformer.wpe.weight.numel() if c.pos == "learned" else 0)
    return 6 * n_matmul + 12 * c.n_layer * c.block_size * c.n_embd


PUBLISHED_PEAKS = {  # dense bf16/fp16 tensor-core FLOP/s per GPU, from NVIDIA's datasheets; SXM unless named
    "H100": 989e12, "H100 PCIE": 756e12, "H100 NVL": 835e12, "H200": 989e12, "H200 NVL": 835e12,
    "H800": 989e12, "H800 PCIE": 756e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10": 125e12, "V100": 125e12, "V100 PCIE": 112e12, "T4": 65e12,
}


def published_peak_flops(card):
    """A CUDA card's name -> its published dense 16-bit peak, or None. Whole words only: "NVIDIA
    RTX A1000" is no A100, "NVIDIA T400" no T4; "NVL" and "PCIe" pick the variant."""
    words = re.split(r"[^A-Z0-9]+", card.upper())  # "NVIDIA A100-SXM4-40GB" -> NVIDIA, A100, SXM4, 40GB
    for family in words:
        for name in [f"{family} {variant}" for variant in ("NVL", "PCIE") if variant in words] + [family]:
            if name in PUBLISHED_PEAKS:
                return PUBLISHED_PEAKS[name]
    return None


def measure_peak_flops(device, dtype):
    """The FLOP/s the hardware could reach in dtype, for the MFU: on a listed GPU in 16 bits its
    published peak; otherwise the best of a few large matmuls (what a training step mostly does)."""
    if device.type == "cuda" and dtype != torch.float32 and published_peak_flops(torch.cuda.get_device_name(device)):
        return published_peak_flops(torch.cuda.get_device_name(device))
    n = {"cpu": 1024, "mps": 2048}.get(device.type, 8192)
    generator = torch.Generator().manual_seed(0)  # its own: the probe must not move the training's random state
    a, b = (torch.randn(n, n, generator=generator).to(device, dtype) for _ in range(2))
    return 2 * n**3 / min(timed(lambda: a @ b, 4, device) for _ in range(5))


def mfu(flops_per_second, peak):
    """Model FLOPs utilisation: the share of the peak used; never above 1 (a probe's peak can be low)."""
    return flops_per_second / max(peak, flops_per_second)


# ---- 9. Data files ---------------------------------------------------------------------------
#
# What can be wrong with a text to train on, each with one clear error: the file (missing, a
# folder, unreadable, empty, not UTF-8), a character the vocabulary lacks, a text too short.
#
# `train` reads a text whole and encodes it: fine for a few hundred MB, not for tens of GB.
# `python gpt.py prepare` encodes a text once, a chunk at a time (its memory does not grow with
# the text), into a token file that `train --data` reads window by window:
#     8 bytes        TOKEN_FILE_MAGIC
#     8 bytes        N, the length of a JSON header (a little-endian unsigned integer)
#     N bytes        {"format": 1, "tokenizer": {...}, "dtype": "uint16" or "uint32", "tokens":
#                    count, "source": file name, "source_bytes": its size}, padded with spaces
#                    so that the ids start at a multiple of 64 bytes
#     the rest       the token ids, little-endian: uint16 while the vocabulary fits, else uint32
# The ids are exactly tokenizer.encode(whole text): a character is one token wherever the text
# is cut, and BPE never merges across a cut made just before whitespace that follows a
# non-whitespace character (GPT-2's pre-tokenizer always splits there).

def check_data_file(path):
    require(path.exists(), f"data file {str(path)!r} does not exist")
    require(not path.is_dir(), f"data file {str(path)!r} is a directory, not a text file")
    require(path.is_file(), f"data file {str(path)!r} is not a regular file (a pipe, a device): save it to a file first")


def check_characters(tokenizer, text):
    unknown = sorted(set(text) - tokenizer.index.keys())
    shown = ", ".join(repr(ch) for ch in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
    require(not unknown, f"the character vocabulary ({len(tokenizer.chars)} characters of the training text) "
            f"lacks {len(unknown)} character(s) of this text: {shown}")


def check_long_enough(n_tokens, n_val, block_size):
    need = 10 * (block_size + 1) + 10  # the 10% validation split then holds one window (+ 10: a margin)
    require(n_tokens - n_val > block_size and n_val > block_size, f"the data has {n_tokens} tokens: too short "
            f"for one window of block_size + 1 = {block_size + 1} tokens in both the training split (90%) and the "
            f"validation split (10%); give a text of at least {need} tokens or a smaller --block-size")


def tokenizer_to_dict(tokenizer):
    return {"kind": "char", "chars": tokenizer.chars} if tokenizer.kind == "char" else {"kind": "bpe", "encoding": "gpt2"}


def tokenizer_from_dict(d, source):  # source: the file that holds d, for the error
    kind = d.get("kind") if isinstance(d, dict) else None
    require(kind == "bpe" or kind == "char" and isinstance(d.get("chars"), str), f"{source}: unknown tokenizer "
            f"{str(d)[:80]}: expected kind 'bpe', or kind 'char' with its characters (chars) in one string")
    return CharTokenizer(d["chars"]) if kind == "char" else BPETokenizer()


TOKEN_FILE_MAGIC = b"GPTTOKS1"
PREPARE_CHUNK_BYTES = 4 << 20  # text read 4 MB at a time: the memory stays flat, whatever the size of the file
PREPARE_PIECE_CHARS = 1 << 20  # BPE encodes a chunk in pieces of about 1 MB, on several threads
LONGEST_UNCUT = 128 << 20  # text without a place to cut is held whole: up to this much
SAFE_CUT = re.compile(r"\S[ \t\n\r]")  # a non-whitespace character, then whitespace: cut between them


class TokenFile:
    """A token file's ids as split_data and get_batch (section 3) use a tensor: len(), a slice (nothing
    read), and positions (B, T+1) -> those ids, int64, read from the file only then (the page cache
    holds the rest: the process's memory does not grow with the file), each checked against its tokenizer.
    It reads the file it opened, even once the path names another (prepare run again while training)."""

    def __init__(self, file, start, length, dtype, tokenizer):
        self.file, self.start, self.length, self.dtype, self.tokenizer = file, start, length, dtype, tokenizer

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        size = self.dtype.itemsize  # bytes per id; self.start counts bytes
        if isinstance(index, slice):
            begin, end, _ = index.indices(self.length)
            return TokenFile(self.file, self.start + begin * size, max(0, end - begin), self.dtype, self.tokenizer)
        rows, raw = index.reshape(-1, index.size(-1)), bytearray()
        for row in rows:
            self.file.seek(self.start + int(row[0]) * size)
            raw += self.file.read(rows.size(1) * size)
        require(len(raw) == rows.numel() * size, f"{self.file.name} is shorter than when training began (written over "
                f"in place, not by prepare): prepare it again, then resume")
        ids = torch.frombuffer(raw, dtype=self.dtype).long().view(index.shape)
        ids = ids & 0xFFFF if self.dtype == torch.int16 else ids  # uint16's bits, read as int16, made positive
        require(0 <= ids.min() and ids.max() < self.tokenizer.vocab_size, f"{self.file.name} holds token ids outside "
                f"its tokenizer's {self.tokenizer.vocab_size} ({ids.min().item()} to {ids.max().item()}): prepare it again")
        return ids


def read_token_file(path):
    """A file written by prepare -> (its header, a TokenFile of its ids, the file kept open); None for any other file."""
    f = open(path, "rb", buffering=0)  # unbuffered: each read sees the file as it is; an OSError: main's line (section 16)
    try:
        if f.read(len(TOKEN_FILE_MAGIC)) != TOKEN_FILE_MAGIC:
            f.close()
            return None
        header_size, file_size = int.from_bytes(f.read(8), "little"), os.fstat(f.fileno()).st_size
        header = json.loads(f.read(min(header_size, file_size)))  # at most what the file has
    except (ValueError, RecursionError) as e:  # not JSON, or nested past Python's stack
        raise GPTError(f"cannot read {str(path)!r} as a token file ({e})".splitlines()[0]) from None
    header = header if isinstance(header, dict) else {}  # JSON, but not a header: incomplete, below
    dtype = {"uint16": torch.int16, "uint32": torch.int32}.get(header.get("dtype"))  # the same bits, signed
    start = len(TOKEN_FILE_MAGIC) + 8 + header_size
    require(header.get("format") == 1 and dtype is not None and isinstance(header.get("tokens"), int)
            and start + header["tokens"] * dtype.itemsize == file_size,
            f"{path} is not a complete token file (truncated, or written by another program)")
    return header, TokenFile(f, start, header["tokens"], dtype, tokenizer_from_dict(header.get("tokenizer"), path))


def last_cut(text, end, start=0):
    """The last SAFE_CUT place in text[start:end], found by looking back from end; 0 if there is none."""
    window = 256
    while True:
        cuts = [m.start() + 1 for m in SAFE_CUT.finditer(text, max(start, end - window), end)]
        if cuts or window >= end - start:
            return cuts[-1] if cuts else 0
        window *= 16


def cut_pieces(text):
    """text in pieces of about PREPARE_PIECE_CHARS, each ending at a SAFE_CUT place (the last before that size,
    else the first after it) or at the end of the text."""
    start = 0
    while len(text) - start > PREPARE_PIECE_CHARS:
        end, after = start + PREPARE_PIECE_CHARS, SAFE_CUT.search(text, start + PREPARE_PIECE_CHARS)
        cut = last_cut(text, end, start) or (after.start() + 1 if after else len(text))
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def encode_text(tokenizer, text):
    """train's text -> its ids (N,), tokenizer.encode(text) computed a piece at a time, to show progress."""
    ids, done, progress = array.array("q"), 0, Progress(f"encoding the text ({tokenizer.kind})", len(text),
                                                          "M characters", 1e6)
    if tokenizer.kind == "char":
        check_characters(tokenizer, text)  # its error counts every character the text has and the vocabulary lacks
    for piece in cut_pieces(text):
        ids.extend(tokenizer.encode(piece))
        done += len(piece)
        progress(done)
    return torch.frombuffer(ids, dtype=torch.int64)  # (N,), in the array's memory


def text_chunks(path, progress=lambda done: None, whole=False):
    """Yield the UTF-8 text of path in pieces of about PREPARE_CHUNK_BYTES, each ending at a last_cut or at the end
    of the file (whole: in one piece, uncut), or raise this section's error for a bad file. progress(bytes read)
    follows each read."""
    decoder, pending, done, lines = codecs.getincrementaldecoder("utf-8")(), "", 0, 0
    try:
        with open(path, "rb") as f:
            while raw := f.read(PREPARE_CHUNK_BYTES):
                held = decoder.getstate()[0]  # the bytes of a character cut by the last read
                try:
                    pending += decoder.decode(raw)
                except UnicodeDecodeError as e:  # e.start counts from held + raw (held: part of a character, no "\n")
                    line = lines + (held + raw)[:e.start].count(b"\n") + 1
                    raise GPTError(f"data file {str(path)!r} is not UTF-8 text: byte {done - len(held) + e.start} (line "
                                   f"{line}) is {(held + raw)[e.start:e.start + 1]!r}; save it as UTF-8") from None
                done, lines = done + len(raw), lines + raw.count(b"\n")
                progress(done)
                cut = 0 if whole else last_cut(pending, len(pending))
                if cut:
                    yield pending[:cut]
                    pending = pending[cut:]
                require(whole or len(pending) < LONGEST_UNCUT, f"data file {str(path)!r} has over {LONGEST_UNCUT >> 20} MB "
                        f"without whitespace after a word: prepare cuts the text there, to bound its memory")
            held = decoder.getstate()[0]  # none, unless the file ends inside a character
            require(not held, f"data file {str(path)!r} is not UTF-8 text: it ends inside a character, at byte "
                    f"{done - len(held)} ({held!r}); save it as UTF-8")
    except OSError as e:
        raise GPTError(f"cannot read data file {str(path)!r}: {e.strerror}") from None
    require(done, f"data file {str(path)!r} is empty")
    if pending:
        yield pending


def encode_chunk(tokenizer, text, lookup, typecode, pool):
    """text -> the bytes of its ids, as array typecode ("H": uint16, "I": uint32). Characters: lookup
    (code point -> id). BPE: tiktoken in pool's threads, on pieces of about PREPARE_PIECE_CHARS cut at
    last_cut, each made an array at once (2 or 4 bytes an id, where a list of ints takes about 36)."""
    if tokenizer.kind == "char":
        ids = lookup[torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()]  # (n,)
        data = bytearray(len(ids) * array.array(typecode).itemsize)
        torch.frombuffer(data, dtype=torch.int16 if typecode == "H" else torch.int32).copy_(ids)  # the same bits
        return data
    def encode(piece):  # tiktoken's plain encoding where no <|endoftext|> can be: its scan for one costs 10%
        ids = tokenizer.encode(piece) if "<|endoftext|>" in piece else tokenizer.encoding.encode_ordinary(piece)
        return array.array(typecode, ids)
    return b"".join(pool.map(encode, cut_pieces(text)))  # an array is bytes-like: joined as it is


@dataclass
class PrepareConfig:
    data: str = option("input.txt", "UTF-8 text file to encode")
    tokenizer: str = option("char", "char: one token per character; bpe: GPT-2's 50,257 tokens", choices=("char", "bpe"))
    out: str = option(None, "the token file to write (it replaces a token file, nothing else)",
                      default_text="the data file's name + .tokens")


def prepare(cfg):
    source, out = Path(cfg.data), Path(cfg.out or cfg.data + ".tokens")
    check_data_file(source)
    require(not head(source).startswith(TOKEN_FILE_MAGIC), f"--data {str(source)!r} is a token file already: train "
            f"--data reads it as it is")
    check_writable(out, TOKEN_FILE_MAGIC, "--out", "a token file")  # before the work, not after it
    size, tokenizer, lookup = source.stat().st_size, BPETokenizer() if cfg.tokenizer == "bpe" else None, None
    if tokenizer is None:  # a first pass for the vocabulary: the sorted set of characters
        chars = set()
        for chunk in text_chunks(source, Progress("collecting the characters", size, "MB", 1e6)):
            chars.update(chunk)
        tokenizer = CharTokenizer(sorted(chars))
        lookup = torch.zeros(max(map(ord, chars)) + 1, dtype=torch.int32)  # code point -> id
        lookup[torch.tensor([ord(ch) for ch in tokenizer.chars])] = torch.arange(tokenizer.vocab_size, dtype=torch.int32)
    typecode = "I" if tokenizer.vocab_size > 1 << 16 else "H"  # uint32 or uint16
    header = {"format": 1, "tokenizer": tokenizer_to_dict(tokenizer), "dtype": "uint32" if typecode == "I" else "uint16",
              "source": source.name, "source_bytes": size}
    room = len(json.dumps({**header, "tokens": 10**19}))  # the header's length, whatever the count
    room += -(len(TOKEN_FILE_MAGIC) + 8 + room) % 64  # and the spaces that start the ids at a multiple of 64
    count, progress = 0, Progress(f"encoding ({tokenizer.kind})", size, "MB", 1e6)

    def write(f):
        nonlocal count
        f.seek(len(TOKEN_FILE_MAGIC) + 8 + room)
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for chunk in text_chunks(source, lambda done: progress(done, f", {count:,} tokens")):
                ids = encode_chunk(tokenizer, chunk, lookup, typecode, pool)
                f.write(ids)  # in this machine's byte order: the format's little-endian on x86 and ARM
                count += len(ids) // array.array(typecode).itemsize
        f.seek(0)  # the header, now that the count is known
        f.write(TOKEN_FILE_MAGIC + room.to_bytes(8, "little") + json.dumps({**header, "tokens": count}).ljust(room).encode())

    write_atomically(out, write)  # only a finished file has the name
    log(f"wrote {out}: {count:,} {tokenizer.kind} tokens from {size / 1e6:,.1f} MB of text")
    return out


# ---- 10. Checkpoints -------------------------------------------------------------------------
#
# One torch.save'd dict holds everything needed to sample or to continue training: format
# (CHECKPOINT_FORMAT), model_state (the plain module's names, none of --compile's), config (the
# GPTConfig as a dict), tokenizer ({"kind": "char", "chars": ...} or {"kind": "bpe"}), step,
# loss (the last step's), best_val_loss, history (every evaluation), optimizer_state (and
# scaler_state for float16), train_args (every setting) and rng (every random generator's state;
# rng_by_rank with several processes). Saves are atomic (write_atomically); loads are data only
# (weights_only=True: tensors and plain data, never code, so a stranger's checkpoint runs nothing).

CHECKPOINT_FORMAT = 1
CHECKPOINT_KEYS = ("format", "model_state", "config", "tokenizer", "step", "loss")


def load_checkpoint(path):
    """Read a checkpoint, on the CPU, as data only, with a clear error for each way a file can be wrong."""
    path = Path(path)
    require(path.exists(), f"checkpoint {str(path)!r} does not exist; train one with: "
            f"python gpt.py train --out-dir {shlex.quote(str(path.parent))}")
    require(path.is_file(), f"checkpoint {str(path)!r} is not a file")
    try:
        path.open("rb").close()
    except OSError as e:
        raise GPTError(f"cannot read checkpoint {path}: {e.strerror}") from None
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles; the one-line error below says more
            warnings.simplefilter("ignore")
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types; each means "not a readable checkpoint"
        if "Weights only load failed" in str(e):
            raise GPTError(f"refused to load {path}: it is damaged, or holds Python objects that could run code "
                           f"when unpickled, and gpt.py loads checkpoints as data only") from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GPTError(f"{path} is not a readable checkpoint (truncated, or not written by gpt.py): {reason}") from None
    require(isinstance(checkpoint, dict), f"{path} is not a gpt.py checkpoint: it holds a {type(checkpoint).__name__}")
    version = checkpoint.get("format")
    require(version == CHECKPOINT_FORMAT, f"{path} has checkpoint format {version!r}; this gpt.py reads format "
            f"{CHECKPOINT_FORMAT}")
    missing = [key for key in CHECKPOINT_KEYS if key not in checkpoint]
    require(not missing, f"{path} is not a complete checkpoint: it lacks {', '.join(missing)}")
    return checkpoint


def checkpoint_config(checkpoint, source):
    try:
        return GPTConfig(**checkpoint["config"])
    except TypeError as e:
        raise GPTError(f"{source}: its config is not a GPTConfig ({e})") from None


def model_from_checkpoint(checkpoint, path="checkpoint"):
    model = model_with_weights(checkpoint_config(checkpoint, path), checkpoint["model_state"], source=path)
    tokenizer = tokenizer_from_dict(checkpoint["tokenizer"], path)
    require(tokenizer.vocab_size == model.config.vocab_size, f"{path}: the tokenizer has {tokenizer.vocab_size} "
            f"tokens but the model {model.config.vocab_size}")
    return model, tokenizer


# ---- 11. GPT-2's files: the released weights, and the BPE files offline ----------------------
#
# OpenAI released GPT-2 in four sizes; the Hugging Face hub serves each as config.json (the
# shape) and model.safetensors (the weights). Safetensors holds only numbers, and is simple
# enough to read by hand: 8 bytes giving the length N of a JSON header, N bytes of header
# ({name: {"dtype": "F32", "shape": [768, 2304], "data_offsets": [begin, end]}, ...}), then the
# raw bytes of every tensor. Its names are ours, with or without "transformer." (our names
# follow Hugging Face's). But GPT-2's code computes its linear layers with a "Conv1D" that
# stores the weight as (in, out), where nn.Linear stores (out, in): the four matrices of each
# block are transposed on the way in. lm_head is the token embedding, stored once.

GPT2_SIZES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")  # 124M, 355M, 774M and 1558M parameters
GPT2_URL = "https://huggingface.co/openai-community/{name}/resolve/main/{file}"
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def read_safetensors(path):
    """A .safetensors file -> {name: tensor}, each checked, each a view of a memory map of the file:
    nothing is read until it is used, and GPT-2 XL's 6 GB are never held twice."""
    try:
        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # copy-on-write: never written back
        header_size = int.from_bytes(buffer[:8], "little")
        header = json.loads(buffer[8:8 + header_size]) if 8 + header_size <= len(buffer) else None
    except (OSError, ValueError, RecursionError) as e:
        raise GPTError(f"cannot read {str(path)!r} as a safetensors file ({e})".splitlines()[0]) from None
    require(isinstance(header, dict), f"{path} is not a safetensors file: it does not start with a JSON header")
    header.pop("__metadata__", None)  # the file's own notes, not a tensor
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[info["dtype"]], list(info["shape"]), info["data_offsets"]
            count = math.prod(shape)
            if not all(type(n) is int and n >= 0 for n in [*shape, begin, end]):
                raise ValueError  # each size and offset a whole number, 0 or more
        except (KeyError, TypeError, ValueError):
            raise GPTError(f"{path}: tensor {name} has no valid dtype ({', '.join(SAFETENSORS_DTYPES)}), shape and "
                           f"data_offsets") from None
        require(0 <= begin <= end and end - begin == count * dtype.itemsize and 8 + header_size + end <= len(buffer),
                f"{path}: the bytes of tensor {name} do not fit its shape {shape} or the file (truncated?)")
        flat = torch.frombuffer(buffer, dtype=dtype, count=count, offset=8 + header_size + begin) if count else \
            torch.empty(0, dtype=dtype)  # (count,)
        tensors[name] = flat.view(shape)
    return tensors


def gpt2_config_from_json(path):
    """Hugging Face's config.json for GPT-2 -> GPTConfig, refusing settings our model does not have."""
    try:
        hf = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise GPTError(f"cannot read {str(path)!r} as a GPT-2 config.json ({e})".splitlines()[0]) from None
    require(isinstance(hf, dict), f"{path} is not a GPT-2 config.json: it holds no JSON object")
    try:
        config = GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"], bias=True)
    except GPTError as e:  # a size no model can have
        raise GPTError(f"{path}: {e}") from None
    except KeyError as e:
        raise GPTError(f"{path} lacks the key {e.args[0]!r} that a GPT-2 config.json has") from None
    gpt2s = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "n_inner": (None, 4 * config.n_embd),
             "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,), "layer_norm_epsilon": (1e-5,)}
    for key, accepted in gpt2s.items():  # settings that would make the checkpoint compute something else
        value = hf.get(key, accepted[0])
        require(value in accepted, f"{path}: {key} = {value!r}, but gpt.py computes GPT-2 with {key} = {accepted[0]!r}")
    return config


def download(url, target):
    """Download url to target with progress on stderr. The bytes go to target.part first, which an
    interrupted download resumes from (an HTTP Range request); target appears only once complete."""
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(part, "ab") as f:
            if response.status != 206:  # the server sent the whole file: start from its first byte
                have = 0
                f.truncate(0)
            total = have + int(response.headers.get("Content-Length", 0))
            progress = Progress(f"downloading {target.name}", total, "MB", 1e6)
            while chunk := response.read(1 << 20):
                f.write(chunk)
                have += len(chunk)
                progress(have)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # "range not satisfiable": the part is complete or stale; once more, whole
            part.unlink()
            return download(url, target)
        raise GPTError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # no network, a dropped connection
        raise GPTError(f"could not download {url} ({type(e).__name__}: {e}); rerun to resume it, or give --init-from "
                       f"a local folder holding config.json and model.safetensors".splitlines()[0]) from None
    require(total == 0 or have == total, f"download of {url} stopped at {have} of {total} bytes; rerun to resume it")
    os.replace(part, target)


def gpt2_weight_files(name_or_path):
    """A GPT-2 size, a folder or a .safetensors file -> (its config.json, maybe absent; its weights).
    A size is downloaded once into the cache folder; several processes (torchrun) take turns
    through a lock there, so that the first downloads and the others find the files."""
    path = Path(name_or_path)
    if name_or_path in GPT2_SIZES:
        path = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt.py" / name_or_path
        path.mkdir(parents=True, exist_ok=True)
        with locked(path / ".lock"):
            for file in ("config.json", "model.safetensors"):
                if not (path / file).exists():
                    download(GPT2_URL.format(name=name_or_path, file=file), path / file)
    if path.is_dir():
        require((path / "model.safetensors").exists(), f"{str(path)!r} has no model.safetensors")
        path = path / "model.safetensors"
    require(path.is_file() and path.suffix == ".safetensors", f"--init-from {name_or_path!r}"
            f"{'' if path.exists() else ' does not exist'}: expected one of "
            f"{', '.join(GPT2_SIZES)}, a folder holding config.json and model.safetensors, or a .safetensors file")
    return path.with_name("config.json"), path


def read_gpt2_weights(name_or_path):
    """-> (GPTConfig, state dict with our names). model_with_weights checks the names and shapes."""
    config_path, weights_path = gpt2_weight_files(name_or_path)
    tensors = {name.removeprefix("transformer."): t for name, t in read_safetensors(weights_path).items()
               if not name.endswith((".attn.bias", ".attn.masked_bias"))}  # GPT-2's causal mask, stored by old files
    if config_path.exists():
        config = gpt2_config_from_json(config_path)
    else:  # a bare .safetensors: read the shape off the tensors; every GPT-2 size has 64-wide heads
        require(all(tensors.get(name, torch.empty(0)).dim() == 2 for name in ("wte.weight", "wpe.weight")),
                f"{weights_path} holds no GPT-2 embeddings (wte and wpe, two matrices)")
        (vocab_size, n_embd), block_size = tensors["wte.weight"].shape, tensors["wpe.weight"].shape[0]
        n_layer = len({name.split(".")[1] for name in tensors if name.startswith("h.")})
        require(n_layer, f"{weights_path} holds no transformer blocks (tensors named h.0.*, h.1.*, ...)")
        require(n_embd in (768, 1024, 1280, 1600), f"{weights_path}: its tensors do not say how many heads it has, "
                f"and its width {n_embd} is none of GPT-2's four sizes (64-wide heads); put its config.json beside it")
        config = GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_embd // 64,
                           n_embd=n_embd)
    head = tensors.pop("lm_head.weight", None)
    require(head is None or torch.equal(head, tensors.get("wte.weight", head)), f"{weights_path}: lm_head.weight "
            f"differs from wte.weight; GPT-2 ties them, and so does gpt.py")
    state = {"transformer." + name: (t.t() if name.endswith(CONV1D_WEIGHTS) else t).float()  # Conv1D's (in, out)
             for name, t in tensors.items()}                                                  # -> Linear's (out, in)
    state["lm_head.weight"] = state.get("transformer.wte.weight")  # tied: one tensor under two names
    return config, state


def load_gpt2(name_or_path, dropout=0.0, block_size=None):
    source = f"--init-from {name_or_path}"
    config, state = with_block_size(*read_gpt2_weights(name_or_path), block_size, source)
    return model_with_weights(dataclasses.replace(config, dropout=dropout), state, source)


def with_block_size(config, state, block_size, source):
    """A model's config and weights with its context changed to block_size (None: unchanged). A shorter
    one keeps the first block_size learned positions. A longer one needs RoPE, whose rotations exist
    for any position: a learned wpe has no vector for a position it never saw."""
    old = config.block_size
    if block_size is None or block_size == old:
        return config, state
    require(block_size < old or config.pos == "rope", f"--block-size {block_size} is longer than the {old} "
            f"positions that {source} has learned (wpe): nothing is known of position {old} and on. A model "
            f"trained with --pos rope takes any --block-size; this one takes {old} or less")
    if "transformer.wpe.weight" in state:  # (old, C) -> (block_size, C)
        state = {**state, "transformer.wpe.weight": state["transformer.wpe.weight"][:block_size]}
    return dataclasses.replace(config, block_size=block_size), state


def model_with_weights(config, state, source="the checkpoint"):
    """A GPT of config's shape whose weights are state's tensors (their names and shapes checked),
    built without drawing initial weights, which for GPT-2 XL's 1.5B would take long."""
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(config)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:  # the line after the first names the tensor and what is wrong with it
        raise GPTError(f"{source}: its weights do not fit its config: {str(e).splitlines()[1].strip()}") from None
    model.lm_head.weight = model.transformer.wte.weight  # one tensor again, as GPT.__init__ ties them
    return model


def gpt2_bpe_encoding():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises whatever its download raised
        raise GPTError(f"could not load GPT-2's BPE files: tiktoken downloads them on first use (network access) "
                       f"into TIKTOKEN_CACHE_DIR; set it to a folder that holds them ({type(e).__name__}: "
                       f"{e})".splitlines()[0]) from None


# ---- 12. Training runs -----------------------------------------------------------------------
#
# A TrainingRun is the engineering around train()'s loop (section 5); each field of TrainConfig is a flag.

def check_model_config(config):
    positive(config, "vocab_size", "block_size", "n_layer", "n_head", "n_embd", shown=str)
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
    out_dir: str = option("out", "folder for ckpt.pt (best val loss), last.pt (latest state) and loss.svg")
    init_from: str = option(None, "fine-tune, as a new run: GPT-2's weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                            "a folder or a .safetensors file) or a gpt.py checkpoint (.pt)", default_text="a new model")
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
    dropout: float = option(0.0, "dropout probability while training (a run of minutes needs none; longer ones "
                            "on 1 MB of text do: docs/results.md)")
    batch_size: int = option(32, "sequences per micro-batch (B)")
    grad_accum: int = option(1, "micro-batches per optimizer step (the gradient is their mean)")
    max_iters: int = option(3000, "optimizer steps to train for")
    max_minutes: float = option(None, "instead of --max-iters: time the first steps, then set --max-iters (and the "
                                "schedule) to fill about this many minutes; the count is saved", default_text="--max-iters")
    lr: float = option(4e-3, "peak learning rate, reached after the warm-up (high: a small model, few steps)")
    min_lr: float = option(3e-5, "learning rate at the end of the cosine decay")
    warmup_iters: int = option(100, "steps of linear warm-up to --lr")
    lr_decay_iters: int = option(None, "step at which the cosine decay reaches --min-lr", default_text="--max-iters")
    weight_decay: float = option(0.7, "AdamW weight decay, on weight matrices only (GPT-3: 0.1; 0.7 was best here)")
    beta2: float = option(0.99, "AdamW beta2; 0.99 suits small batches (GPT-3 used 0.95 at 0.5M tokens a step)")
    grad_clip: float = option(1.0, "clip the gradient's global norm to this (GPT-3: 1.0)")
    eval_interval: int = option(500, "evaluate (and save) every this many steps")
    eval_iters: int = option(20, "batches averaged for each evaluation of the train and val loss")
    peak_flops: float = option(None, "peak FLOP/s for the MFU figure",
                               default_text="a matmul probe on CPU, the card's published peak on CUDA")

    def __post_init__(self):  # the model's shape and dropout are GPTConfig's to check (section 12)
        positive(self, "batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters",
                 *(["lr_decay_iters"] if self.lr_decay_iters is not None else []))
        check_seed(self.seed)
        for name, ok, accepted in (("warmup_iters", self.warmup_iters >= 0, "0 or more"),
                                   ("lr", 0 < self.lr < math.inf, "positive and finite"),
                                   ("min_lr", 0 <= self.min_lr <= self.lr, f"between 0 and --lr ({self.lr})"),
                                   ("weight_decay", 0 <= self.weight_decay < math.inf, "0 or more, finite"),
                                   ("beta2", 0 < self.beta2 < 1, "in (0, 1)"), ("grad_clip", self.grad_clip > 0, "positive"),
                                   ("peak_flops", self.peak_flops is None or self.peak_flops > 0, "positive"),
                                   ("max_minutes", self.max_minutes is None or 0 < self.max_minutes < math.inf,
                                    "positive and finite")):
            require(ok, f"{flag(name)} must be {accepted}, got {getattr(self, name)}")
        require(self.max_minutes is None or self.warmup_iters >= 4, f"--max-minutes times the first steps, whose "
                f"learning rate must not depend on the run's length: it needs --warmup-iters of 4 or more, got "
                f"{self.warmup_iters}")
        require(self.max_minutes is None or self.max_iters > plan_step(self.warmup_iters), f"--max-minutes sets "
                f"--max-iters at step {plan_step(self.warmup_iters)}: --max-iters {self.max_iters} would end the run first")


def plan_step(warmup_iters):  # the step at which --max-minutes sets max_iters (TrainingRun.plan_length)
    return min(100, warmup_iters - 1)


def resume_path(out_dir):
    return out_dir / "last.pt" if (out_dir / "last.pt").exists() else out_dir / "ckpt.pt"


def resumed_config(given):
    """--resume: the settings saved in the run's checkpoint, overridden by the flags given now.
    -> (TrainConfig, the checkpoint)."""
    require("init_from" not in given, "--resume continues a run; it cannot also start from --init-from")
    require("seed" not in given, "--resume continues the run's own random numbers; --seed only starts a new run")
    require("max_minutes" not in given, "--max-minutes plans a new run; a resumed run keeps the --max-iters it was "
            "given or planned: give --max-iters to train it longer")
    path = resume_path(Path(given.get("out_dir", TrainConfig.out_dir)))
    require(path.exists(), f"--resume: {path.parent} holds no training run (no last.pt or ckpt.pt) to continue")
    checkpoint = load_checkpoint(path)
    kinds = {"step": int, "best_val_loss": float, "history": list, "optimizer_state": dict, "train_args": dict, "rng": dict}
    wrong = [key for key, kind in kinds.items() if not isinstance(checkpoint.get(key), kind)]
    require(not wrong, f"--resume: {path} was not saved by train, or is damaged (its {', '.join(wrong)}); a new run "
            f"can start from its weights with --init-from {path}")
    require(given.get("max_iters", math.inf) > checkpoint["step"], f"--resume: the run is at step {checkpoint['step']}"
            f" already; give a larger --max-iters than {given.get('max_iters')} to train it longer")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    saved = {k: v for k, v in checkpoint["train_args"].items() if k in fields}
    require(not saved.get("max_minutes") or checkpoint["step"] >= plan_step(saved["warmup_iters"]) or "max_iters"
            in given, f"--resume: the run stopped at step {checkpoint['step']}, before --max-minutes had planned its "
            f"length: start it again, or give --max-iters")
    saved["max_minutes"] = None  # planned once, when the run began: its count is the saved max_iters
    if "max_iters" in given and "lr_decay_iters" not in given and saved.get("lr_decay_iters") is None:
        # Training longer than planned: keep the learning rate where the saved run's schedule
        # puts it (at --min-lr once it has decayed), rather than stretching the cosine over the
        # new length, which would raise the learning rate again at the step we resume from.
        saved["lr_decay_iters"] = saved.get("max_iters")
    return TrainConfig(**{**saved, **given}), checkpoint


SHAPE_FLAGS = ("n_layer", "n_head", "n_embd", "block_size", "pos")  # TrainConfig's fields that are GPTConfig's


def model_source(cfg, text, resume, data_tokenizer):
    """-> (tokenizer, GPTConfig, weights or None), from the checkpoint resumed, from --init-from, or from
    the flags and the data. A flag may repeat a checkpoint's shape, not change it (but for --init-from's
    --block-size). data_tokenizer: a token file's, which must then be the model's."""
    weights, source = None, f"--data {cfg.data}"
    if resume is not None or (cfg.init_from is not None and Path(cfg.init_from).suffix == ".pt"):
        checkpoint = resume if resume is not None else load_checkpoint(cfg.init_from)
        source = f"the checkpoint {resume_path(Path(cfg.out_dir))}" if resume is not None else f"--init-from {cfg.init_from}"
        tokenizer, config = tokenizer_from_dict(checkpoint["tokenizer"], source), checkpoint_config(checkpoint, source)
        weights = checkpoint["model_state"]
    elif cfg.init_from is not None:
        (config, weights), tokenizer, source = read_gpt2_weights(cfg.init_from), BPETokenizer(), f"--init-from {cfg.init_from}"
    else:
        tokenizer = data_tokenizer or (BPETokenizer() if cfg.tokenizer == "bpe" else CharTokenizer.from_text(text))
        shape = {name: getattr(GPTConfig if getattr(cfg, name) is None else cfg, name) for name in SHAPE_FLAGS}
        config = GPTConfig(vocab_size=tokenizer.vocab_size, **shape)  # the flags given, else GPTConfig's defaults
    if cfg.init_from is not None and resume is None:  # a resumed run keeps its shape
        config, weights = with_block_size(config, weights, cfg.block_size, source)
    for name in ("tokenizer", *SHAPE_FLAGS):
        value, has = getattr(cfg, name), tokenizer.kind if name == "tokenizer" else getattr(config, name)
        require(value is None or value == has, f"{flag(name)} {value} does not match {source}, which has {name} {has}")
    require(tokenizer.vocab_size == config.vocab_size, f"{source}: the model has {config.vocab_size} tokens, but "
            f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size}")
    if weights is not None:  # their names and shapes checked now, before anything is written (no memory taken)
        model_with_weights(config, weights, source)
    if data_tokenizer is not None and tokenizer_to_dict(data_tokenizer) != tokenizer_to_dict(tokenizer):
        describe = [f"char, {t.vocab_size} characters" if t.kind == "char" else "GPT-2's BPE" for t in (data_tokenizer, tokenizer)]
        raise GPTError(f"--data {cfg.data} was prepared with another tokenizer ({describe[0]}) than {source}'s "
                       f"({describe[1]}); " + ("prepare the text again with --tokenizer bpe" if tokenizer.kind == "bpe"
                       else "give --data the text itself (prepare makes a vocabulary of its text's own characters)"))
    return tokenizer, dataclasses.replace(config, dropout=cfg.dropout), weights


# Several processes: `torchrun --nproc_per_node N gpt.py train ...` starts N processes (one per
# GPU on CUDA, NCCL between them; gloo on CPUs), told their RANK and WORLD_SIZE. Each holds the
# whole model; PyTorch's DistributedDataParallel (DDP) averages their gradients before each
# step. A step still means --grad-accum micro-batches of --batch-size: every process draws the
# same windows and computes micro-batches rank, rank + N, ..., so N processes compute what one
# does. DDP averages once per step: no_sync covers the forward and the backward of the other
# micro-batches (the backward alone is a known silent bug). Every process evaluates the same
# batches; rank 0 alone logs and writes, saving every rank's random state, so --resume with the
# same N continues bit for bit (with another N, ranks above 0 restart their dropout's seed).
#
# Collectives: a function that exchanges data between the processes returns only once every
# process has called it, so all must call it at the same point, or all wait forever: never
# under `if process_rank() == 0`. They are all_reduced below and the TrainingRun methods that
# call it, each marked "Collective".

def process_rank():
    return int(os.environ.get("RANK", 0))  # torchrun sets it; 0 when started alone


def process_count():
    return int(os.environ.get("WORLD_SIZE", 1))


def gradients_averaged(model, now):
    if isinstance(model, nn.parallel.DistributedDataParallel) and not now:
        return model.no_sync()
    return contextlib.nullcontext()


def all_reduced(value, op, group=None):
    """Collective: a tensor combined over all processes with op (dist.ReduceOp.SUM, MAX, MIN)."""
    if process_count() == 1:
        return value
    value = value.detach().clone().to("cuda" if group is None and dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=op, group=group)
    return value


@contextlib.contextmanager
def stop_on_ctrl_c():
    """While training, the first Ctrl-C (or SIGTERM) asks the loop to stop after the current step,
    then save and exit; the list it yields notes the request. A second Ctrl-C stops at once."""
    requested = []

    def handler(signum, frame):
        if requested:
            raise KeyboardInterrupt(signum)  # main exits with 128 + signum
        requested.append(signum)
        log(f"\n{'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'}: finishing this step, then saving "
            f"(Ctrl-C again stops at once, without saving)")

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: leave the signals alone
        previous = {}
    try:
        yield requested
    finally:
        for s, handler_before in previous.items():
            signal.signal(s, handler_before)


class TrainingRun:
    def __init__(self, cfg, resume_checkpoint=None):
        self.device, self.out_dir = pick_device(cfg.device), Path(cfg.out_dir)
        self.dtype = pick_dtype(cfg.dtype, self.device)
        check_training_dtype(self.dtype, self.device)
        check_data_file(Path(cfg.data))
        token_file = read_token_file(cfg.data)  # (header, ids) of a file from `prepare`; None for a text
        text = next(text_chunks(cfg.data, whole=True)) if token_file is None else None  # a text, read whole
        saved = resume_path(self.out_dir)  # what --resume continues, and what a new run must not overwrite
        self.resume = (resume_checkpoint or load_checkpoint(saved)) if cfg.resume else None
        require(cfg.resume or not saved.exists(), f"{saved} already holds a training run: continue it with --resume "
                f"once it has stopped, or train into another --out-dir")
        data_tokenizer = token_file[1].tokenizer if token_file else None
        self.tokenizer, self.config, self.weights = model_source(cfg, text, self.resume, data_tokenizer)
        shape = {name: getattr(self.config, name) for name in SHAPE_FLAGS}
        self.cfg = cfg = dataclasses.replace(cfg, tokenizer=self.tokenizer.kind, **shape)  # saved with the run
        self.tokens = encode_text(self.tokenizer, text) if text is not None else token_file[1]  # (N,)
        check_writable(self.out_dir / "loss.svg", LOSS_TITLE.encode(), "--out-dir", "a loss curve")
        require(cfg.grad_accum % process_count() == 0, f"--grad-accum {cfg.grad_accum} is not divisible by the "
                f"{process_count()} processes that share out its micro-batches")
        self.control = None  # with several processes, a gloo group for their shared decisions (NCCL takes only GPU tensors)
        if process_count() > 1:
            if self.device.type == "cuda":  # this process's own GPU
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.control = dist.new_group(backend="gloo")
        random.seed(cfg.seed)  # nothing here draws from Python's random; a reader's additions might
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.autocast_ctx = autocast(self.device, self.dtype)
        self.step, self.best_val, self.history = 0, float("inf"), []

    def start(self, model, optimizer, batch_rng):
        """Keep the model, its optimizer and the batches' generator, to save them; with --resume,
        give them their saved state. Log what trains on what, and start the clocks."""
        self.model, self.optimizer, self.batch_rng = model, optimizer, batch_rng
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.lock = locked(self.out_dir / ".lock", wait=False) if process_rank() == 0 else None  # until finish()
        require(self.lock or process_rank(), f"another training is writing into {self.out_dir}: wait for it to "
                f"end, or train into another --out-dir")
        if process_rank():  # every process starts from the same weights; dropout differs from process to process
            torch.manual_seed(self.cfg.seed + process_rank())
        if self.resume is not None:
            self.restore(self.resume)
        cfg, c = self.cfg, model.config
        self.loss = torch.tensor(self.resume["loss"]) if self.resume is not None else None  # the last step's
        self.tokens_per_step = cfg.batch_size * c.block_size * cfg.grad_accum
        self.flops_per_step = flops_per_token(model) * self.tokens_per_step
        # The MFU's peak, probed once, by the process that logs.
        self.peak = cfg.peak_flops or (measure_peak_flops(self.device, self.dtype) if process_rank() == 0 else 1.0)
        log(f"model: {model.num_parameters():,} parameters, {c.n_layer} layers x {c.n_head} heads x {c.n_embd} "
            f"wide, context {c.block_size}, {c.pos} positions; {self.tokenizer.kind} tokenizer ({c.vocab_size} tokens), "
            f"{len(self.tokens):,} tokens in {cfg.data}")
        log(f"device: {self.device.type} x {process_count()} process(es), {dtype_name(self.dtype)}, "
            f"{self.tokens_per_step:,} tokens per step, peak {self.peak / 1e9:,.0f} GFLOP/s"
            + (f"; resuming at step {self.step}" if self.resume else ""))
        self.started = time.perf_counter()
        self.train_seconds, self.timed_steps, self.eval_seconds = 0.0, 0, 0.0
        self.last_log_time, self.last_log_step = self.started, self.step
        # --max-minutes: the steps 2 .. plan_at are timed, all within the warm-up, whose learning
        # rate does not depend on max_iters: a run given the planned count takes the same steps.
        self.plan_at = plan_step(cfg.warmup_iters) if cfg.max_minutes and self.resume is None else None

    def restore(self, checkpoint):  # the optimizer, step, history and random state of the checkpoint
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        except (ValueError, KeyError) as e:  # another model's, or a damaged one
            raise GPTError(f"the checkpoint's optimizer state does not fit its model ({e})") from None
        if "scaler_state" in checkpoint:
            self.scaler.load_state_dict(checkpoint["scaler_state"])
        self.step, self.best_val, self.history = checkpoint["step"], checkpoint["best_val_loss"], checkpoint["history"]
        rng, by_rank = checkpoint["rng"], checkpoint.get("rng_by_rank")  # rank 0's; every rank's, if several ran
        mine = by_rank[process_rank()] if by_rank and len(by_rank) == process_count() else rng
        self.batch_rng.set_state(rng["batches"])  # the same on every process
        random.setstate(rng["python"])
        if mine is rng and process_rank():  # another number of processes: this rank's dropout keeps its seed
            return
        torch.set_rng_state(mine["torch"])
        if self.device.type in mine:
            getattr(torch, self.device.type).set_rng_state(mine[self.device.type])

    def share_of(self, next_batch):
        """Collective if a batch fails. next_batch called once for each process, on every process (their generators
        stay in step): this one's kept. A batch the data refuses (a token file damaged, or written over meanwhile)
        fails on every process at once, and all first save last.pt: the steps since the last evaluation are kept."""
        def share():
            try:
                return [next_batch() for _ in range(process_count())][process_rank()]
            except GPTError:
                self.save("last.pt")
                log(f"saved {self.out_dir / 'last.pt'} at step {self.step}, the last whole one")
                raise
        return share

    def compiled_and_wrapped(self, model):
        """The model as the training steps run it: compiled with --compile, then wrapped by DDP with
        several processes. Saving and evaluating use the plain model."""
        model = torch.compile(model) if self.cfg.compile else model
        if process_count() > 1:
            model = nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if
                                                        self.device.type == "cuda" else None)
        return model

    def save(self, name, also=None):
        """Collective (it gathers every process's random state). Rank 0 writes the run's whole state, as
        section 10 describes, to name in --out-dir (and the same file to also, as one file with two names)."""
        rng = {"torch": torch.get_rng_state(), "batches": self.batch_rng.get_state(), "python": random.getstate()}
        if self.device.type in ("cuda", "mps"):  # dropout's random state on the GPU
            rng[self.device.type] = getattr(torch, self.device.type).get_rng_state()
        state = {"format": CHECKPOINT_FORMAT, "model_state": self.model.state_dict(),
                 "config": dataclasses.asdict(self.model.config), "tokenizer": tokenizer_to_dict(self.tokenizer),
                 "step": self.step, "loss": float("nan") if self.loss is None else self.mean_loss(self.loss),
                 "best_val_loss": self.best_val, "history": self.history,
                 "optimizer_state": self.optimizer.state_dict(), "train_args": dataclasses.asdict(self.cfg), "rng": rng}
        if self.scaler.is_enabled():
            state["scaler_state"] = self.scaler.state_dict()
        if process_count() > 1:
            state["rng_by_rank"] = [None] * process_count()
            dist.all_gather_object(state["rng_by_rank"], rng, group=self.control)
        if process_rank() == 0:
            write_atomically(self.out_dir / name, lambda f: torch.save(state, f), self.out_dir / also if also else None)

    def mean_loss(self, loss):  # collective: a step's loss averaged over the processes' micro-batches
        return all_reduced(loss, dist.ReduceOp.SUM).item() / process_count()

    def evaluated_at(self, step):  # a resumed run may start where the last one evaluated
        return bool(self.history) and self.history[-1]["step"] == step

    def evaluate_and_save(self, evaluate):
        """Collective. evaluate() -> {"train": loss, "val": loss}; save last.pt, and ckpt.pt too when
        the val loss is the best so far (one file, two names); draw loss.svg."""
        start = time.perf_counter()
        losses = {"step": self.step, **evaluate()}
        self.check_finite(losses["train"], losses["val"])
        self.history.append(losses)
        best = losses["val"] < self.best_val
        self.best_val = min(self.best_val, losses["val"])
        self.save("ckpt.pt" if best else "last.pt", also="last.pt" if best else None)
        if process_rank() == 0:
            write_atomically(self.out_dir / "loss.svg", lambda f: f.write(loss_curve_svg(self.history).encode()))
        self.eval_seconds = time.perf_counter() - start
        log(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
            f"{', best so far: saved ckpt.pt' if best else ''} ({self.eval_seconds:.1f}s)")
        self.last_log_time, self.last_log_step = time.perf_counter(), self.step  # the log times training steps only

    def check_finite(self, *evaluated):
        """Collective: stop every process if the last step's loss is NaN or infinite on any (it stays so: the
        gradients spread it into the weights), or an evaluated loss is: a finite step can leave NaN weights."""
        bad = self.loss is not None and all_reduced(torch.isfinite(self.loss).logical_not().float(), dist.ReduceOp.MAX)
        if bad or not all(map(math.isfinite, evaluated)):
            last_good = f"{self.history[-1]['val']:.4f} at step {self.history[-1]['step']}" if self.history else "none yet"
            raise GPTError(f"training diverged: the loss was NaN or infinite by step {self.step} (last good val loss "
                           f"{last_good}); {self.out_dir / 'ckpt.pt'} is untouched. Try a lower --lr, or --dtype float32")

    def after_step(self, loss, lr, stop_requested):
        """Collective. Note a NaN loss; log the loss, speed, MFU and ETA every LOG_EVERY_SECONDS, after
        the first and the last step, and on a stop. -> whether to stop now: decided once, here, as a
        signal can arrive at any moment, and with several processes all must stop after the same step."""
        cfg, stop = self.cfg, bool(stop_requested)
        self.loss = loss
        if self.plan_at is not None and self.step in (1, self.plan_at):
            self.plan_length()
        due = time.perf_counter() - self.last_log_time >= LOG_EVERY_SECONDS and process_rank() == 0  # rank 0's clock
        due = due or self.timed_steps == 0 or self.step == cfg.max_iters
        # Every process logs (its collectives) and stops after the same step: one's due or stop is all's.
        due, stop = map(bool, all_reduced(torch.tensor([float(due), float(stop)]), dist.ReduceOp.MAX, self.control))
        self.signal = stop_requested[0] if stop_requested else signal.SIGINT  # the signal finish reports
        if not (due or stop):
            return False
        synchronize(self.device)  # a GPU may still be computing the steps it was given: wait, then read the clock
        now = time.perf_counter()
        self.check_finite()
        self.train_seconds += now - self.last_log_time
        self.timed_steps += self.step - self.last_log_step
        dt = (now - self.last_log_time) / max(1, self.step - self.last_log_step)
        flops = self.flops_per_step / dt / process_count()  # per process, against one device's peak
        self.peak = max(self.peak, flops)  # a peak the model beat was too low: MFU <= 100%
        evals_left = (cfg.max_iters - 1) // cfg.eval_interval - self.step // cfg.eval_interval + 1
        eta = (cfg.max_iters - self.step) * self.train_seconds / self.timed_steps + evals_left * self.eval_seconds
        planned = self.plan_at is None  # --max-minutes: until its plan, max_iters is only a placeholder
        log(f"step {self.step}/{cfg.max_iters if planned else '?'} | loss {self.mean_loss(loss):.4f} | lr {lr:.2e} | "
            f"{dt * 1000:.0f} ms/step | {self.tokens_per_step / dt:,.0f} tok/s | MFU {flops / self.peak:.0%} | ETA "
            f"{duration(eta) if planned else 'once planned'}")
        self.last_log_time, self.last_log_step = now, self.step
        return stop

    def plan_length(self):
        """Collective. --max-minutes: at step 1, start a clock; at step plan_at, set cfg.max_iters (the
        loop and the learning-rate schedule read it) to fill the minutes left with steps at the speed
        of the steps since, and evaluations as long as the one at step 0. Rank 0's count for all."""
        synchronize(self.device)
        if self.step == 1:
            self.plan_clock = time.perf_counter()
            return
        now = time.perf_counter()
        # The first hundred steps can run faster than the rest (docs/speed.md): the plan allows 5% more.
        step_seconds = 1.05 * (now - self.plan_clock) / (self.step - 1)
        left = self.cfg.max_minutes * 60 - (now - self.started) - self.eval_seconds  # the last evaluation included
        steps = self.step + max(0, int(left / (step_seconds + self.eval_seconds / self.cfg.eval_interval)))
        steps = int(all_reduced(torch.tensor(float(steps) if process_rank() == 0 else 0.0), dist.ReduceOp.MAX))
        self.cfg.max_iters, self.plan_at = steps, None
        log(f"--max-minutes {self.cfg.max_minutes:g}: {steps:,} steps fit ({step_seconds * 1000:,.0f} ms a step, "
            f"{self.eval_seconds:.1f} s an evaluation); training as with --max-iters {steps}")

    def finish(self, interrupted=False):
        """Collective (interrupted, it saves last.pt). Leave the process group -> train()'s result; its
        "interrupted": the signal that stopped the run (SIGINT or SIGTERM), or 0 when it ran to the end."""
        if interrupted:
            self.save("last.pt")
            log(f"stopped at step {self.step}; saved {self.out_dir / 'last.pt'}. " + (f"Continue with: python gpt.py "
                f"train --resume --out-dir {shlex.quote(str(self.out_dir))}" if self.plan_at is None else "--max-minutes "
                "had not planned the run's length yet: start it again, or resume it with --max-iters"))
        else:
            log(f"done: {self.step} steps in {duration(time.perf_counter() - self.started)}; best val loss "
                f"{self.best_val:.4f}, saved in {self.out_dir / 'ckpt.pt'}; sample with: python gpt.py sample "
                f"--out-dir {shlex.quote(str(self.out_dir))}")
        if dist.is_initialized():
            dist.destroy_process_group()
        if self.lock:
            self.lock.close()
        return {"step": self.step, "best_val_loss": self.best_val, "history": self.history,
                "interrupted": self.signal if interrupted else 0}


# ---- 13. Sampling runs -----------------------------------------------------------------------
#
# `python gpt.py sample` streams text to stdout as it is drawn, and tokens/s to stderr. Every drawn
# id is checked before it is decoded: torch.multinomial on MPS has returned out-of-range and
# zero-probability ids (pytorch issues 92752, 98612, 192577; nanoGPT issue 458).

def check_sampling_settings(temperature, top_k, top_p, prefix="", prompt=None, vocab_size=None):
    """One clear error for a bad value; prefix: "--" for command-line flags. prompt: generate's idx, if given,
    ids below vocab_size (one past the embedding: an IndexError on a CPU, a device-side assert on CUDA)."""
    require(temperature >= 0, f"{prefix}temperature must be 0 or more (0 means greedy), got {temperature}")
    require(top_k is None or top_k >= 1, f"{prefix}top-k must be 1 or more, got {top_k}")
    require(top_p is None or 0 < top_p <= 1, f"{prefix}top-p must be in (0, 1], got {top_p}")
    if prompt is None:
        return
    shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
    require(isinstance(prompt, torch.Tensor) and prompt.dim() == 2 and prompt.numel() >= 1, f"generate needs a "
            f"prompt of shape (B, T) with B, T >= 1, got {shape}; start an empty text with the tokenizer's start_token")
    require(prompt.dtype in (torch.int64, torch.int32) and 0 <= prompt.min() and prompt.max() < vocab_size,
            f"generate's prompt must hold token ids, whole numbers from 0 to {vocab_size - 1}: got {prompt.dtype} "
            f"from {prompt.min().item()} to {prompt.max().item()}")


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


def prompt_ids(tokenizer, prompt):
    """sample's and inspect's --prompt -> its ids; an empty prompt, the start token (a text's beginning)."""
    try:
        prompt.encode("utf-8")  # bytes typed that are not UTF-8 reach Python as lone surrogates, which fail here
    except UnicodeEncodeError as e:
        raise GPTError(f"--prompt is not UTF-8 (its character {e.start + 1}): type it in a UTF-8 terminal") from None
    return tokenizer.encode(prompt) or [tokenizer.start_token]


@dataclass
class TrainedModel:  # the flags that choose a model and where it runs: sample's and inspect's
    out_dir: str = option("out", "folder whose ckpt.pt to use (inspect writes attention.svg there too)")
    init_from: str = option(None, "GPT-2's weights instead: gpt2, gpt2-medium, gpt2-large, gpt2-xl, or a local "
                            "folder or .safetensors file", default_text="the checkpoint in --out-dir")
    device: str = option("auto", "where to run; auto picks cuda, then mps, then cpu", choices=DEVICES)


@dataclass
class SampleConfig(TrainedModel):
    dtype: str = option("auto", "number format of the weights while sampling", choices=("auto", *DTYPES))
    prompt: str = option("", "text to continue; empty starts a new text")
    max_new_tokens: int = option(500, "how many tokens to write")
    temperature: float = option(0.8, "below 1: safer choices; above 1: wilder; 0: always the most likely token")
    top_k: int = option(None, "draw only from the k most likely tokens", default_text="all tokens")
    top_p: float = option(None, "draw only from the most likely tokens that add up to this probability",
                          default_text="all tokens")
    num_samples: int = option(1, "how many separate texts to write")
    seed: int = option(1337, "seed of the random draws: the same seed writes the same text")
    no_kv_cache: bool = option(False, "recompute the whole context for every token (slow; the same text until the "
                               "context is full, when the cache refills with its newest half)")

    def __post_init__(self):
        require(self.max_new_tokens >= 0, f"--max-new-tokens must be 0 or more, got {self.max_new_tokens}")
        positive(self, "num_samples")
        check_seed(self.seed)
        check_sampling_settings(self.temperature, self.top_k, self.top_p, prefix="--")


def sample(cfg, out=None):
    out = out or sys.stdout
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    model, tokenizer = trained_model(cfg.out_dir, cfg.init_from)
    prompt = prompt_ids(tokenizer, cfg.prompt)
    if len(prompt) > model.config.block_size:
        log(f"the prompt has {len(prompt)} tokens; the model sees its last {model.config.block_size}")
    model.to(device=device, dtype=dtype)
    idx = torch.tensor([prompt], device=device)  # (1, T)
    generator = torch.Generator().manual_seed(cfg.seed)
    count, start = cfg.num_samples * cfg.max_new_tokens, time.perf_counter()
    progress = (lambda done: None) if out.isatty() else Progress("sampling", count, "tokens")  # a terminal shows the text
    for i in range(cfg.num_samples):
        out.write(cfg.prompt)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a BPE token may end mid-character
        tokens = generate_stream(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                 not cfg.no_kv_cache, generator)
        for done, token in enumerate(tokens, i * cfg.max_new_tokens + 1):  # done: tokens drawn by all samples so far
            out.write(decoder.decode(tokenizer.token_bytes(int(token))))
            out.flush()
            progress(done)
        out.write(decoder.decode(b"", final=True) + "\n" + ("-" * 40 + "\n" if i + 1 < cfg.num_samples else ""))
        out.flush()
    seconds = time.perf_counter() - start
    log(f"{count} tokens in {seconds:.2f} s: {count / max(seconds, 1e-9):,.1f} tokens/s "
        f"({device.type}, {dtype_name(dtype)}, {'no ' if cfg.no_kv_cache else ''}KV cache)")
    return count


# ---- 14. Pictures ----------------------------------------------------------------------------
#
# Two pictures, as SVG (plain text that every browser shows, drawn without a plotting library):
# `train`'s loss.svg, redrawn at every evaluation, and `inspect`'s attention.svg.

SVG_FONT = 'font-family="sans-serif" font-size="11"'
SVG_TITLE = 'font-family="sans-serif" font-size="13"'
LOSS_TITLE, ATTENTION_TITLE = "loss against step", "attention weights"  # each picture's mark: what gpt.py replaces


def svg(width, height, body):
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}">\n<rect width="100%" height="100%" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def axis(low, high, start, end):
    """An axis from pixel start to pixel end, spanning its ticks: about 5 round values, 1, 2 or 5 times a
    power of ten apart, from at most low to at least high -> (the ticks, a function from a value to its pixel)."""
    if high <= low:
        high = low + 1
    raw = (high - low) / 5
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    ticks = [round(i * step, 10) for i in range(first, last + 1)]
    return ticks, lambda value: start + (value - ticks[0]) / (ticks[-1] - ticks[0]) * (end - start)


def loss_curve_svg(history):
    """history [{"step", "train", "val"}, ...] -> an SVG of both losses against the step, the best val loss marked."""
    width, height, left, right, top, bottom = 640, 400, 60, 20, 30, 50
    losses = [h[split] for h in history for split in ("train", "val")]
    x_ticks, x = axis(0, max(h["step"] for h in history), left, width - right)
    y_ticks, y = axis(min(losses), max(losses), height - bottom, top)  # a higher loss, higher up
    body = [f'<text x="{left}" y="18" {SVG_TITLE}>{LOSS_TITLE}</text>',
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
    characters as Unicode's pictures of them, U+FFFE and U+FFFF as the replacement character (XML
    cannot hold most of them as they are)."""
    text = token_text.replace("\n", "\u23ce").replace(" ", "\u2423").replace("\t", "\u21e5")
    return "".join(chr(0x2400 + ord(ch)) if ord(ch) < 0x20 else "\u2421" if ch == "\x7f" else
                   "\ufffd" if ch in "\ufffe\uffff" else ch for ch in text)


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
    width, height = margin + nh * (size + gap), 30 + margin + len(weights) * (size + gap)
    body = [f'<text x="8" y="18" {SVG_TITLE}>{ATTENTION_TITLE}: a row is a token (query), its cells the tokens it '
            f'looks at (keys); darker = more</text>']
    for layer, layer_weights in enumerate(weights):
        for head in range(nh):
            x0, y0 = margin + head * (size + gap), 30 + margin + layer * (size + gap)
            body.append(f'<text x="{x0}" y="{y0 - 4}" {SVG_FONT}>layer {layer}, head {head}</text>'
                        f'<rect x="{x0}" y="{y0}" width="{size}" height="{size}" fill="none" stroke="#bbb"/>')
            # In the heatmap's own units: cell (i, j) is the unit square at x = j, y = i.
            body.append(f'<g class="heatmap" data-layer="{layer}" data-head="{head}" '
                        f'transform="translate({x0} {y0}) scale({cell})">')
            body += [f'<rect x="{j}" y="{i}" width="1" height="1" fill="{weight_color(w)}"/>'
                     for i, row in enumerate(layer_weights[head].tolist()) for j, w in enumerate(row[:i + 1])]
            body.append("</g>")
            if head == 0:  # the queries' labels, left of each layer's row
                body += [f'<text x="{x0 - 4}" y="{y0 + i * cell + cell - 3}" text-anchor="end" {SVG_FONT}>'
                         f'{xml_escape(label)}</text>' for i, label in enumerate(labels)]
            if layer == 0:  # the keys' labels, above each head's column
                body += [f'<text x="{x0 + j * cell + cell / 2}" y="{y0 - 18}" text-anchor="start" {SVG_FONT} '
                         f'transform="rotate(-90 {x0 + j * cell + cell / 2} {y0 - 18})">{xml_escape(label)}</text>'
                         for j, label in enumerate(labels)]
    return svg(width, height, body)


class RecordingSoftmax(torch.overrides.TorchFunctionMode):
    """Within it, every F.softmax (a TorchFunctionMode sees each torch call) appends its output to
    self.outputs: in the written-out attention, the model's own attention weights."""

    def __init__(self):
        super().__init__()
        self.outputs = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func is F.softmax:
            self.outputs.append(result.detach())
        return result


@dataclass
class InspectConfig(TrainedModel):
    prompt: str = option("ROMEO:\nBut, soft! what light through yonder window breaks?", "text to run the model on")
    max_tokens: int = option(24, "draw the attention of the prompt's last this many tokens (more is unreadable)")
    top: int = option(10, "how many of the most likely next tokens to print")
    svg: str = option(None, "where to write the attention picture", default_text="attention.svg in --out-dir")

    def __post_init__(self):
        positive(self, "max_tokens", "top")


@torch.no_grad()
def inspect(cfg, out=None):
    """Print the likeliest next tokens after cfg.prompt (its last block_size tokens), and draw the
    attention among its last max_tokens (each row then shows only the attention that falls on the
    tokens drawn). -> ([(token id, probability)], every layer's weights (nh, T, T))."""
    out = out or sys.stdout
    device = pick_device(cfg.device)
    model, tokenizer = trained_model(cfg.out_dir, cfg.init_from)
    ids = prompt_ids(tokenizer, cfg.prompt)[-model.config.block_size:]
    n = min(len(ids), cfg.max_tokens)  # the tokens drawn: the last n
    path = Path(cfg.svg) if cfg.svg else Path(cfg.out_dir) / "attention.svg"
    check_writable(path, ATTENTION_TITLE.encode(), "--svg" if cfg.svg else "--out-dir", "an attention picture")
    with attention_forced("written out"), RecordingSoftmax() as softmaxes:
        logits, _ = model.to(device).eval()(torch.tensor([ids], device=device))  # (1, T, V)
    weights = [w[0].cpu() for w in softmaxes.outputs]  # per layer: (1, nh, T, T) -> (nh, T, T)
    probs = F.softmax(logits[0, -1].double().cpu(), dim=-1)  # (V,): the next token after the prompt
    top = torch.topk(probs, min(cfg.top, probs.numel()))
    out.write(f"most likely next tokens after {cfg.prompt[-40:]!r}:\n")
    for p, i in zip(top.values.tolist(), top.indices.tolist()):
        out.write(f"  {tokenizer.decode([i])!r:>12} {p:7.2%} {'#' * round(p * 50)}\n")
    picture = attention_svg([w[:, -n:, -n:] for w in weights], [visible(tokenizer.decode([i])) for i in ids[-n:]])
    write_atomically(path, lambda f: f.write(picture.encode()))
    log(f"wrote {path}: {len(weights)} layers x {weights[0].size(0)} heads over the last {n} of {len(ids)} tokens read")
    out.flush()
    return list(zip(top.indices.tolist(), top.values.tolist())), weights


# ---- 15. Benchmark ---------------------------------------------------------------------------
#
# `python gpt.py bench` times the default model's training (float32, and --dtype auto's format) and
# sampling, every variant once per round, in turn, so that all see the same machine. `bench --contexts`
# times both attentions: the written-out one holds (B, nh, T, T) weights for the backward, the fused one not.

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
        positive(self, "steps", "rounds", "sample_tokens", "context_batch", "context_steps")
        require(self.contexts is None or all(v.isdecimal() and 0 < int(v) < 2**63 for v in self.contexts.split(",")),
                f"--contexts {self.contexts!r}: expected positive whole numbers separated by commas, like 256,512,1024")


def training_steps(config, device, dtype, batch_size):
    """-> (a new model of config on device, a function taking one training step of it on random
    tokens in dtype: train_step, section 5, as `train` would)."""
    torch.manual_seed(0)
    model, train_cfg = GPT(config).to(device), TrainConfig()
    optimizer, scaler = make_optimizer(model, train_cfg), torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    data, batches = torch.randint(config.vocab_size, (100_000 + config.block_size,)), torch.Generator().manual_seed(0)

    def next_batch():
        x, y = get_batch(data, config.block_size, batch_size, batches)
        return to_device(x, device), to_device(y, device)
    return model, lambda: train_step(model, optimizer, scaler, next_batch, 1, autocast(device, dtype), train_cfg.grad_clip)


def bench(cfg, out=None):
    out = out or sys.stdout
    if cfg.contexts is not None:
        return bench_contexts(cfg, out)
    device, batch = pick_device(cfg.device), TrainConfig.batch_size
    dtypes = list(dict.fromkeys([torch.float32, pick_dtype("auto", device)]))  # float32, and auto's if it is another
    auto, config = dtypes[-1], GPTConfig(dropout=TrainConfig.dropout)
    steps = {dtype: training_steps(config, device, dtype, batch) for dtype in dtypes}
    model, peaks = steps[torch.float32][0], {dtype: measure_peak_flops(device, dtype) for dtype in dtypes}
    out.write(f"torch {torch.__version__} on {device.type}" + (f", {torch.get_num_threads()} threads, native bfloat16: "
              f"{'yes' if cpu_has_native_bfloat16() else 'no'}" if device.type == "cpu" else "") + "\n")
    out.write(f"model: the default GPTConfig, {model.num_parameters():,} parameters, batch {batch}, context "
              f"{config.block_size}, dropout {config.dropout}; matmul peak: "
              + ", ".join(f"{dtype_name(d)} {p / 1e9:,.0f} GFLOP/s" for d, p in peaks.items()) + "\n\n")
    seconds, progress = {dtype: [] for dtype in dtypes}, Progress("timing training", cfg.rounds, "rounds")
    for round_ in range(cfg.rounds):
        for dtype in dtypes:
            seconds[dtype].append(timed(steps[dtype][1], cfg.steps, device))
        progress(round_ + 1, "; " + ", ".join(f"{dtype_name(d)} {s[-1] * 1000:.0f} ms/step" for d, s in seconds.items()))
    tokens, flops = batch * config.block_size, flops_per_token(model) * batch * config.block_size
    out.write(f"training ({cfg.rounds} alternating rounds of {cfg.steps} steps, medians)\n| number format | ms/step | "
              f"tokens/s | MFU vs its own peak | MFU vs the {dtype_name(auto)} peak |\n|---|---|---|---|---|\n")
    for dtype, s in seconds.items():
        s = statistics.median(s)
        out.write(f"| {dtype_name(dtype)}{' (auto)' if dtype == auto else ''} | {s * 1000:.0f} | {tokens / s:,.0f} | "
                  f"{mfu(flops / s, peaks[dtype]):.0%} | {mfu(flops / s, peaks[auto]):.0%} |\n")
    if auto != torch.float32:
        ratio = statistics.median(a / b for a, b in zip(seconds[torch.float32], seconds[auto]))
        out.write(f"speed-up of {dtype_name(auto)} over float32: {ratio:.2f}x (median of the rounds' ratios)\n")
    bench_sampling(model.eval(), device, dtypes, cfg, out)
    out.flush()


def bench_sampling(model, device, dtypes, cfg, out):
    """The short run is the longest from a one-token prompt that never refills the cache (block_size - 1 tokens)."""
    auto, short, n = dtypes[-1], model.config.block_size - 1, cfg.sample_tokens
    runs = ((short, True), (n, True), (n, False))  # (new tokens, KV cache)
    speed = {(dtype, tokens, kv_cache): [] for dtype in dtypes for tokens, kv_cache in runs}
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    progress = Progress("timing sampling", cfg.rounds, "rounds")
    for round_ in range(cfg.rounds):
        for dtype, tokens, kv_cache in speed:
            model.to(dtype)
            generate(model, prompt, 8, kv_cache=kv_cache)  # warm-up
            seconds = timed(lambda: generate(model, prompt, tokens, kv_cache=kv_cache,
                                             generator=torch.Generator().manual_seed(0)), 1, device, warmup=0)
            speed[dtype, tokens, kv_cache].append(tokens / seconds)
        progress(round_ + 1, "; tokens/s: " + ", ".join(f"{dtype_name(d)} {t}{'' if kv else ' uncached'} {s[-1]:,.0f}"
                                                        for (d, t, kv), s in speed.items()))
    out.write(f"\nsampling one sequence from a one-token prompt, tokens/s ({cfg.rounds} rounds, medians; "
              f"`sample` uses {dtype_name(auto)} weights)\n| weights | KV cache, {short} tokens | KV cache, {n} tokens "
              f"| no cache, {n} tokens |\n|---|---|---|---|\n")
    for dtype in dtypes:
        out.write(f"| {dtype_name(dtype)} | " + " | ".join(f"{statistics.median(speed[dtype, t, kv]):,.0f}"
                                                           for t, kv in runs) + " |\n")
    # Each round's KV-cache speed over that round's fastest recomputation: a ratio of runs made
    # seconds apart, so a machine that speeds up or slows down between rounds does not skew it.
    ratios = [speed[auto, n, True][r] / max(speed[dtype, n, False][r] for dtype in dtypes) for r in range(cfg.rounds)]
    out.write(f"KV cache ({dtype_name(auto)}) over the fastest recomputation, at {n} tokens: "
              f"{statistics.median(ratios):.1f}x (median of the rounds' ratios; lowest {min(ratios):.1f}x)\n")


@contextlib.contextmanager
def memory_bounded(device):
    """On a Linux CPU, cap this process's address space at what it has plus 80% of the memory still
    available: a step too big for the machine fails with an error rather than being killed by the
    system (or swapping for minutes). CUDA reports its own out-of-memory error."""
    meminfo, status = Path("/proc/meminfo"), Path("/proc/self/status")
    available = re.search(r"MemAvailable:\s+(\d+)", meminfo.read_text()) if meminfo.exists() else None
    in_use = re.search(r"VmSize:\s+(\d+)", status.read_text()) if status.exists() else None
    if device.type != "cpu" or available is None or in_use is None:
        yield
        return
    import resource  # Unix only
    before = resource.getrlimit(resource.RLIMIT_AS)
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
            import ctypes  # glibc's malloc_trim: memory freed but kept by malloc goes back, so resident = in use
            ctypes.CDLL(None).malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak to the current resident size
        return int(re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1)) * 1024
    except (OSError, AttributeError):  # no glibc, or a kernel that will not reset the peak: not measured
        return None


def time_context(T, attention, device, dtype, cfg):
    """Training steps of the default model's width at context T with the given attention ->
    (seconds per step, peak bytes it added to what was in use before), or None when out of memory."""
    before = memory_high_water(device, reset=True)
    try:
        with attention_forced(attention):
            _, step = training_steps(GPTConfig(block_size=T), device, dtype, cfg.context_batch)
            seconds = timed(step, cfg.context_steps, device)
        peak = memory_high_water(device)
        return seconds, None if peak is None or before is None else peak - before
    except (RuntimeError, MemoryError) as e:
        if not out_of_memory(e):
            raise
        return None
    finally:  # nothing of this context stays to weigh on the next one's time or memory
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
    ran_out_at = {}
    with memory_bounded(device):
        # A first, untimed step loads the libraries' kernels, so that no variant in the table pays for it.
        time_context(min(contexts), "fused", device, dtype, dataclasses.replace(cfg, context_steps=1))
        for T in contexts:
            cells = []
            for variant in variants:
                if T >= ran_out_at.get(variant, math.inf):
                    cells.append(f"not tried (out of memory at {ran_out_at[variant]}) | | ")
                elif (result := time_context(T, variant, device, dtype, cfg)) is None:
                    ran_out_at[variant] = T
                    cells.append("out of memory | | ")
                    log(f"context {T}, {variant}: out of memory")
                else:
                    seconds, peak = result
                    shown = "-" if peak is None else f"{peak / 2**30:,.2f} GiB"
                    cells.append(f"{seconds * 1000:,.0f} | {cfg.context_batch * T / seconds:,.0f} | {shown}")
                    log(f"context {T}, {variant}: {seconds * 1000:,.0f} ms/step, peak memory {shown}")
            out.write(f"| {T} | " + " | ".join(cells) + " |\n")
            out.flush()


# ---- 16. Command line ------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # a mistyped flag gets one line, not the whole usage block (torchrun: from rank 0)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n" if process_rank() == 0 else None)


def build_parser():
    parser = ArgumentParser(prog="gpt.py", description="GPT-2 in one file: train it, sample from it, look inside "
                            "it, time it.")
    commands = parser.add_subparsers(required=True)
    for run, config_class, about in (  # each command is named after the function that runs it
        (train, TrainConfig, "train a GPT on a text file (or fine-tune GPT-2 with --init-from)"),
        (sample, SampleConfig, "write text with a trained model"),
        (inspect, InspectConfig, "print the likely next tokens after a prompt; draw what the model attends to"),
        (prepare, PrepareConfig, "encode a text once into a token file that train --data reads"),
        (bench, BenchConfig, "time training and sampling of the default model on this machine"),
    ):
        command = commands.add_parser(run.__name__, help=about, description=about)
        command.set_defaults(run=run, config_class=config_class)
        for f in dataclasses.fields(config_class):
            meta = dict(f.metadata)
            text = f"{meta.pop('help')} (default: {meta.pop('default_text', f.default)})".replace("%", "%%")
            kind = {"action": "store_true"} if isinstance(f.default, bool) else {"type": f.type, **meta}
            command.add_argument(flag(f.name), default=argparse.SUPPRESS, help=text, **kind)
    return parser


def main(argv=None):
    """Run the command line; -> the exit status (0 done, 1 an error, 2 a mistyped flag; stopped by a signal,
    128 + its number, as shells report it: 130 Ctrl-C, 143 SIGTERM)."""
    try:
        given = vars(build_parser().parse_args(argv))
    except SystemExit as e:  # argparse has printed --help, or its one-line error
        return e.code
    run, config_class = given.pop("run"), given.pop("config_class")  # the rest: only the flags typed, no defaults
    sys.stdout = sys.stdout or open(os.devnull, "w")  # started with stdout closed (>&-): the text goes nowhere
    sys.stderr = sys.stderr or open(os.devnull, "w")  # stderr closed (2>&-): progress too (print would take stdout)
    if hasattr(sys.stdout, "reconfigure"):  # the text is UTF-8 wherever it goes: Windows would write a file in its
        sys.stdout.reconfigure(encoding="utf-8")  # code page (cp1252), which has no place for most characters
    try:
        if run is train:  # train also takes the checkpoint --resume read, and says which signal stopped it
            cfg, checkpoint = resumed_config(given) if given.get("resume") else (config_class(**given), None)
            stopped_by = train(cfg, checkpoint)["interrupted"]
            return 128 + stopped_by if stopped_by else 0
        run(config_class(**given))
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C; or a second Ctrl-C or SIGTERM while training, which says its signal
        log("\ninterrupted")
        return 128 + (e.args[0] if e.args else signal.SIGINT)
    except BrokenPipeError:  # whoever read our output stopped reading (python gpt.py sample | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (GPTError, OSError, MemoryError, RuntimeError) as e:  # a check's error; a file no check foresaw; memory
        if isinstance(e, RuntimeError) and not out_of_memory(e):
            raise  # any other RuntimeError is a bug in gpt.py: its traceback helps
        process = f" (process {process_rank()} of {process_count()})" if process_rank() else ""  # torchrun's others
        log(f"error{process}: {' '.join(str(e).split()) or type(e).__name__}" + ("" if isinstance(e, (GPTError, OSError))
            else " (out of memory: try a smaller model, --batch-size or --block-size)"), every_process=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
