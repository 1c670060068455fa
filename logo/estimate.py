"""``python -m logo.estimate``: peak memory per GPU of one LOGO training step, and whether it fits.

    python -m logo.estimate --model llama-3-8b --real-tokens 8192 --negatives 3 --sft-weight 0.1 \\
        --gpus 8 --zero 3 --gpu A800-80GB --compare

The estimate adds, per GPU (bytes; ``b`` = bytes of the compute dtype, P = parameters, P_t = trainable):

* parameters: ``b·P`` (ZeRO-3: ``/gpus``; with parameter offload: 0) + under ZeRO-3 the gathered working
  set of one layer;
* gradients: ``b·P_t`` (ZeRO-2/3: ``/gpus``); optimizer: AdamW ``12·P_t`` with mixed precision (fp32
  master + m + v; fp32 training ``8·P_t``), ZeRO-1+ ``/gpus``, optimizer offload: 0;
* activations kept through the step: with gradient checkpointing each layer's input (``b·D`` per token),
  without it every layer's saved tensors, ``b·(12D + 4D_kv + 4I)`` per token (see
  :func:`layer_activation_bytes_per_token`), plus the embedding and final-norm outputs;
* two transients, of which only the larger counts (the loss runs after the forward, a layer is
  recomputed later in the backward): ``layer`` = one layer's recomputation (checkpointing) + the prefix
  keys/values that shared-prefix attention concatenates per response; ``loss`` = the loss path.
  ``naive`` (the authors' release) materialises the logits of every position of every sequence in ``b``
  bytes, upcasts them (4 B; no copy in fp32), keeps log_softmax (4 B) and its gradient (4 B); with
  lambda > 0 the SFT cross-entropy of the chosen sequence adds ``8·L·V``. ``fused`` (``logo_kernels``)
  keeps no ``[tokens, V]`` tensor: the response hidden states, a bounded tile workspace and, when the
  head trains, its fp32 gradient accumulator;
* framework overhead: CUDA context and allocator reserve (a fixed ``--overhead-gib``, default 2.5) and
  fragmentation (``--fragmentation``, default 5% of the rest).

Token counts per example: ``separate`` packing (the authors') runs M + 1 sequences of ``real + response``
tokens; ``shared`` (this package) one row of ``real + (M + 1)·response``. The position window only
changes RoPE tables (negligible): memory follows the real tokens. The model is validated against the
peak live tensor bytes of real CPU training steps traced op by op (:mod:`logo.memory_trace`,
``tests/test_estimate.py``: six small configurations, both paths, with and without checkpointing, all
within 10%).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from typing import Dict, List, Optional, Tuple

from .errors import ConfigError, InputFileError, run_cli

GIB = 2 ** 30
BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

GPUS = {"A800-80GB": 80 * GIB, "A100-80GB": 80 * GIB, "H100-80GB": 80 * GIB, "H200-141GB": 141e9,
        "A100-40GB": 40 * GIB, "RTX-4090-24GB": 24 * GIB}


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on in a decoder: Llama-style layers, optionally explicit head sizes (Gemma 3, GPT-OSS)
    and mixture-of-experts MLPs (``experts`` > 0: every expert's parameters count, ``experts_per_token`` run per
    token)."""

    name: str
    vocab: int
    hidden: int
    intermediate: int  # per expert in an MoE
    layers: int
    heads: int
    kv_heads: int
    tied: bool = False
    explicit_head_dim: Optional[int] = None
    experts: int = 0
    experts_per_token: int = 0
    exact_prefix: bool = False  # softcap, sinks or sliding windows: the prefix runs logo.attention's exact path

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def active_mlps(self) -> int:
        """MLPs a token runs through per layer (1 dense; top-k experts in an MoE)."""
        return self.experts_per_token if self.experts else 1

    def layer_linears(self) -> Dict[str, Tuple[int, int]]:
        d, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}

    def layer_parameters(self) -> int:
        sizes = {name: a * b for name, (a, b) in self.layer_linears().items()}
        attention = sizes["q_proj"] + sizes["k_proj"] + sizes["v_proj"] + sizes["o_proj"]
        mlp = sizes["gate_proj"] + sizes["up_proj"] + sizes["down_proj"]
        if self.experts:
            mlp = self.experts * mlp + self.hidden * self.experts  # every expert, and the router
        return attention + mlp + 2 * self.hidden

    def parameters(self) -> int:
        embed = self.vocab * self.hidden
        return embed * (1 if self.tied else 2) + self.layers * self.layer_parameters() + self.hidden


BUILTIN = {
    "llama-3-8b": ModelShape("Llama-3-8B", 128256, 4096, 14336, 32, 32, 8),
    "mistral-7b": ModelShape("Mistral-7B", 32000, 4096, 14336, 32, 32, 8),
    "llama-2-7b": ModelShape("Llama-2-7B", 32000, 4096, 11008, 32, 32, 32),
    # Qwen/Qwen2.5-7B-Instruct config.json: vocab 152064, hidden 3584, intermediate 18944, 28 layers, 28 / 4 heads
    "qwen2.5-7b": ModelShape("Qwen2.5-7B-Instruct", 152064, 3584, 18944, 28, 28, 4),
    # Qwen/Qwen3-8B: vocab 151936, hidden 4096, intermediate 12288, 36 layers, 32 / 8 heads, head_dim 128
    "qwen3-8b": ModelShape("Qwen3-8B", 151936, 4096, 12288, 36, 32, 8),
    # google/gemma-3-12b-it (text): vocab 262208, hidden 3840, intermediate 15360, 48 layers, 16 / 8 heads of 256,
    # tied embeddings; 5 sliding (1024) : 1 global layers — the window changes no stored activation
    "gemma-3-12b": ModelShape("Gemma-3-12B", 262208, 3840, 15360, 48, 16, 8, tied=True, explicit_head_dim=256,
                              exact_prefix=True),
    # openai/gpt-oss-20b: vocab 201088, hidden 2880, 24 layers, 64 / 8 heads of 64, 32 experts (intermediate 2880),
    # 4 per token; attention sinks and alternating 128-token sliding layers
    "gpt-oss-20b": ModelShape("GPT-OSS-20B", 201088, 2880, 2880, 24, 64, 8, explicit_head_dim=64, experts=32,
                              experts_per_token=4, exact_prefix=True),
}


def model_shape(name_or_path: str) -> ModelShape:
    """A built-in shape (``BUILTIN``) or a local config.json / model dir (dense or MoE: ``num_local_experts`` /
    ``num_experts`` with ``num_experts_per_tok`` and, where given, ``moe_intermediate_size``)."""
    if name_or_path.lower() in BUILTIN:
        return BUILTIN[name_or_path.lower()]
    path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
    if not os.path.isfile(path):
        raise ConfigError(f"--model: {name_or_path!r} is neither a built-in shape {sorted(BUILTIN)} nor a config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            c = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputFileError(f"{path}: not a JSON config ({error})") from None
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [f for f in fields if f not in c]
    if missing:
        raise InputFileError(f"{path}: no {missing} (a Llama-style config is needed)")
    heads = c["num_attention_heads"]
    values = {f: c[f] for f in fields}
    values["num_key_value_heads"] = c.get("num_key_value_heads") or heads
    bad = [f"{k} = {v!r}" for k, v in values.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise InputFileError(f"{path}: sizes must be integers >= 1: {', '.join(bad)}")
    head_dim = c.get("head_dim")
    if head_dim is not None and (isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1):
        raise InputFileError(f"{path}: head_dim must be an integer >= 1, got {head_dim!r}")
    if (head_dim is None and values["hidden_size"] % heads) or heads % values["num_key_value_heads"]:
        raise InputFileError(f"{path}: hidden_size must divide by num_attention_heads (or head_dim be given), and "
                             "those by num_key_value_heads")
    experts = c.get("num_local_experts") or c.get("num_experts") or 0
    per_token = c.get("num_experts_per_tok") or 0
    intermediate = c.get("moe_intermediate_size") or c["intermediate_size"] if experts else c["intermediate_size"]
    return ModelShape(os.path.basename(os.path.dirname(os.path.abspath(path))) or path, c["vocab_size"],
                      c["hidden_size"], intermediate, c["num_hidden_layers"], heads,
                      values["num_key_value_heads"], bool(c.get("tie_word_embeddings", False)), head_dim,
                      int(experts), int(per_token))


@dataclass(frozen=True)
class Setting:
    real_tokens: int = 8192          # context + question tokens of one example
    window: int = 65536              # synthesized position window (does not change memory)
    negatives: int = 2               # M
    response_tokens: int = 512       # per response
    sft_weight: float = 0.1          # lambda
    finetune: str = "lora"           # lora | full
    lora_r: int = 32
    lora_targets: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens")
    zero: int = 3                    # 0 (plain), 1, 2, 3
    offload: str = "none"            # none | optimizer | all (parameters + optimizer)
    gpus: int = 8
    rows: int = 1                    # examples per GPU per micro-batch
    checkpointing: bool = True
    dtype: str = "bf16"
    loss: str = "fused"              # fused | naive
    packing: str = "shared"          # shared | separate
    overhead_gib: float = 2.5
    fragmentation: float = 0.05
    workspace_gib: float = 0.25      # fused loss tile workspace bound
    sequence_parallel: int = 1       # sequence-parallel group size (DeepSpeed Ulysses)
    attention_chunk_elements: int = 1 << 22  # scores per query chunk of the exact attention (logo.attention)

    def validate(self) -> "Setting":
        """Every field by class: choices, integers >= 1 (negatives, GPUs, ... ) or >= 0, finite non-negative
        overheads, fragmentation in [0, 1); a ConfigError names the field."""
        for name, allowed in (("finetune", ("lora", "full")), ("offload", ("none", "optimizer", "all")),
                              ("dtype", tuple(BYTES)), ("loss", ("fused", "naive")), ("packing", ("shared", "separate"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.zero not in (0, 1, 2, 3) or isinstance(self.zero, bool):
            raise ConfigError(f"zero must be 0..3, got {self.zero}")
        for name in ("real_tokens", "window", "negatives", "response_tokens", "gpus", "rows", "lora_r",
                     "sequence_parallel", "attention_chunk_elements"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("sft_weight", "overhead_gib", "workspace_gib", "fragmentation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.fragmentation >= 1:
            raise ConfigError(f"fragmentation is a fraction of the rest: it must be < 1, got {self.fragmentation}")
        if self.sequence_parallel > 1:
            if self.gpus % self.sequence_parallel:
                raise ConfigError(f"sequence_parallel {self.sequence_parallel} must divide gpus {self.gpus}")
            if (self.loss, self.packing) != ("fused", "shared"):
                raise ConfigError("sequence_parallel > 1 runs this package's path: loss 'fused', packing 'shared' "
                                  f"(got {self.loss!r}, {self.packing!r})")
        return self


def trainable_parameter_count(shape: ModelShape, s: Setting) -> int:
    if s.finetune == "full":
        return shape.parameters()
    linears = shape.layer_linears()
    total = 0
    for target in s.lora_targets:
        if target in linears:
            fan_in, fan_out = linears[target]
            total += shape.layers * s.lora_r * (fan_in + fan_out)
        elif target == "embed_tokens":
            total += s.lora_r * (shape.vocab + shape.hidden)
        elif target == "lm_head":
            total += s.lora_r * (shape.vocab + shape.hidden)
    return total


def token_counts(s: Setting) -> Tuple[int, int, int]:
    """(backbone tokens, scored tokens, tokens whose logits the naive path materialises) per GPU. Under sequence
    parallelism P a rank holds ceil(row / P) positions of each row and scores the response tokens among them: the
    responses close the row, so the last rank scores min(all scored, its positions) — the worst rank counts."""
    sequences = s.negatives + 1
    if s.packing == "shared":
        backbone = s.real_tokens + sequences * s.response_tokens
    else:
        backbone = sequences * (s.real_tokens + s.response_tokens)
    scored = sequences * s.response_tokens
    if s.sequence_parallel > 1:
        backbone = -(-backbone // s.sequence_parallel)
        scored = min(scored, backbone)
    return s.rows * backbone, s.rows * scored, s.rows * backbone


def ulysses_bytes_per_token(shape: ModelShape, b: int) -> int:
    """Per local token and layer, what DeepSpeed's Ulysses attention adds: the all-to-all outputs q, k, v (whole
    sequence, heads / P: the same bytes as the local q, k, v) and the attention output before the all-to-all back,
    all saved for the backward."""
    return b * (2 * shape.q_dim + 2 * shape.kv_dim)


def layer_activation_bytes_per_token(shape: ModelShape, b: int) -> int:
    """Saved tensors of one decoder layer per token, as traced (``tests/test_estimate.py``; the shared-prefix
    attention saves no copy of the keys): about 2.5 D for the norms and residual stream, 2 q_dim (the rotated
    queries and the attention output's contiguous copy), 4 kv (keys, values and their rotated forms) and
    gate / up / SiLU / product (4I) of each MLP the token runs (top-k experts in an MoE, plus the routed copies of
    its hidden state)."""
    mlp = shape.active_mlps * (4 * shape.intermediate + (2 * shape.hidden if shape.experts else 0))
    return int(b * (2.5 * shape.hidden + 2 * shape.q_dim + 4 * shape.kv_dim + mlp))


def attention_transient_bytes(shape: ModelShape, s: "Setting", b: int, row_tokens: int) -> float:
    """One layer's shared-prefix attention beyond its saved tensors (:mod:`logo.attention`), in the backward: fp32
    key/value gradient accumulators of the row (key/value heads) and the live fp32 score tensors of one query chunk
    (two — four with softcap —, each at most ``attention_chunk_elements``: a response's queries against the prefix and itself; the whole prefix too for a
    model whose prefix runs the exact path, ``ModelShape.exact_prefix``). Under sequence parallelism the row is
    whole but the heads a P-th."""
    per_row = 2 * 4 * shape.kv_dim * row_tokens / s.sequence_parallel
    queries = s.real_tokens if shape.exact_prefix else s.response_tokens
    scores = min(s.attention_chunk_elements,
                 shape.heads / s.sequence_parallel * queries * (s.real_tokens + s.response_tokens))
    return s.rows * per_row + (4 if shape.exact_prefix else 2) * 4 * scores


def estimate(shape: ModelShape, s: Setting) -> Dict[str, float]:
    """Bytes per GPU of each component (module doc) and their ``total``."""
    s.validate()
    b = BYTES[s.dtype]
    mixed = s.dtype != "fp32"
    p, p_t = shape.parameters(), trainable_parameter_count(shape, s)
    shard = lambda n, stage: n / s.gpus if s.zero >= stage else n  # noqa: E731
    out: Dict[str, float] = {}
    out["parameters"] = 0.0 if (s.offload == "all" and s.zero == 3) else shard(b * p, 3)
    if s.zero == 3:
        out["parameters"] += 2 * b * shape.layer_parameters()  # gathered layer + prefetch
    if s.finetune == "lora":
        out["parameters"] += b * p_t  # adapters (small; kept whole for simplicity)
    out["gradients"] = shard(b * p_t, 2)
    opt_bytes = (12 if mixed else 8) * p_t
    out["optimizer"] = 0.0 if s.offload in ("optimizer", "all") else shard(opt_bytes, 1)

    backbone, scored, logit_tokens = token_counts(s)
    per_token_layer = layer_activation_bytes_per_token(shape, b)
    if s.sequence_parallel > 1:
        per_token_layer += ulysses_bytes_per_token(shape, b)
    kept = backbone * b * shape.hidden * 2  # embedding output + final norm output
    if s.checkpointing:
        kept += backbone * b * shape.hidden * shape.layers  # each layer's input
        recompute = backbone * per_token_layer  # one layer re-run in the backward
    else:
        kept += backbone * per_token_layer * shape.layers
        recompute = 0.0
    row_tokens = s.real_tokens + (s.negatives + 1) * s.response_tokens
    attention = attention_transient_bytes(shape, s, b, row_tokens) if s.packing == "shared" else 0.0
    vocab = shape.vocab
    if s.loss == "naive":
        upcast = 4 if b < 4 else 0  # fp32 logits are not copied by .float()
        logits = (b + upcast + 8) * logit_tokens * vocab  # logits, upcast, log_softmax, its gradient
        if s.sft_weight > 0:
            logits += 8 * (s.real_tokens + s.response_tokens) * s.rows * vocab
    else:
        head_grad = 4 * vocab * shape.hidden if s.finetune == "full" else 0  # fp32 dW accumulator of the head
        logits = 3 * 4 * scored * shape.hidden + s.workspace_gib * GIB + head_grad
    out["activations"] = kept
    out["layer"] = recompute + attention
    out["loss"] = logits
    # the loss runs after the forward, a layer's recomputation later in the backward: only the larger of
    # the two transients counts toward the peak
    transient = max(out["layer"], out["loss"])
    subtotal = out["parameters"] + out["gradients"] + out["optimizer"] + kept + transient
    out["overhead"] = s.overhead_gib * GIB + s.fragmentation * subtotal
    out["total"] = subtotal + out["overhead"]
    return out


def fits(total: float, gpu: str) -> bool:
    return total <= GPUS[gpu]


def format_table(shape: ModelShape, rows: List[Tuple[str, Setting, Dict[str, float]]], gpu: str) -> str:
    """A text table: one column per setting, one row per component, the verdict last."""
    names = ["parameters", "gradients", "optimizer", "activations", "layer", "loss", "overhead", "total"]
    width = max(18, max(len(label) for label, _, _ in rows) + 2)
    lines = [f"{shape.name} ({shape.parameters() / 1e9:.2f} B parameters), GiB per GPU on {gpu}:",
             "component".ljust(14) + "".join(label.rjust(width) for label, _, _ in rows)]
    for name in names:
        lines.append(name.ljust(14) + "".join(f"{est[name] / GIB:{width}.2f}" for _, _, est in rows))
    lines.append("verdict".ljust(14) + "".join(("fits" if fits(est["total"], gpu) else "OOM").rjust(width)
                                               for _, _, est in rows))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    d = Setting()
    parser = argparse.ArgumentParser(prog="python -m logo.estimate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3-8b", help=f"built-in shape {sorted(BUILTIN)} or a config.json")
    parser.add_argument("--gpu", default="A800-80GB", choices=sorted(GPUS))
    parser.add_argument("--real-tokens", type=int, default=d.real_tokens, help="context + question tokens")
    parser.add_argument("--window", type=int, default=d.window, help="position window (memory does not depend on it)")
    parser.add_argument("--negatives", type=int, default=d.negatives, help="M")
    parser.add_argument("--response-tokens", type=int, default=d.response_tokens)
    parser.add_argument("--sft-weight", type=float, default=d.sft_weight, help="lambda")
    parser.add_argument("--finetune", default=d.finetune, choices=["lora", "full"])
    parser.add_argument("--lora-r", type=int, default=d.lora_r)
    parser.add_argument("--zero", type=int, default=d.zero, choices=[0, 1, 2, 3])
    parser.add_argument("--offload", default=d.offload, choices=["none", "optimizer", "all"])
    parser.add_argument("--gpus", type=int, default=d.gpus)
    parser.add_argument("--rows", type=int, default=d.rows, help="examples per GPU per micro-batch")
    parser.add_argument("--sequence-parallel", type=int, default=d.sequence_parallel, metavar="P",
                        help="sequence-parallel group size (DeepSpeed Ulysses): each GPU holds 1/P of every row")
    parser.add_argument("--no-checkpointing", action="store_true", help="gradient checkpointing off")
    parser.add_argument("--dtype", default=d.dtype, choices=sorted(BYTES))
    parser.add_argument("--loss", default=d.loss, choices=["fused", "naive"])
    parser.add_argument("--packing", default=d.packing, choices=["shared", "separate"])
    parser.add_argument("--overhead-gib", type=float, default=d.overhead_gib,
                        help="CUDA context + allocator reserve, GiB")
    parser.add_argument("--fragmentation", type=float, default=d.fragmentation,
                        help="allocator fragmentation, as a fraction of the rest")
    parser.add_argument("--compare", action="store_true",
                        help="columns: the authors' path (separate + naive) and ours (shared + fused)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli("logo.estimate", _main, argv)


def _main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    shape = model_shape(args.model)
    setting = Setting(real_tokens=args.real_tokens, window=args.window, negatives=args.negatives,
                      response_tokens=args.response_tokens, sft_weight=args.sft_weight, finetune=args.finetune,
                      lora_r=args.lora_r, zero=args.zero, offload=args.offload, gpus=args.gpus, rows=args.rows,
                      checkpointing=not args.no_checkpointing, dtype=args.dtype, loss=args.loss,
                      packing=args.packing, overhead_gib=args.overhead_gib,
                      fragmentation=args.fragmentation, sequence_parallel=args.sequence_parallel).validate()
    if args.compare and setting.sequence_parallel > 1:
        raise ConfigError("--compare and --sequence-parallel: the authors' path has no sequence parallelism")
    if args.compare:
        columns = [("authors (naive)", replace(setting, loss="naive", packing="separate")),
                   ("ours (fused)", replace(setting, loss="fused", packing="shared"))]
    else:
        columns = [(f"{setting.packing}+{setting.loss}", setting)]
    rows = [(label, s, estimate(shape, s)) for label, s in columns]
    if args.json:
        print(json.dumps([{"label": label, "setting": asdict(s), "gib": {k: v / GIB for k, v in est.items()},
                           "fits": fits(est["total"], args.gpu)} for label, s, est in rows], indent=2))
    else:
        print(format_table(shape, rows, args.gpu))
        where = (f"in a {setting.window}-position window" if setting.window > setting.real_tokens
                 else "at their own positions (no synthesis)")
        print(f"real tokens {setting.real_tokens} {where}, M={setting.negatives}, "
              f"{setting.response_tokens}-token responses, lambda={setting.sft_weight}, {setting.finetune}, "
              f"ZeRO-{setting.zero} on {setting.gpus} GPUs, offload {setting.offload}, "
              f"checkpointing {'on' if setting.checkpointing else 'off'}, {setting.dtype}"
              + (f", sequence parallel {setting.sequence_parallel}" if setting.sequence_parallel > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
