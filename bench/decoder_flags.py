"""The `config.decoder` speed options that bench/beam_search.py and bench/training.py both take as
flags (absl flags, defined on import; each bench script runs in a process of its own)."""

from absl import flags

PAD_COLUMNS_TO = flags.DEFINE_integer("pad_columns_to", 1, "flaxcap: pad the decoder's kernels with "
                                      "zero columns to a multiple of this inside each product "
                                      "(config.decoder.pad_columns_to; the same values).")
SCORE_KERNEL = flags.DEFINE_bool("score_kernel", False, "flaxcap: the attention scores by a Pallas "
                                 "kernel: a decoding step's, and with --score_vjp teacher forcing's "
                                 "scores and gradients (config.decoder.score_kernel).")
APPROX_TANH = flags.DEFINE_bool("approx_tanh", False, "flaxcap: the Pallas kernels' tanh by the GPU's "
                                "tanh.approx.f32 (config.decoder.approx_tanh).")


def options() -> dict:
  """The flags' values as `config.decoder` fields."""
  return {"pad_columns_to": PAD_COLUMNS_TO.value, "score_kernel": SCORE_KERNEL.value,
          "approx_tanh": APPROX_TANH.value}
