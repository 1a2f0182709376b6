"""Model families; `MODELS` maps a config class name to its module."""

from lmjax.models.bert import BertClassifier, BertConfig, BertPretrain
from lmjax.models.classifiers import CBoW, CBoWConfig
from lmjax.models.rnn import RNNLM, BiLSTMClassifier, BiLSTMConfig, RNNConfig
from lmjax.models.transformer import GPT, GPTConfig
from lmjax.registry import Registry

MODELS: Registry[type] = Registry("model")
MODELS.register("GPTConfig")(GPT)
MODELS.register("CBoWConfig")(CBoW)
MODELS.register("RNNConfig")(RNNLM)
MODELS.register("BiLSTMConfig")(BiLSTMClassifier)
# A BERT config builds its classifier (train.task='classify'); pretraining and
# fine-tuning from a pretrained run are the tasks bert_pretrain and bert_finetune.
MODELS.register("BertConfig")(BertClassifier)


def build_model(config):
    """The Flax module for a frozen config dataclass (looked up by its class name)."""
    return MODELS.get(type(config).__name__)(config)


__all__ = ["BertClassifier", "BertConfig", "BertPretrain", "BiLSTMClassifier", "BiLSTMConfig",
           "CBoW", "CBoWConfig", "GPT", "GPTConfig", "RNNLM", "RNNConfig", "MODELS",
           "build_model"]
