"""Model families. Each config dataclass registers itself in `MODELS` and builds its
Flax module with `config.module()`."""

from lmjax.models.bert import BertClassifier, BertConfig, BertPretrain
from lmjax.models.classifiers import CBoW, CBoWConfig
from lmjax.models.registry import MODELS
from lmjax.models.rnn import RNNLM, BiLSTMClassifier, BiLSTMConfig, RNNConfig
from lmjax.models.seq2seq import EncoderDecoder, Seq2SeqConfig
from lmjax.models.transformer import GPT, GPTConfig

__all__ = ["BertClassifier", "BertConfig", "BertPretrain", "BiLSTMClassifier", "BiLSTMConfig",
           "CBoW", "CBoWConfig", "EncoderDecoder", "GPT", "GPTConfig", "RNNLM", "RNNConfig",
           "Seq2SeqConfig", "MODELS"]
