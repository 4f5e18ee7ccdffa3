"""Configuration of the model families: the ``model:`` section of the training config.

``model.name`` picks the family, and with it the dataclass that checks the rest of the section
(``ModelConfig`` is a ``cluster.config.ConfigChoice``): each family has exactly its own keys, and a key
that only another family understands is an error naming the key and the family.

==========  ==================  ==========================================================
name        dataclass           task (``train/tasks``)
==========  ==================  ==========================================================
hstu        ``HSTUConfig``      next-item retrieval over the item table (``retrieval``)
sasrec      ``SASRecConfig``    next-item retrieval over the item table (``retrieval``)
gru4rec     ``GRU4RecConfig``   next-item retrieval over the item table (``retrieval``)
bert4rec    ``Bert4RecConfig``  masked-item (cloze) training over the item table (``bert4rec``)
tiger       ``TigerConfig``     generative retrieval over semantic IDs (``tiger``)
==========  ==================  ==========================================================

HSTU and SASRec share the ``SequenceEncoderConfig`` fields; GRU4Rec and BERT4Rec have their own (a
GRU has no blocks or heads; BERT4Rec has no causal/jagged switch but a masking probability). Defaults reproduce the frozen ML-1M
configs of facebookresearch/generative-recommenders (``configs/ml-1m/hstu-sampled-softmax-n128-
final.gin`` and ``sasrec-sampled-softmax-n128-final.gin``): d=50, 2 blocks, 1 head, dropout 0.2.
The reference SASRec applies dropout 0.2 to its attention weights (``attn_dropout=0.2`` in its
config) and the reference HSTU applies none (the default ``attn_dropout=0.0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from cluster.config import ConfigChoice, ConfigError
from train.models.tiger import TigerConfig

# The reference bucketises time gaps as ``(log(max(1, |dt|)) / 0.301).long()``, i.e. a logarithm in
# base exp(0.301) ~= 1.351 (each bucket is ~35% wider than the previous one).
DEFAULT_TIME_BUCKET_BASE = math.exp(0.301)


@dataclass
class SequenceEncoderConfig:
    """What every sequence encoder of the retrieval task has (HSTU, SASRec)."""

    name: str = ""
    embedding_dim: int = 50  # model width D; also the item table's width
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2  # input-embedding dropout, and each family's block dropout
    attn_dropout: float = 0.0  # dropout on the attention weights
    max_seq_len: int = 200  # the most recent items a row keeps as input; positions table size
    jagged: bool = True  # jagged values (fbgemm kernels) vs the padded pure-PyTorch reference path
    # How an item is embedded (train/item_embeddings.py): "id", a free row per item; "semantic_ids",
    # the sum of its codes' rows (one row per code and level), codes from semantic_ids_dir.
    item_embedding: Literal["id", "semantic_ids"] = "id"
    semantic_ids_dir: str = ""

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the ``model.*`` key for values the types cannot rule out."""
        if self.item_embedding == "semantic_ids" and not self.semantic_ids_dir:
            raise ConfigError(
                "model.semantic_ids_dir",
                "is empty but model.item_embedding=semantic_ids: give a semantic-ID table of data.dir's items "
                "(python -m data_pipeline semantic-ids, or semantic-ids-reference)",
            )
        positive = {f: getattr(self, f) for f in self._positive_fields()}
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"model.{key}", f"got {value}, expected an integer >= 1")
        for key, value in {"dropout": self.dropout, "attn_dropout": self.attn_dropout}.items():
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{key}", f"got {value}, expected a probability in [0, 1)")

    def _positive_fields(self) -> tuple[str, ...]:
        return ("embedding_dim", "num_blocks", "num_heads", "max_seq_len")

    def shape_fields(self) -> tuple[str, ...]:
        """The keys a checkpoint must agree on (besides the name and the catalogue) to be loaded."""
        return ("embedding_dim", "num_blocks", "num_heads")


@dataclass
class HSTUConfig(SequenceEncoderConfig):
    """HSTU (Zhai et al., ICML 2024): ``attention_dim`` is d_qk per head, ``linear_dim`` d_v per head."""

    name: Literal["hstu"] = "hstu"
    attention_dim: int = 50  # d_qk per head (Q and K width = H * d_qk)
    linear_dim: int = 50  # d_v per head (U and V width = H * d_v)
    # Timestamp-bias bucket of a time gap dt (seconds):
    #   min(num_time_buckets - 1, floor(log(max(1, |dt|)) / log(time_bucket_base)))
    num_time_buckets: int = 128
    time_bucket_base: float = DEFAULT_TIME_BUCKET_BASE
    use_time_bias: bool = True
    use_position_bias: bool = True
    # The time gap of query position i to key j is t_i - ts[j], where t_i is:
    #   "target": the time of the item position i predicts (the next item in training, the held-out
    #             item in eval; at serving time, the request time). The reference does this: its bias
    #             buckets ts[i + 1] - ts[j], and eval writes the target's time after the history.
    #   "input":  the time of position i's own item, ts[i] (no knowledge of when the next action is).
    time_gap_from: Literal["target", "input"] = "target"
    # "max_seq_len": divide the HSTU attention by the constant cfg.max_seq_len, as the reference
    # does in effect (it pads every batch to the configured length), so a sequence's output does not
    # depend on what else is in its batch. "batch": divide by the batch's max_seq_len argument.
    attn_scale_len: Literal["max_seq_len", "batch"] = "max_seq_len"

    def _positive_fields(self) -> tuple[str, ...]:
        return (*super()._positive_fields(), "attention_dim", "linear_dim", "num_time_buckets")

    def validate(self) -> None:
        super().validate()
        if not self.time_bucket_base > 1.0:
            raise ConfigError(
                "model.time_bucket_base",
                f"got {self.time_bucket_base}, expected a logarithm base > 1 (default {DEFAULT_TIME_BUCKET_BASE:.4f})",
            )


@dataclass
class SASRecConfig(SequenceEncoderConfig):
    """SASRec (Kang and McAuley, ICDM 2018): post-norm transformer blocks with a causal mask."""

    name: Literal["sasrec"] = "sasrec"
    ffn_dim: int = 50  # hidden width of each block's feed-forward layer

    def _positive_fields(self) -> tuple[str, ...]:
        return (*super()._positive_fields(), "ffn_dim")

    def validate(self) -> None:
        super().validate()
        if self.embedding_dim % self.num_heads != 0:
            raise ConfigError(
                "model.num_heads",
                f"SASRec splits embedding_dim={self.embedding_dim} across heads, so num_heads must divide it; "
                f"got {self.num_heads}",
            )


def _check_positive(cfg, fields: tuple[str, ...]) -> None:
    for key in fields:
        value = getattr(cfg, key)
        if value < 1:
            raise ConfigError(f"model.{key}", f"got {value}, expected an integer >= 1")


def _check_dropout(cfg, fields: tuple[str, ...]) -> None:
    for key in fields:
        value = getattr(cfg, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"model.{key}", f"got {value}, expected a probability in [0, 1)")


@dataclass
class GRU4RecConfig:
    """GRU4Rec (Hidasi et al., ICLR 2016) as a next-item encoder: item embeddings -> dropout -> a GRU of
    ``num_layers`` layers of ``hidden_size`` -> a linear projection back to ``embedding_dim``."""

    name: Literal["gru4rec"] = "gru4rec"
    embedding_dim: int = 64  # the item table's width (and the projected output's)
    hidden_size: int = 100  # the GRU state's width
    num_layers: int = 1
    dropout: float = 0.25  # on the input item embeddings
    hidden_dropout: float = 0.0  # between GRU layers (num_layers > 1), as torch.nn.GRU's dropout
    max_seq_len: int = 200  # the most recent items a row keeps as input

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the ``model.*`` key for values the types cannot rule out."""
        _check_positive(self, ("embedding_dim", "hidden_size", "num_layers", "max_seq_len"))
        _check_dropout(self, ("dropout", "hidden_dropout"))

    def shape_fields(self) -> tuple[str, ...]:
        """The keys a checkpoint must agree on (besides the name and the catalogue) to be loaded."""
        return ("embedding_dim", "hidden_size", "num_layers")


@dataclass
class Bert4RecConfig:
    """BERT4Rec (Sun et al., CIKM 2019): a bidirectional post-norm Transformer trained to recover
    masked items (the cloze task). ``mask_prob`` is the share of a training row's items replaced by
    the mask token; evaluation appends one mask after the history and ranks items for it."""

    name: Literal["bert4rec"] = "bert4rec"
    embedding_dim: int = 64  # model width D; also the item table's width
    num_blocks: int = 2
    num_heads: int = 2
    ffn_dim: int = 256  # hidden width of each block's GELU feed-forward layer (4 D in the paper)
    dropout: float = 0.1  # embedding, residual and feed-forward dropout
    attn_dropout: float = 0.1  # dropout on the attention weights
    max_seq_len: int = 200  # encoder length: training rows keep their last max_seq_len items;
    # evaluation keeps the last max_seq_len - 1 history items and appends the mask
    mask_prob: float = 0.2  # paper: 0.2 on ML-1M, 0.6 on Beauty

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the ``model.*`` key for values the types cannot rule out."""
        _check_positive(self, ("embedding_dim", "num_blocks", "num_heads", "ffn_dim"))
        _check_dropout(self, ("dropout", "attn_dropout"))
        if self.max_seq_len < 2:
            raise ConfigError(
                "model.max_seq_len",
                f"got {self.max_seq_len}, expected >= 2 (at evaluation: at least one history item + the mask)",
            )
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(
                "model.mask_prob",
                f"got {self.mask_prob}, expected a probability in (0, 1) (paper: 0.2 to 0.6)",
            )
        if self.embedding_dim % self.num_heads != 0:
            raise ConfigError(
                "model.num_heads",
                f"BERT4Rec splits embedding_dim={self.embedding_dim} across heads, so num_heads must divide it; "
                f"got {self.num_heads}",
            )

    def shape_fields(self) -> tuple[str, ...]:
        """The keys a checkpoint must agree on (besides the name and the catalogue) to be loaded."""
        return ("embedding_dim", "num_blocks", "num_heads", "ffn_dim", "max_seq_len")


class ModelConfig(ConfigChoice):
    """The ``model:`` section: ``ModelConfig(name="sasrec", ...)`` builds a ``SASRecConfig``."""

    choices = {
        "hstu": HSTUConfig,
        "sasrec": SASRecConfig,
        "gru4rec": GRU4RecConfig,
        "bert4rec": Bert4RecConfig,
        "tiger": TigerConfig,
    }
