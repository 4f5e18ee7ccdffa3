"""The trained recommender as an MLflow pyfunc: a history of raw item ids in, top-k raw item ids out.

``train/tracking.py`` (``log_recommender_model``) logs it at the end of a run; load it back with

    model = mlflow.pyfunc.load_model("models:/<model id>")          # or runs:/<run id>/model
    model.predict(pd.DataFrame({"history": [["12", "7", "33"]]}), params={"k": 10})
    # -> DataFrame with column top_item_ids: [["51", "8", ...]]

Input columns: ``history`` (raw item ids, oldest first; ids unknown to the model are dropped),
optionally ``timestamps`` (one per history item) and ``query_timestamp`` (the time of the next
interaction) for models with a time bias. The scoring is the trainer's evaluation: the encoder's
output at the last position against the L2-normalised item table, the history and padding excluded,
ties by ascending id. BERT4Rec's query is its output at a mask appended after the history's last
``max_seq_len - 1`` known items, as in its evaluation; the mask row is never recommended.
The artifacts are plain files: ``config.yaml`` (the run's resolved config),
``encoder.pt`` (a state dict, loaded with ``weights_only=True``), ``item_table.npy`` and
``items.parquet`` (dense id -> raw id).
"""

from __future__ import annotations

import mlflow.models
import mlflow.pyfunc
import numpy as np


class SequenceRecommender(mlflow.pyfunc.PythonModel):
    """Dense encoder + gathered item table, mapping raw item histories to top-k raw item ids."""

    def load_context(self, context) -> None:
        """Rebuild the encoder from the run's config and load the weights, table and vocabulary."""
        import pyarrow.parquet as pq
        import torch

        from train.config import load_train_config
        from train.models import build_encoder
        from train.models.bert4rec import Bert4Rec
        from train.models.config import Bert4RecConfig

        cfg = load_train_config(context.artifacts["config"])
        # BERT4Rec is trained to fill masks: it ranks from a mask appended after the history, and its
        # table's row after the items is that mask token.
        self.appends_mask = isinstance(cfg.model, Bert4RecConfig)
        self.max_seq_len = cfg.model.max_seq_len
        self.encoder = Bert4Rec(cfg.model) if self.appends_mask else build_encoder(cfg.model)
        state = torch.load(context.artifacts["encoder"], map_location="cpu", weights_only=True)
        self.encoder.load_state_dict(state)
        self.encoder.eval()
        self.raw_ID = torch.from_numpy(np.load(context.artifacts["item_table"]))
        self.table_ID = torch.nn.functional.normalize(self.raw_ID, dim=-1)
        vocab = pq.read_table(context.artifacts["items"], columns=["raw_id", "dense_id"])
        raw = [str(r) for r in vocab.column("raw_id").to_pylist()]
        dense = vocab.column("dense_id").to_pylist()
        self.dense_of = dict(zip(raw, dense))
        self.num_items = max(dense)  # items are rows 1..num_items; BERT4Rec's mask is row num_items + 1
        self.raw_of = np.empty(self.raw_ID.shape[0], dtype=object)
        self.raw_of[0] = ""
        self.raw_of[np.asarray(dense)] = np.asarray(raw, dtype=object)

    def predict(self, context, model_input, params: dict | None = None):
        """``model_input``: a DataFrame (see the module docstring); returns one with ``top_item_ids``."""
        import pandas as pd
        import torch

        from train.metrics import topk_items

        k = int((params or {}).get("k", 10))
        if "history" not in model_input.columns:
            raise ValueError(
                f"input needs a 'history' column of raw item id lists; got {list(model_input.columns)}"
            )
        out = []
        with torch.no_grad():
            for i, row in enumerate(model_input.itertuples(index=False)):
                history = [str(x) for x in row.history]
                keep = [j for j, x in enumerate(history) if x in self.dense_of][-self.max_seq_len :]
                if not keep:
                    raise ValueError(f"row {i}: no item of the history is known to the model")
                ids = torch.tensor([self.dense_of[history[j]] for j in keep], dtype=torch.long)
                offsets = torch.tensor([0, len(ids)])
                if self.appends_mask:  # encode the last max_seq_len - 1 items, then the mask
                    inputs = torch.cat([ids[1 - self.max_seq_len :], torch.tensor([self.num_items + 1])])
                    query_TD = self.encoder(self.raw_ID[inputs], torch.tensor([0, len(inputs)]), len(inputs))
                else:
                    times = (None, None)
                    if "timestamps" in model_input.columns and row.timestamps is not None:
                        ts = [int(row.timestamps[j]) for j in keep]
                        query = int(getattr(row, "query_timestamp", ts[-1]))
                        times = (torch.tensor(ts), torch.tensor(ts[1:] + [query]))
                    query_TD = self.encoder(self.raw_ID[ids], offsets, len(ids), *times)
                scores_1I = query_TD[-1:] @ self.table_ID[: self.num_items + 1].T  # padding and items
                top = topk_items(scores_1I, ids, offsets, k=min(k, self.num_items))
                out.append([self.raw_of[t] for t in top[0].tolist() if t > 0])
        return pd.DataFrame({"top_item_ids": out})


# MLflow's "models from code": the logged model is this file, loaded by running it (no pickle).
mlflow.models.set_model(SequenceRecommender())
