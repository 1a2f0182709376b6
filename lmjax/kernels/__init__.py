"""Compiled kernels that stand in for parts of the models on particular backends.

`rnn_cpu.cc` / `rnn_cpu.py`: the LSTM's and the GRU's time loops, forward and backward, as
C++ kernels for XLA's CPU backend, compiled on first use; `recurrence.py`: the custom
gradients that hand a layer's recurrence to them, and the choice of whether to
(`use_cpu`, from a model config's `kernel` field). The models call `recurrence` at one
place (lmjax/models/rnn.py) and run XLA's `lax.scan` wherever it does not apply, so a
fork for other hardware can delete this package and that call.
"""

from lmjax.kernels.recurrence import CHOICES, check_choice, recurrence, use_cpu, why_not_cpu

__all__ = ["CHOICES", "check_choice", "recurrence", "use_cpu", "why_not_cpu"]
