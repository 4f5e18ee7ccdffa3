"""The training loop, for every model family: tables (TorchRec) + dense model (DeepSpeed) + eval + checkpoints.

A ``Trainer`` owns the loop and has a handful of methods: ``train_step``, ``train``, ``evaluate``,
``save_checkpoint`` / ``maybe_resume`` (via ``train/checkpoint.py``), ``finish`` and ``close``. What is
specific to a model family (its tables, its dense module, the loss of a batch, how it ranks items) is
a *task* (``train/tasks``), chosen by ``model.name``; evaluation is ``train/evaluation.py``.

Gradient bookkeeping (the one subtle part). Each rank's loss is ``sum of its loss terms *
world_size / global terms``: DeepSpeed averages dense gradients over ranks, which turns that into
the mean over all terms of the global batch. The tables average over ranks too: a data_parallel
table through TorchRec's DDP, a model-parallel one through TorchRec's all-to-all, whose backward
divides by the world size (``torchrec.distributed.comm_ops`` gradient division, on by default).
Task lookups go through ``StepContext.lookup``, which scales them by ``grad_accum`` (undoing
DeepSpeed's 1/grad_accum), and by ``1 / world_size`` only where the ranks' gradients would be
summed (gradient division switched off). Hence one global objective whatever the world size and
sharding, which the sharded-vs-single-process test checks (with SGD on the table for GRU4Rec, whose
update is proportional to the gradient: Adagrad and Adam are blind to a constant factor).

Randomness (negatives, dropout) is a function of (seed, step, rank) inside each task, so a resumed
run draws exactly what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch import Tensor

from cluster.config import flatten, save_config, to_dict
from cluster.preemption import PreemptionHandler, mark_stopped
from train import checkpoint as ckpt
from train.batch import SequenceBatch
from train.config import TrainConfig
from train.distributed import DistInfo, all_reduce_sum
from train.evaluation import Evaluator, evaluate_popularity
from train.reader import SequenceDataset, load_manifest
from train.run_lock import acquire_run_lock
from train.tasks import StepContext, build_task
from train.tracking import default_tags, log_dataset_input, log_recommender_model, make_tracker
from train.zero import build_engine, deepspeed_config

logger = logging.getLogger(__name__)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Trainer:
    """Builds everything from a ``TrainConfig`` on an initialised process group."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.plan = None
        self._peak_checked = False  # schedule=auto: the predicted peak is compared once, on CUDA
        if cfg.schedule.mode == "auto":  # the same plan on every rank: a pure function of the config
            from cluster.schedule import apply_plan, cluster_from_env

            gib = cfg.schedule.gpu_memory_gib
            cfg, self.plan = apply_plan(cfg, cluster_from_env(None if gib is None else int(gib * 2**30)))
            logger.info("schedule=auto: %s", " ".join(self.plan.overrides))
        self.cfg, self.info = cfg, info
        self.device = info.device
        self.output_dir = Path(cfg.run.output_dir)
        self.manifest = load_manifest(cfg.data.dir)
        self.num_items = int(self.manifest["num_items"])
        self.task = build_task(cfg, info, self.manifest)
        self.task.warn_about_data()
        for key in ("batch_size", "eval_batch_size"):
            if getattr(cfg.data, key) % info.world_size:
                raise ValueError(
                    f"data.{key}={getattr(cfg.data, key)} is the global batch; it must be divisible by the "
                    f"world size {info.world_size}"
                )

        self.tables = self.task.build_tables()
        torch.manual_seed(cfg.run.seed)  # identical dense init on every rank
        dense = self.task.build_dense().to(self.device)
        if cfg.schedule.activation_checkpointing:
            if cfg.model.name not in ("hstu", "sasrec", "bert4rec"):
                raise ValueError(
                    "schedule.activation_checkpointing covers hstu, sasrec and bert4rec, "
                    f"not {cfg.model.name}"
                )
            from cluster.schedule import enable_activation_checkpointing

            enable_activation_checkpointing(dense)

        # train_valid trains on the valid rows (every item but the test target); see DataConfig.
        train_split = ["valid" if cfg.data.train_split == "train_valid" else "train"]
        if cfg.data.older_windows:
            if "older" not in self.manifest.get("splits", {}):
                raise ValueError(
                    f"data.older_windows=true but {cfg.data.dir} has no 'older' split; prepare it again with "
                    "split.older_windows=true (python -m data_pipeline prepare --config ... "
                    "split.older_windows=true), or set data.older_windows=false"
                )
            train_split.append("older")
        self.train_data = SequenceDataset(
            cfg.data.dir, train_split, cfg.data.batch_size // info.world_size, rank=info.rank,
            world_size=info.world_size, num_workers=cfg.data.num_workers, shuffle=cfg.data.shuffle,
            seed=cfg.run.seed, partition=cfg.data.partition, batching=cfg.data.batching,
            max_tokens_per_rank=cfg.data.max_tokens_per_rank,
            max_attention_cost_per_rank=cfg.data.max_attention_cost_per_rank,
            max_row_len=self.task.max_seq_len + 1,
        )  # fmt: skip
        local_batches = self.train_data.num_batches_for_rank()
        self.steps_per_epoch = int(self._all_reduce(torch.tensor([local_batches]), dist.ReduceOp.MIN).item())
        total_steps = cfg.run.epochs * self.steps_per_epoch // cfg.optim.grad_accum_steps
        self.ds_config = deepspeed_config(cfg, info.world_size, self.device)
        self.engine = build_engine(dense, cfg, self.ds_config, total_steps)
        self.dense_dtype = next(self.engine.module.parameters()).dtype

        self.step = 0  # micro-steps (batches) done in total
        self.epoch = 0
        self.batches_in_epoch = 0
        self.best_metric = -math.inf
        self.best_step = -1
        self.evals_without_improvement = 0
        self.history: list[dict] = []
        # Wall time spent in this run, carried across resumes (up to the checkpoint resumed from).
        self.elapsed_s = 0.0
        self._clock_start = time.perf_counter()
        self.last_grad_norm: float | None = None

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.run_lock = acquire_run_lock(self.output_dir, info.is_main, self.device)  # before any write
        self.preemption = PreemptionHandler().install()
        self.checkpoints = ckpt.CheckpointManager(self.output_dir / "checkpoints", cfg.run.keep_checkpoints)
        default_uri = f"sqlite:///{self.output_dir.resolve().parent / 'mlflow.db'}"
        self.tracker = make_tracker(
            cfg.tracking, rank=info.rank, run_dir=self.output_dir, default_uri=default_uri
        )
        self.evaluator = Evaluator(cfg, info, self.manifest)
        self.params = self.param_counts()  # once: for the start log, MLflow and final_metrics.json

    # ------------------------------------------------------------------------------------ helpers

    def _all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        t = t.to(self.device)
        dist.all_reduce(t, op=op)
        return t.cpu()

    def param_counts(self) -> dict[str, int]:
        """``{"dense", "tables", "total"}``: the model's size, global (not per shard or rank).

        dense: the DeepSpeed module's parameters (ZeRO-3 partitions them; ds_numel is the full size);
        tables: rows x width of every TorchRec table, at the width the model sees (fbgemm's storage
        padding to a multiple of 4 columns is not counted), optimizer state excluded.
        """
        dense = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        tables = sum(t.num_embeddings * t.embedding_dim for t in self.tables.values())
        return {"dense": int(dense), "tables": int(tables), "total": int(dense + tables)}

    def describe(self) -> dict:
        """What is written to the run directory and MLflow at the start."""
        plans = [f"# table {name}\n{t.plan_text()}" for name, t in self.tables.items()]
        return {
            "sharding_plan": "\n".join(plans) if plans else "(this task has no embedding tables)",
            "deepspeed_config": self.ds_config,
            "num_items": self.num_items,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.info.world_size,
            "params": self.params,
        }

    # ------------------------------------------------------------------------------------- train

    def _step_context(self) -> StepContext:
        fp16 = self.ds_config["fp16"]["enabled"]
        return StepContext(
            step=self.step, seed=self.cfg.run.seed, rank=self.info.rank, world_size=self.info.world_size,
            device=self.device, dense=self.engine, dense_dtype=self.dense_dtype,
            grad_accum_steps=self.cfg.optim.grad_accum_steps,
            loss_scale=float(getattr(self.engine.optimizer, "cur_scale", 1.0)) if fp16 else 1.0,
        )  # fmt: skip

    def train_step(self, batch: SequenceBatch, num_global_targets: int) -> dict:
        """One forward/backward/step on this rank's batch; the loss is the global-batch mean."""
        loss_sum, num = self.task.train_loss(batch, self._step_context())
        loss = loss_sum * (self.info.world_size / max(1, num_global_targets))
        self.engine.backward(loss)
        grad_norm = None
        if self.cfg.zero.stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed reports the global norm only when ZeRO or clipping computes it.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            grad_norm = float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            )
        self.engine.step()
        self._sync_table_lr()
        for table in self.tables.values():
            table.step()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        self.last_grad_norm = None if grad_norm is None else float(grad_norm)
        return {"loss_sum": float(loss_sum.detach()), "positions": int(num)}

    def _sync_table_lr(self) -> None:
        """Give the table the dense schedule's current factor (``embeddings.schedule=dense``).

        Called after each dense step, so the next update of the table (a fused one happens inside the
        next backward) uses the same multiplier of its base LR as the dense optimizer.
        """
        emb = self.cfg.embeddings
        factor = self.engine.get_lr()[0] / self.cfg.optim.lr if emb.schedule == "dense" else 1.0
        for table in self.tables.values():
            table.set_lr(emb.lr * factor)

    def _make_progress(self, total: int):
        mode = self.cfg.run.progress_bar
        show = self.info.is_main and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))
        if not show:
            return None
        from tqdm import tqdm

        return tqdm(
            total=total, initial=self.batches_in_epoch, desc=f"epoch {self.epoch}", dynamic_ncols=True
        )

    def train(self) -> dict:
        """Run epochs from the current state; evaluate, checkpoint, early-stop; test with the best checkpoint."""
        cfg = self.cfg
        info = self.describe()
        if self.info.is_main:
            (self.output_dir / "sharding_plan.txt").write_text(info["sharding_plan"] + "\n")
            (self.output_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2))
            save_config(cfg, self.output_dir / "config.yaml")
        logger.info("sharding plan:\n%s", info["sharding_plan"])
        logger.info(
            "%d items, %d dense + %d table params, %d steps/epoch, world size %d (backend %s, %s), %s",
            self.num_items, self.params["dense"], self.params["tables"], self.steps_per_epoch,
            self.info.world_size, self.info.backend, self.device, self.task.log_summary(),
        )  # fmt: skip
        if self.step == 0:
            self.tracker.log_params({**flatten(to_dict(cfg)), **flatten({"params": self.params})})
        self.tracker.set_tags(default_tags(self.info.world_size))
        for name in ("config.yaml", "deepspeed_config.json", "sharding_plan.txt"):
            self.tracker.log_artifact(self.output_dir / name)
        if self.plan is not None and self.info.is_main:
            from cluster.schedule import write_plan

            write_plan(self.plan, self.output_dir, self.tracker)

        self._sync_table_lr()  # the schedule's value at the current (possibly resumed) step
        stopped_early = False
        max_steps = cfg.run.max_steps
        while self.epoch < cfg.run.epochs and not stopped_early:
            self.train_data.set_epoch(self.epoch)
            if self.batches_in_epoch:
                self.train_data.load_state_dict(
                    {"epoch": self.epoch, "batches_consumed": self.batches_in_epoch}
                )
            loader = iter(self.train_data.loader())
            bar = self._make_progress(self.steps_per_epoch)
            window_loss, window_pos, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
            epoch_rows, epoch_tokens, preempted = 0, 0, False
            while True:
                if max_steps and self.step >= max_steps:
                    break
                batch = next(loader, None)
                n_local = self.task.count_targets(batch, self._step_context())
                has, n_global = all_reduce_sum(
                    [1.0 if batch is not None else 0.0, float(n_local)], self.device
                )
                if has < self.info.world_size:  # some rank is out of data: the epoch ends for all
                    break
                out = self.train_step(batch, int(n_global))
                self.step += 1
                self.batches_in_epoch += 1
                window_loss += out["loss_sum"]
                window_pos += out["positions"]
                window_tokens += int(batch.lengths.sum())
                epoch_rows += len(batch.lengths)
                epoch_tokens += int(batch.lengths.sum())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{out['loss_sum'] / max(1, out['positions']):.4f}")
                if self.step % cfg.run.log_every_steps == 0:
                    self._log_train_window(
                        window_loss, window_pos, window_tokens, time.perf_counter() - window_t0
                    )
                    window_loss, window_pos, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
                if cfg.run.checkpoint_every_steps and self.step % cfg.run.checkpoint_every_steps == 0:
                    self.save_checkpoint()
                if self.preemption.should_stop(self.device):  # all ranks agree on the step
                    preempted = True
                    break
            if bar is not None:
                bar.close()
            if preempted:
                self.save_checkpoint()
                mark_stopped(self.step, self.output_dir, self.info.is_main)
                self.tracker.finish("KILLED")  # the requeued job reopens the run
                return {}
            if max_steps and self.step >= max_steps and self.batches_in_epoch < self.steps_per_epoch:
                self.save_checkpoint()
                logger.info("stopping at run.max_steps=%d (mid-epoch); resume=auto continues", max_steps)
                return {}
            rows, tokens = all_reduce_sum([epoch_rows, epoch_tokens], self.device)
            logger.info("epoch %d done: %d rows, %d items of the %s split (counted from the resume "
                        "point if the epoch resumed mid-way)", self.epoch + 1, rows, tokens, self.train_data.split)  # fmt: skip
            self.epoch += 1
            self.batches_in_epoch = 0
            if self.epoch % cfg.eval.every_epochs == 0 or self.epoch == cfg.run.epochs:
                stopped_early = self._validate()
            self.save_checkpoint()
            if max_steps and self.step >= max_steps:
                logger.info("stopping at run.max_steps=%d; resume=auto continues", max_steps)
                return {}
        return self.finish()

    def _log_train_window(self, loss_sum: float, positions: int, tokens: int, seconds: float) -> None:
        loss_sum, positions, tokens = all_reduce_sum([loss_sum, positions, tokens], self.device)
        metrics = {
            "train/loss": loss_sum / max(1.0, positions),
            "train/lr": self.engine.get_lr()[0],
            # train/table_lr for a task's one table (as the README says), train/<name>_lr for several.
            **{
                "train/table_lr" if len(self.tables) == 1 else f"train/{n}_lr": t.lr
                for n, t in self.tables.items()
            },
            "train/tokens_per_s": tokens / max(seconds, 1e-9),
            "train/peak_memory_mib": peak_memory_mib(self.device),
            "train/epoch": self.epoch + self.batches_in_epoch / max(1, self.steps_per_epoch),
        }
        if self.last_grad_norm is not None:
            metrics["train/grad_norm"] = self.last_grad_norm
        if self.plan is not None and self.device.type == "cuda" and not self._peak_checked:
            from cluster.schedule import check_predicted_peak

            self._peak_checked = True  # once, after the first logged steps
            warning = check_predicted_peak(self.plan, torch.cuda.max_memory_allocated(self.device))
            if warning:
                logger.warning("%s", warning)
        self._record(metrics)
        logger.info(
            "step %d | epoch %.2f | loss %.4f | lr %.2e | grad_norm %s | %.0f tokens/s | peak %.0f MiB",
            self.step, metrics["train/epoch"], metrics["train/loss"], metrics["train/lr"],
            f"{metrics['train/grad_norm']:.3f}" if "train/grad_norm" in metrics else "n/a",
            metrics["train/tokens_per_s"], metrics["train/peak_memory_mib"],
        )  # fmt: skip

    def _record(self, metrics: dict) -> None:
        """Log to MLflow and append to ``<output_dir>/metrics.jsonl`` (rank 0), one JSON line per call."""
        self.tracker.log_metrics(metrics, step=self.step)
        record = {"step": self.step, "elapsed_s": round(self.elapsed(), 3), **metrics}
        self.history.append(record)
        if self.info.is_main:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def elapsed(self) -> float:
        """Seconds of this run so far (setup, training and evaluation), summed over resumed jobs."""
        return self.elapsed_s + time.perf_counter() - self._clock_start

    def _validate(self) -> bool:
        """Evaluate on valid; track the best; return True when early stopping triggers.

        Under ``data.train_split=train_valid`` nothing is held out: this evaluates test for the curve
        only (as the reference code does), tracks no best, and never stops early.
        """
        if self.cfg.data.train_split == "train_valid":
            metrics = self.evaluate("test")
            self._record({f"test/{k}": v for k, v in metrics.items()})
            logger.info("epoch %d test (curve only, not used for selection): %s", self.epoch, _fmt(metrics))
            return False
        metrics = self.evaluate("valid")
        self._record({f"valid/{k}": v for k, v in metrics.items()})
        logger.info("epoch %d valid: %s", self.epoch, _fmt(metrics))
        value = metrics[self.cfg.eval.metric]
        if value > self.best_metric:
            self.best_metric, self.best_step, self.evals_without_improvement = value, self.step, 0
        else:
            self.evals_without_improvement += 1
        patience = self.cfg.eval.patience
        if patience and self.evals_without_improvement >= patience:
            logger.info(
                "early stopping: %s has not improved for %d evaluations", self.cfg.eval.metric, patience
            )
            return True
        return False

    # -------------------------------------------------------------------------------------- eval

    def _eval_module(self) -> torch.nn.Module:
        """A plain (hook-free) copy of the dense module with full parameters, in eval mode.

        Under ZeRO-3 the engine's parameters are partitioned and its forward is a collective; a
        local replica lets every rank evaluate its own users without matching the others call for call.
        """
        replica = self.task.build_dense().to(self.device)
        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.cfg.zero.stage == 3):
            replica.load_state_dict(
                {k: v.detach().float() for k, v in self.engine.module.state_dict().items()}
            )
        return replica.eval()

    @torch.no_grad()
    def evaluate(self, split: str, predictions_path: Path | None = None) -> dict:
        """Retrieval over all items (history excluded) for every user of ``split``, over all ranks."""
        return self.evaluator.run(self.task, self._eval_module(), split, predictions_path)

    # ---------------------------------------------------------------------------- checkpointing

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
            "history": self.history,
            "elapsed_s": self.elapsed(),
        }

    def load_trainer_state(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self._clock_start = time.perf_counter()

    def checkpoint_meta(self) -> dict:
        return {
            **self.task.checkpoint_meta(),
            "world_size": self.info.world_size,
            "zero_stage": self.cfg.zero.stage,
        }

    def save_checkpoint(self) -> None:
        self.checkpoints.save(self.step, self.tables, self.engine, self.trainer_state(), self.checkpoint_meta(),
                              protect_step=self.best_step)  # fmt: skip

    def maybe_resume(self) -> bool:
        """Apply ``run.resume``: auto (latest in output_dir), never, or an explicit checkpoint path."""
        resume = self.cfg.run.resume
        if resume == "never":
            return False
        path = self.checkpoints.latest() if resume == "auto" else Path(resume)
        if path is None:
            return False
        state = self.checkpoints.load(path, self.tables, self.engine, self.checkpoint_meta())
        saved_world = json.loads((Path(path) / "meta.json").read_text()).get("world_size")
        if saved_world != self.info.world_size and state.get("batches_in_epoch"):
            # The reader position belongs to the old rank layout; the epoch restarts on the new one.
            logger.warning("world size changed (%s -> %d): epoch %d restarts from its first batch",
                           saved_world, self.info.world_size, state["epoch"])  # fmt: skip
            state["batches_in_epoch"] = 0
        self.load_trainer_state(state)
        logger.info(
            "resumed from %s (step %d, epoch %d, batch %d)",
            path,
            self.step,
            self.epoch,
            self.batches_in_epoch,
        )
        return True

    # ------------------------------------------------------------------------------------ finish

    def finish(self) -> dict:
        """Test with the best checkpoint, write final_metrics.json + predictions, log to MLflow."""
        best = self.checkpoints.path_for(self.best_step) if self.best_step >= 0 else None
        if best is not None and best.exists() and self.best_step != self.step:
            logger.info("loading the best checkpoint (step %d, valid %s=%.4f) for test", self.best_step,
                        self.cfg.eval.metric, self.best_metric)  # fmt: skip
            self.checkpoints.load(
                best, self.tables, self.engine, self.checkpoint_meta(), dense_module_only=True
            )
        valid = self.evaluate("valid")
        test = self.evaluate("test", predictions_path=self.output_dir / "test_predictions.parquet")
        final = {
            "test": test,
            "valid": valid,
            "best_step": self.best_step,
            "steps": self.step,
            "epochs": self.epoch,
            "elapsed_s": self.elapsed(),
            "params": self.params,
            **self.task.describe(),
            # train_valid: the valid rows were trained on, so "valid" is not held out.
            "train_split": self.cfg.data.train_split,
            "older_windows": self.cfg.data.older_windows,
        }
        logger.info("test: %s", _fmt(test))
        log_model = self.cfg.tracking.log_model and self.task.servable
        if log_model:  # a collective: the table is gathered to rank 0 only, which logs it
            log_table, log_encoder = self.task.full_item_table(self.device, dst=0), self._eval_module()
        if self.info.is_main:
            if self.cfg.tracking.log_dataset:
                log_dataset_input(self.tracker, self.cfg.data.dir, self.manifest)
            if log_model:
                log_recommender_model(self.tracker, encoder=log_encoder, item_table_ID=log_table,
                                      config_path=self.output_dir / "config.yaml", data_dir=self.cfg.data.dir)  # fmt: skip
            # The reference point every number should be read against (counts from the train split).
            history = self.evaluator.history if self.cfg.eval.exclude == "all_history" else None
            final["popularity_test"] = evaluate_popularity(self.cfg.data.dir, "test", history=history)
            logger.info("popularity baseline, test: %s", _fmt(final["popularity_test"]))
            path = self.output_dir / "final_metrics.json"
            path.write_text(json.dumps(final, indent=2))
            self.tracker.log_metrics({f"test/{k}": v for k, v in test.items()}, step=self.step)
            self.tracker.log_artifact(path)
            self.tracker.log_artifact(self.output_dir / "test_predictions.parquet")
            self.tracker.log_figure_of_history()
        return final

    def close(self, status: str = "FINISHED") -> None:
        """End the tracked run and release the DeepSpeed engine: ``destroy`` removes its gradient hooks,
        which otherwise keep it, and the process groups its parameters hold, alive (see
        ``destroy_distributed``; under ZeRO-3 DeepSpeed still keeps it)."""
        self.tracker.finish(status)
        self.engine.destroy()


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
