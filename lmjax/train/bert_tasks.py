"""BERT tasks for the trainer: MLM + NSP pretraining, and fine-tuning from a pretraining run.

Fine-tuning reads the best checkpoint of the pretraining workdir, checks that it is a
BERT of the configured architecture and vocabulary (a clear error names what differs),
copies its encoder (`bert/...`: embeddings, blocks, pooler) and trains a new
classification head on top. Continued pretraining (`pretrain_data.init_workdir`) reads
all of a pretraining run's params, heads included, and keeps its vocabulary.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lmjax.data import bert_data, builders, pipelines
from lmjax.data.tokenizers import load_tokenizer
from lmjax.models.bert import BertConfig, BertPretrain
from lmjax.train.checkpoint import IncompatibleCheckpointError, best_params, flat_shapes
from lmjax.train.tasks import ClassifyTask, Task


def _weighted_ce(logits, labels, weights):
    """(summed cross entropy, summed correct, summed weight) of weighted predictions."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(ce * weights), jnp.sum(correct * weights), jnp.sum(weights)


def pretrain_sums(logits, nsp_logits, batch) -> dict:
    mlm = _weighted_ce(logits, batch["masked_labels"], batch["masked_weights"])
    nsp = _weighted_ce(nsp_logits, batch["nsp_labels"], batch["nsp_weights"])
    return dict(zip(("mlm_loss", "mlm_correct", "mlm_count", "nsp_loss", "nsp_correct",
                     "nsp_count"), mlm + nsp, strict=True))


def pretrain_metrics(sums: dict) -> dict:
    """loss = MLM loss + NSP loss (both means over their scored items), and accuracies; no
    NSP figures when nothing was scored for it (pretrain_data.nsp = False)."""
    mlm_count = max(float(sums["mlm_count"]), 1.0)
    mlm_loss = float(sums["mlm_loss"]) / mlm_count
    out = {"loss": mlm_loss, "mlm_loss": mlm_loss,
           "mlm_accuracy": float(sums["mlm_correct"]) / mlm_count}
    if float(sums["nsp_count"]) > 0:
        nsp_count = float(sums["nsp_count"])
        out["nsp_loss"] = float(sums["nsp_loss"]) / nsp_count
        out["nsp_accuracy"] = float(sums["nsp_correct"]) / nsp_count
        out["loss"] += out["nsp_loss"]
    return out


class BertPretrainTask(Task):
    """Masked language modelling + next sentence prediction (Devlin et al. 2019)."""

    def __init__(self, config: BertConfig, data: bert_data.PretrainData, length: int,
                 init_workdir: str | None = None):
        self.config, self.data, self.length = config, data, length
        self.model = BertPretrain(config)
        self.init_workdir = init_workdir

    def warm_start(self, params):
        """Continued pretraining: every parameter (encoder and MLM/NSP heads) from the best
        checkpoint of `init_workdir`; the optimiser and learning-rate schedule start anew."""
        if self.init_workdir is None:
            return params
        print(f"continuing the pretraining run in {self.init_workdir}")
        return load_pretrained(self.init_workdir, params, subtree=None)

    def init_args(self):
        predictions = self.data.mask.max_predictions
        return (jnp.zeros((1, self.length), jnp.int32), jnp.zeros((1, self.length), jnp.int32),
                jnp.zeros((1, predictions), jnp.int32))

    def _logits(self, params, batch, rng, deterministic):
        rngs = None if rng is None else {"dropout": rng}
        return self.model.apply({"params": params}, batch["tokens"], batch["segments"],
                                batch["masked_positions"], deterministic=deterministic,
                                rngs=rngs)

    def loss(self, params, batch, carry, rng, deterministic):
        sums = pretrain_sums(*self._logits(params, batch, rng, deterministic), batch)
        mlm_loss = sums["mlm_loss"] / jnp.maximum(sums["mlm_count"], 1.0)
        nsp_loss = sums["nsp_loss"] / jnp.maximum(sums["nsp_count"], 1.0)
        metrics = {
            "mlm_loss": mlm_loss,
            "mlm_accuracy": sums["mlm_correct"] / jnp.maximum(sums["mlm_count"], 1.0),
            "nsp_accuracy": sums["nsp_correct"] / jnp.maximum(sums["nsp_count"], 1.0),
        }
        return mlm_loss + nsp_loss, (metrics, carry)

    def eval_sums(self, params, batch, carry):
        return pretrain_sums(*self._logits(params, batch, None, True), batch), carry

    def finish_eval(self, sums):
        return pretrain_metrics(sums)

    def train_iterator(self, batch_size, seed):
        return self.data.train_iterator(batch_size, seed)

    def eval_batches(self, batch_size, num_batches, seed):
        return bert_data.pretrain_eval_batches(self.data.eval, batch_size, num_batches, seed,
                                               self.data.mask)

    def items_per_step(self, batch_size):
        return batch_size * self.length


class BertFinetuneTask(ClassifyTask):
    """SST-2-style classification with a BERT whose encoder may come from pretraining."""

    def __init__(self, config: BertConfig, data, init_workdir: str | None):
        super().__init__(config, data)  # config.module() is the BertClassifier
        self.init_workdir = init_workdir

    def warm_start(self, params):
        """Params with the pretrained encoder in place of the fresh one (head stays fresh)."""
        if self.init_workdir is None:
            return params
        encoder = load_pretrained(self.init_workdir, params["bert"])
        print(f"fine-tuning from the pretrained encoder in {self.init_workdir}")
        return {**params, "bert": encoder}


# --- reading a pretraining checkpoint ----------------------------------------------------


_QKV = ("block0/attn/qkv/kernel", "blocks/attn/qkv/kernel")  # per layer, or scan_layers


def describe(shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Architecture figures read off a BERT encoder's parameter shapes (either layout:
    `block0/...` per layer, or `blocks/...` stacked on a leading layer axis)."""
    stacked = _QKV[1] in shapes
    if stacked:
        layers, *qkv = shapes[_QKV[1]]
        mlp = shapes["blocks/up/kernel"][2]
    else:
        layers = len({name.split("/")[0] for name in shapes if name.startswith("block")})
        qkv, mlp = shapes[_QKV[0]], shapes["block0/up/kernel"][1]
    return {
        "vocabulary rows (padded)": shapes["word/embedding"][0],
        "embed_dim": shapes["word/embedding"][1],
        "max_len": shapes["position/embedding"][0],
        "num_layers": layers,
        "num_heads": qkv[2],
        "mlp width": mlp,
    }


def check_encoder(saved: dict, wanted: dict, where: str) -> None:
    """Raises IncompatibleCheckpointError naming what differs between two encoders."""
    if "word/embedding" not in saved or not any(name in saved for name in _QKV):
        raise IncompatibleCheckpointError(
            f"the checkpoint in {where} is not a BERT pretraining checkpoint (its parameters "
            f"are {', '.join(sorted(saved)[:4])}, ...; a BERT one has bert/word/embedding, "
            "bert/block0/...). Point the init_workdir binding at a bert_pretrain run.")
    have, want = describe(saved), describe(wanted)
    diffs = [f"{k} {have[k]} in the checkpoint but {want[k]} in the config"
             for k in have if have[k] != want[k]]
    same_layout = (_QKV[1] in saved) == (_QKV[1] in wanted)  # else restoring converts it
    if not diffs and same_layout:  # same figures but another shape (e.g. type_vocab_size)
        diffs = [f"parameter {n} has shape {saved.get(n)} in the checkpoint but "
                 f"{wanted.get(n)} in the config"
                 for n in sorted(set(saved) | set(wanted)) if saved.get(n) != wanted.get(n)]
    if diffs:
        raise IncompatibleCheckpointError(
            f"the BERT checkpoint in {where} does not match the fine-tuning model: "
            + "; ".join(diffs) + ". Use the same BertConfig (and tokenizer) as the "
            "pretraining run (see its config.gin).")


def load_pretrained(workdir: str, target, subtree: str | None = "bert"):
    """The params of the best (else latest) checkpoint of a BERT pretraining run, placed
    like `target`: its encoder (`bert/...`, for fine-tuning) or, with `subtree=None`, all
    of them (encoder and pretraining heads, to continue pretraining).

    Reads straight onto the shardings of `target` (the fresh model's params), so any mesh
    can start from any pretraining run.
    """
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(
            f"{workdir} has no checkpoint; run the pretraining first "
            "(configs/experiments/bert_pretrain_offline.gin)")
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
    wanted = flat_shapes(target["bert"] if subtree is None else target)

    def check(saved: dict) -> None:
        encoder = {k.removeprefix("bert/"): v for k, v in saved.items() if k.startswith("bert/")}
        check_encoder(encoder or saved, wanted, workdir)

    return best_params(workdir, abstract, subtree, check=check)[0]


def check_same_vocabulary(tokenizer_dir: str, pretrained_dir: str,
                          binding: str = "finetune.init_workdir") -> None:
    """A fine-tuning workdir's saved tokenizer must be the pretraining run's."""
    mine = os.path.join(tokenizer_dir, "spm.model")
    theirs = os.path.join(pretrained_dir, "spm.model")
    if os.path.exists(mine) and os.path.exists(theirs):
        with open(mine, "rb") as a, open(theirs, "rb") as b:
            if a.read() != b.read():
                raise IncompatibleCheckpointError(
                    f"vocabulary differs: the tokenizer in {tokenizer_dir} is not the one of "
                    f"the pretraining run ({pretrained_dir}). Train in a new --workdir or "
                    f"point {binding} at the run this workdir started from.")


def pretrained_tokenizer(tokenizer_dir: str | None, pretrained_dir: str | None,
                         binding: str = "finetune.init_workdir"):
    """The pretraining run's vocabulary, copied into (or checked against) this run's;
    `binding` names the setting that points at that run, for the errors."""
    mine = tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json"))
    theirs = pretrained_dir and os.path.exists(os.path.join(pretrained_dir, "tokenizer.json"))
    if mine and theirs:
        check_same_vocabulary(tokenizer_dir, pretrained_dir, binding)
    if not (mine or theirs):
        raise FileNotFoundError(
            f"no BERT vocabulary: {pretrained_dir or binding + ' (unset)'} has no "
            f"tokenizer. Set {binding} to a bert_pretrain workdir (for fine-tuning its "
            "vocabulary is used even with finetune.init_params=False).")
    tok = load_tokenizer(tokenizer_dir if mine else pretrained_dir)
    bert_data.check_specials(tok)
    if tokenizer_dir and not mine:
        tok.save(tokenizer_dir)
    return tok


def finetune_data(tokenizer, max_length: int, tfds_dir: str | None = None,
                  limit: int | None = None):
    """SST-2 train/dev as [CLS] sentence [SEP], padded (the classification task's format).

    `limit` keeps the first training sentences only (tests); dev is always whole.
    """
    def encode(texts: list[str], labels: list[int] | None = None) -> pipelines.Examples:
        ids = [np.concatenate([[bert_data.CLS], tokenizer.encode(text)[: max_length - 2],
                               [bert_data.SEP]]).astype(np.int32) for text in texts]
        labels = [0] * len(texts) if labels is None else labels
        return pipelines.pad_examples(ids, labels, max_length, bert_data.PAD)

    builders.prepare("sst2", tfds_dir)
    splits, texts = {}, {}
    for split in ("train", "validation"):
        rows = builders.read_examples("sst2", split, tfds_dir)
        if split == "train":
            rows = rows[:limit]
        texts[split] = [r["text"].decode("utf-8") for r in rows]
        splits[split] = encode(texts[split], [int(r["label"]) for r in rows])
    return pipelines.ClassificationData(tokenizer, splits["train"], splits["validation"],
                                        max_length, train_texts=texts["train"], encode=encode)
